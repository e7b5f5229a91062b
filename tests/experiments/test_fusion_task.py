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


def test_interpolation_is_exact_on_a_line_and_flat_outside_the_points():
    from gatelab.experiments.fusion import interpolate
    times = torch.tensor([[0.0, 0.25, 0.5, 1.0]])
    values = (2 * times + 1).unsqueeze(-1)
    observed = torch.tensor([[False, True, True, False]])
    grid = interpolate(values, times, observed, 5)[0, :, 0]
    assert grid.tolist() == pytest.approx([1.5, 1.5, 2.0, 2.0, 2.0])  # held at 0.25 and 0.5's values


@needs_data_wheels
def test_irregular_vowels_drop_points_at_the_rate_and_keep_one_per_group():
    from gatelab.experiments.fusion import FuseIrregular, irregular_vowels
    groups, labels = irregular_vowels("train", 0.6, 2, torch.Generator().manual_seed(0))
    assert len(groups) == 2 and labels.shape == (270,) and groups[0][0].shape == (270, 29, 6)
    real = (groups[0][0] != 0).any(-1) | groups[0][2]  # frames that exist (padding is all zero)
    kept = groups[0][2].sum() / real.sum()
    assert 0.35 < kept.item() < 0.45 and all(g[2].any(1).all() for g in groups)
    assert not torch.equal(groups[0][2], groups[1][2])  # the two groups drop independently
    task = FuseIrregular()
    for arm in ({"model": "fusemoe"}, {"model": "impute"}):
        scores = task.run({"epochs": 0, "min_steps": 30}, {**arm, "drop": 0.3}, 3, seed=2)
        assert 100 / 9 < scores["accuracy"] <= 100
