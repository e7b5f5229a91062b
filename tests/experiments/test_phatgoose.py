"""The phatgoose-routing task on a tiny random BERT: every method runs, the arms of a seed share
one stage 1 (also when read back from the cache), and bad arms are refused."""

import pytest
import torch

from gatelab.experiments import phatgoose as pg
from gatelab.experiments.spec import Experiment
from gatelab.studies.spec import SpecError
from markers import needs_real_data

TINY = {"test_per_class": 2, "pool_per_class": 3, "max_length": 16, "tasks": 2, "classes_per_task": 2,
        "rank": 2, "min_steps": 2, "head_steps": 2, "gate_steps": 2, "batch": 4}


@needs_real_data
def test_every_method_runs_and_the_arms_share_stage_one(tiny_backbone):
    options = {**TINY, "backbone": tiny_backbone}
    task = pg.PhatgooseRouting()
    task.prepare(options)
    scores = {m: task.run(options, {"method": m, "adapter": 1}, 2, seed=3) for m in pg.METHODS}
    assert all(0 <= s["accuracy"] <= 100 for s in scores.values())
    assert 0 <= scores["phatgoose"]["routing_accuracy"] <= 100
    resolved = {**task.OPTIONS, **options}
    pool = task._pool(resolved)
    kept = task.stage1(resolved, pool, 2, 3)
    pg._STAGES.clear()  # read back from the cache folder, as another process would
    loaded = task.stage1(resolved, pool, 2, 3)
    assert loaded is not kept and loaded.split == kept.split
    assert torch.equal(loaded.head.weight, kept.head.weight)
    a, b = kept.model.state_dict(), loaded.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if ".A." in k or ".B." in k)
    assert any(".B." in k and a[k].abs().sum() > 0 for k in a)  # the adapters were trained
    again = task.run(options, {"method": "phatgoose"}, 2, seed=3)
    assert again["accuracy"] == scores["phatgoose"]["accuracy"]  # stage 2 restarts from 0 gates
    with pytest.raises(ValueError, match="adapter 2 does not exist"):
        task.run(options, {"method": "single", "adapter": 2}, 2, seed=3)


def test_bad_methods_and_task_counts_are_refused():
    base = {"kind": "experiment", "name": "pg", "task": "phatgoose-routing", "sizes": [4],
            "arms": [{"name": "a", "options": {"method": "phatgoose"}}]}
    Experiment.from_dict(base)
    with pytest.raises(SpecError, match=r"arms\[0\].options: method 'route' is not one of"):
        Experiment.from_dict({**base, "arms": [{"name": "a", "options": {"method": "route"}}]})
    with pytest.raises(SpecError, match=r"tasks x classes_per_task .* got 5 x 5"):
        Experiment.from_dict({**base, "options": {"tasks": 5}})
