"""The early-exit task: ECE and the curve summary by hand, thresholding's extremes, and a whole
run on a tiny random BERT."""

import pytest
import torch

from gatelab.experiments.early_exit import (
    EarlyExitTask,
    curve_summary,
    expected_calibration_error,
    threshold_curve,
)
from markers import needs_real_data


def test_ece_by_hand():
    # confidences 0.9, 0.9 (one right) -> bin of 0.9: |0.5 - 0.9|; 0.55, 0.6 (both right) -> |1 - 0.575|
    probs = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.55, 0.45], [0.4, 0.6]])
    labels = torch.tensor([0, 0, 0, 1])
    ece = expected_calibration_error(probs, labels, bins=10)
    assert ece == pytest.approx(100 * (0.5 * 0.4 + 0.25 * 0.45 + 0.25 * 0.4))


def test_curve_summary_reads_every_curve_on_the_shared_range():
    curves = {"a": [(1.0, 50.0, 10.0), (3.0, 70.0, 6.0)], "b": [(2.0, 60.0, 1.0), (4.0, 80.0, 1.0)]}
    low, high, out = curve_summary(curves, grid=3)
    assert (low, high) == (2.0, 3.0)
    assert out["a"][0] == pytest.approx((60 + 65 + 70) / 3) and out["a"][1] == pytest.approx((8 + 7 + 6) / 3)
    assert out["b"][0] == pytest.approx((60 + 65 + 70) / 3) and out["b"][1] == pytest.approx(1.0)


def test_thresholding_spans_first_to_last_exit():
    torch.manual_seed(0)
    logits = torch.randn(4, 30, 3)
    labels = torch.randint(0, 3, (30,))
    for method in ("max-prob", "entropy"):
        points = threshold_curve(logits, labels, method, 5)
        exits = [p[0] for p in points]
        assert min(exits) == 1.0 and max(exits) == 4.0  # everyone at layer 1 ... everyone at the last
        last = (logits[-1].argmax(-1) == labels).double().mean().item() * 100
        assert [p[1] for p in points if p[0] == 4.0][0] == pytest.approx(last)


@needs_real_data
def test_a_tiny_early_exit_run(tiny_backbone):
    options = {"backbone": tiny_backbone, "test_per_class": 3, "pool_per_class": 4, "max_length": 16,
               "min_steps": 5, "jei_steps": 6, "lambdas": [0.0, 1.0, 10.0], "thresholds": 5}
    task = EarlyExitTask()
    task.prepare(options)
    scores = {m: task.run(options, {"method": m}, 3, seed=2) for m in ("jei", "max-prob", "entropy")}
    ranges = {(s["range_low"], s["range_high"]) for s in scores.values()}
    assert len(ranges) == 1  # one shared range per seed
    low, high = ranges.pop()
    assert 1 <= low <= high <= 2  # the tiny BERT has 2 layers
    assert all(0 <= s["accuracy"] <= 100 and 0 <= s["ece"] <= 100 for s in scores.values())
    assert task.run(options, {"method": "jei"}, 3, seed=2)["accuracy"] == scores["jei"]["accuracy"]


def test_jei_heads_are_a_prefix_of_the_plain_heads_run():
    torch.manual_seed(0)
    features, labels, rows = torch.randn(3, 40, 6), torch.randint(0, 4, (40,)), torch.arange(40)
    options = {**EarlyExitTask.OPTIONS, "min_steps": 10, "epochs": 0, "batch": 8}
    def heads(jei_steps):
        torch.manual_seed(1)
        return EarlyExitTask._heads(features, labels, rows, 4, {**options, "jei_steps": jei_steps},
                                    torch.Generator().manual_seed(2))
    plain, warm = heads(0)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), warm.parameters()))
    plain, warm = heads(20)  # all 10 steps left to JEI-DNN: its start is the initial heads
    torch.manual_seed(1)
    from gatelab.nn.early_exit import EarlyExit
    initial = EarlyExit(6, 4, 3)
    assert all(torch.equal(a, b) for a, b in zip(initial.parameters(), warm.parameters()))
    assert not torch.equal(plain.heads[0].weight, warm.heads[0].weight)
    with pytest.raises(ValueError, match="exceed the 10 steps"):
        heads(22)
