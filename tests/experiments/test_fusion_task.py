"""The fusemoe-missing task (arXiv 2402.03226): missing-view masks, bad arms, and one short run
of each model on the real UCI Multiple Features files."""

import pytest
import torch

from gatelab.experiments.fusion import FuseMissing, HMoEGates, missing_masks
from gatelab.experiments.spec import Experiment
from gatelab.studies.spec import SpecError
from markers import needs_data_wheels


def test_masks_keep_a_view_per_row_and_drop_at_the_rate():
    g = torch.Generator().manual_seed(0)
    assert missing_masks(50, 6, 0.0, g).all()
    present = missing_masks(20000, 6, 0.5, torch.Generator().manual_seed(1))
    assert present.any(1).all()
    # dropped with p = 0.5, except the 1/64 of rows that get one view back
    assert present.float().mean().item() == pytest.approx(0.5 + 1 / 64 / 6, abs=0.01)
    heavy = missing_masks(20000, 6, 0.8, torch.Generator().manual_seed(2))
    assert heavy.any(1).all() and heavy.sum(1).float().mean().item() == pytest.approx(
        6 * 0.2 + 0.8 ** 6, abs=0.03)
    assert torch.equal(missing_masks(30, 6, 0.5, torch.Generator().manual_seed(3)),
                       missing_masks(30, 6, 0.5, torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("options,match", [({"missing": 1.0}, "missing must be a rate"),
                                           ({"model": "early"}, "Unknown model 'early'"),
                                           ({"router": "late"}, "Unknown fusion router")])
def test_bad_arms_name_the_fix(options, match):
    spec = {"kind": "experiment", "name": "f", "task": "fusemoe-missing", "sizes": [5],
            "arms": [{"name": "a", "options": options}]}
    with pytest.raises(SpecError, match=match):
        Experiment.from_dict(spec)


@needs_data_wheels
@pytest.mark.parametrize("arm", [{"model": "fusemoe", "router": "joint", "gate": "laplace"},
                                 {"model": "fusemoe", "router": "per-modality", "gate": "gaussian"},
                                 {"model": "concat"}, {"model": "late"},
                                 {"outer": "laplace", "inner": "laplace"}])
def test_each_model_trains_and_beats_chance(arm):
    task = HMoEGates() if "outer" in arm else FuseMissing()
    options = {"epochs": 0, "min_steps": 25}
    task.prepare(options)
    scores = task.run(options, {**arm, "missing": 0.5}, 5, seed=11)
    assert 20 < scores["accuracy"] <= 100  # 10 classes: chance is 10
