"""Fit status (issue 11, point 2): each failure the users met is reproduced and must get
its own word; each threshold is checked on both sides on hand-made cases."""

from __future__ import annotations

import json

import pytest
import torch

import gatelab as gl
from cases import sigmoid_regression_data
from gatelab import cli
from gatelab.fit import (
    FitStatus,
    fit_em,
    fit_lsq,
    fit_topk_segments,
    near_truth,
    random_starts,
    select_best,
    status_names,
)
from gatelab.fit.single import fit_best_of_starts, fit_lsq_best_of_starts
from gatelab.fit.status import MIN_TRANSITION_SAMPLES, SEPARATION_LOGIT, VARIANCE_COLLAPSE, separated
from gatelab.fit.topk import random_sides

F64 = torch.float64


def _two_lines(n, seed=0, lo=-2.0, hi=2.0, gap=0.0, noise=0.1):
    """y = 1 + 2x right of 0, -1 - x left of it; with ``gap`` > 0 no x in (-gap, gap)."""
    g = torch.Generator().manual_seed(seed)
    x = lo + (hi - lo) * torch.rand(n, generator=g, dtype=F64)
    x = x[x.abs() > gap]
    y = torch.where(x > 0, 1 + 2 * x, -1 - x) + noise * torch.randn(x.shape, generator=g, dtype=F64)
    return x.unsqueeze(-1), y


def _soft_mixture(n, seed=0, reach=2.0, noise=0.3, sharpness=3.0):
    """Two lines mixed by a soft logistic gate sigmoid(sharpness * x)."""
    g = torch.Generator().manual_seed(seed)
    x = (2 * torch.rand(n, generator=g, dtype=F64) - 1) * reach
    right = torch.rand(n, generator=g, dtype=F64) < torch.sigmoid(sharpness * x)
    y = torch.where(right, 1 + 2 * x, -1 - x) + noise * torch.randn(n, generator=g, dtype=F64)
    return x.unsqueeze(-1), y


def _status(res) -> str:
    return status_names(res.status)[0]


# --- the reproductions from the issue --------------------------------------------------

def test_cleanly_separable_data_is_separated_not_converged():
    x, y = _two_lines(1000, gap=0.3)
    _, res = fit_best_of_starts(x, y, 2)
    assert _status(res) == "separated"
    assert res.params["beta1"].abs().max() > 50      # the slopes ran off
    # the same data with an overlap at the boundary is an ordinary fit
    x, y = _soft_mixture(1000)
    assert _status(fit_best_of_starts(x, y, 2)[1]) == "converged"


def test_a_gate_ridge_gives_a_finite_fit_and_reports_the_plain_likelihood():
    x, y = _two_lines(1000, gap=0.3)
    model, res = fit_best_of_starts(x, y, 2, gate_ridge=0.1)
    assert _status(res) == "converged"
    assert res.params["beta1"].abs().max() < 30
    assert float(res.loglik) == pytest.approx(float(model.log_likelihood(x, y, res.params)),
                                              rel=1e-10)
    # the penalised fit maximises l - ridge/2 |beta1|^2: lowering the slope a little
    # lowers that objective (a check that the ridge was applied, not just reported)
    def objective(p):
        return float(model.log_likelihood(x, y, p)) - 0.05 * float(p["beta1"].square().sum())
    for scale in (0.98, 1.02):
        moved = {**res.params, "beta1": res.params["beta1"] * scale}
        assert objective(moved) < objective(res.params)


def test_gate_ridge_is_refused_where_there_are_no_slopes():
    x, y = _soft_mixture(200)
    model = gl.GaussianMoE(2, 1, "laplace")
    init = random_starts(model, x, y, 1)
    with pytest.raises(ValueError, match="gate_ridge penalises"):
        fit_em(model, x, y, init, gate_ridge=0.1)
    with pytest.raises(ValueError, match="gate_ridge must be"):
        fit_em(gl.GaussianMoE(2, 1), x, y, random_starts(gl.GaussianMoE(2, 1), x, y, 1),
               gate_ridge=-1.0)


def test_ten_rows_collapse_a_variance_and_say_degenerate():
    # three of the ten rows lie exactly on a line: an expert through them has no noise
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(-2, 2, 10, dtype=F64).unsqueeze(-1)
    y = x[:, 0] + 0.3 * torch.randn(10, generator=g, dtype=F64)
    y[[0, 4, 8]] = 3.0 - x[[0, 4, 8], 0]
    _, res = fit_best_of_starts(x, y, 2)
    assert _status(res) == "degenerate"
    assert float(res.params["var"].min()) <= VARIANCE_COLLAPSE * float(y.var())


def test_polynomial_experts_never_lose_to_linear_ones_with_the_defaults():
    # x over [-10, 10]: from random starts alone, polynomial EM ended at -1978 against
    # -1493 for linear experts on these data
    x, y = _soft_mixture(1000, seed=1, reach=10.0, noise=1.0, sharpness=1.0)
    _, linear = fit_best_of_starts(x, y, 2, expert="linear")
    _, poly = fit_best_of_starts(x, y, 2, expert="polynomial")
    assert float(poly.loglik) >= float(linear.loglik) - 1e-6 * abs(float(linear.loglik))


def test_cosine_gate_from_a_flat_start_is_stuck_and_random_starts_free_it():
    x, y = _soft_mixture(1000)
    model = gl.GaussianMoE(2, 1, "cosine")
    init = random_starts(model, x, y, 3, torch.Generator().manual_seed(0))
    flat = {**init, "beta1": torch.zeros_like(init["beta1"]), "beta0": torch.zeros_like(init["beta0"])}
    stuck = select_best(fit_em(model, x, y, flat))
    assert _status(stuck) == "stuck"
    assert torch.equal(stuck.params["beta1"], torch.zeros_like(stuck.params["beta1"]))
    _, res = fit_best_of_starts(x, y, 2, "cosine")
    assert _status(res) == "converged"
    assert float(res.loglik) > float(stuck.loglik) + 100


def test_top1_gate_under_em_is_stuck_and_the_default_fit_uses_the_segments():
    x, y = _two_lines(1000, noise=0.3)
    model = gl.GaussianMoE(2, 1, gl.make_gate("topk", top_k=1))
    init = random_starts(model, x, y, 2, torch.Generator().manual_seed(0))
    flat = {**init, "beta1": torch.zeros_like(init["beta1"]), "beta0": torch.zeros_like(init["beta0"])}
    assert status_names(fit_em(model, x, y, flat).status) == ["stuck", "stuck"]
    _, res = fit_best_of_starts(x, y, 2, gl.make_gate("topk", top_k=1))
    assert _status(res) == "converged"
    # two different experts, near the two true lines
    a = sorted(res.params["a"][:, 0].tolist())
    assert a == pytest.approx([-1.0, 2.0], abs=0.1)
    assert float(res.loglik) > float(select_best(fit_em(model, x, y, flat)).loglik) + 100


def test_segment_fit_from_many_random_starts_skips_none():
    x, y = _two_lines(600, noise=0.3)
    model = gl.GaussianMoE(3, 1, gl.make_gate("topk", top_k=2))
    g = torch.Generator().manual_seed(1)
    init = random_starts(model, x, y, 50, g)
    res = fit_topk_segments(model, x, y, init, sides=random_sides(50, 3, 2, g))
    assert torch.isfinite(res.loglik).all()
    assert set(status_names(res.status)) <= {"converged", "max_iter"}
    # as good as from starts at the truth's two lines
    truth = {"beta1": torch.tensor([[-1e3], [1e3]], dtype=F64), "beta0": torch.zeros(2, dtype=F64),
             "a": torch.tensor([[-1.0], [2.0]], dtype=F64), "b": torch.tensor([-1.0, 1.0], dtype=F64),
             "var": torch.full((2,), 0.09, dtype=F64)}
    near = fit_topk_segments(model, x, y, near_truth(model, truth, 600, 5))
    assert float(res.loglik.max()) >= float(near.loglik.max()) - 1e-6 * abs(float(near.loglik.max()))


def test_top_k_larger_than_the_experts_is_an_error_not_equal_weights():
    gate = gl.make_gate("topk", top_k=3)
    params = gate.random_params(2, 1)
    with pytest.raises(ValueError, match="top_k=3 exceeds the 2 experts"):
        gate.weights(torch.zeros(4, 1, dtype=F64), params)


# --- each rule on hand-made cases ---------------------------------------------------

def _params(beta1, beta0):
    return {"beta1": torch.tensor(beta1, dtype=F64).unsqueeze(0),
            "beta0": torch.tensor(beta0, dtype=F64).unsqueeze(0)}


def test_separation_is_a_boundary_with_fewer_than_three_samples_in_its_transition():
    assert MIN_TRANSITION_SAMPLES == 3
    model = gl.GaussianMoE(2, 1)
    x = torch.tensor([-2.0, -1.2, -1.1, -1.0, 1.0, 1.1, 1.2, 2.0], dtype=F64).view(1, -1, 1)

    def at(slope, intercept=0.0):
        return separated(model, x, _params([[slope], [0.0]], [intercept, 0.0]))

    t = SEPARATION_LOGIT
    assert at(t * 1.01)            # every sample beyond the transition
    assert at(t / 1.05)            # two (x = +-1) inside it
    assert not at(t / 1.15)        # four (+-1, +-1.1) inside it
    assert not at(0.0, 100.0)      # one expert ahead everywhere: no boundary at all
    # three samples in the transition pin a boundary down however steep the gate
    x_near = torch.tensor([-2.0, -1e-4, 1e-4, 5e-4, 2.0], dtype=F64).view(1, -1, 1)
    assert not separated(model, x_near, _params([[1e4], [0.0]], [0.0, 0.0]))
    assert separated(model, x_near, _params([[1e6], [0.0]], [0.0, 0.0]))


def test_separation_of_one_pair_among_three_experts_counts():
    model = gl.GaussianMoE(3, 1)
    x = torch.linspace(-3, 3, 61, dtype=F64).unsqueeze(-1)
    x = x[(x[:, 0] - 1.05).abs() > 0.3].unsqueeze(0)     # empty around x = 1.05
    # experts 0 | 1 meet at x = -1 (data there), 1 | 2 at x = 1.05 with slopes 200 apart
    steep = _params([[-1.0], [0.0], [200.0]], [-1.0, 0.0, -210.0])
    assert separated(model, x, steep)
    mild = _params([[-1.0], [0.0], [2.0]], [-1.0, 0.0, -2.1])
    assert not separated(model, x, mild)


def test_sigmoid_separation_and_top1_which_has_no_boundary_score():
    reg = gl.MoERegression(2, 1, "sigmoid")
    x = torch.tensor([[-2.0], [-1.0], [1.0], [2.0]], dtype=F64).unsqueeze(0)
    assert separated(reg, x, _params([[30.0], [0.0]], [0.0, 0.0]))
    assert not separated(reg, x, _params([[30.0], [0.0]], [70.0, 0.0]))   # on everywhere
    assert not separated(reg, x, _params([[2.0], [0.0]], [0.0, 0.0]))     # a soft gate
    top1 = gl.GaussianMoE(2, 1, gl.make_gate("topk", top_k=1))
    assert not separated(top1, x, _params([[1e6], [0.0]], [0.0, 0.0]))


def test_max_iter_and_the_order_of_statuses():
    x, y = _soft_mixture(500)
    model = gl.GaussianMoE(2, 1)
    init = random_starts(model, x, y, 1, torch.Generator().manual_seed(0))
    assert status_names(fit_em(model, x, y, init, max_iter=2).status) == ["max_iter"]
    assert status_names(fit_em(model, x, y, init).status) == ["converged"]
    assert FitStatus.STUCK > FitStatus.DEGENERATE > FitStatus.SEPARATED > FitStatus.MAX_ITER


def test_least_squares_fits_carry_a_status():
    x, y = sigmoid_regression_data()
    model, res = fit_lsq_best_of_starts(x, y, 2, "sigmoid")
    assert _status(res) == "converged"
    assert float(res.rss) < float(((y - y.mean()) ** 2).sum())
    # a noiseless line is fitted through the points: the RSS collapses
    exact = 1 + 2 * x[:, 0]
    _, res = fit_lsq_best_of_starts(x, exact, 2, "sigmoid")
    assert _status(res) == "degenerate"
    # batched: one status per problem
    init = {k: v.unsqueeze(0).expand(3, *v.shape) for k, v in model.random_params(
        torch.Generator().manual_seed(0)).items()}
    assert fit_lsq(model, x, y, init).status.shape == (3,)


# --- where the status shows -------------------------------------------------------------

@pytest.fixture
def separable_csv(tmp_path):
    x, y = _two_lines(400, gap=0.3)
    path = tmp_path / "sep.csv"
    path.write_text("x,y\n" + "".join(f"{a},{b}\n" for a, b in zip(x[:, 0].tolist(), y.tolist())))
    return path


def test_cli_prints_the_status_in_words_and_keeps_exit_code_0(separable_csv, capsys):
    assert cli.main(["fit", str(separable_csv), "--x", "x", "--y", "y", "--experts", "2"]) == 0
    out = capsys.readouterr().out
    assert "status: separated" in out
    assert cli.main(["fit", str(separable_csv), "--x", "x", "--y", "y", "--experts", "2",
                     "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "separated" and "no finite" in result["status_meaning"]


def test_estimator_exposes_the_status(separable_csv):
    from gatelab.fit import GaussianMoERegressor
    x, y = _two_lines(400, gap=0.3)
    est = GaussianMoERegressor(2, random_state=0).fit(x.numpy(), y.numpy())
    assert est.status_ == "separated"
    assert GaussianMoERegressor(2, gate_ridge=0.1, random_state=0).fit(
        x.numpy(), y.numpy()).status_ == "converged"


@pytest.mark.parametrize("dim", [1, 2])
def test_the_cheap_separation_check_never_skips_a_separated_fit(dim):
    """``_may_separate`` is a necessary condition wherever every leading expert leads at
    three samples or more: checked against the full rule on random gates of every scale."""
    from gatelab.fit.status import _may_separate, _separated_rows
    g = torch.Generator().manual_seed(dim)
    model = gl.GaussianMoE(3, dim)
    b = 600
    x = torch.rand(b, 200, dim, generator=g, dtype=F64) * 4 - 2
    scale = 10 ** (torch.rand(b, 1, 1, generator=g, dtype=F64) * 3)
    params = {"beta1": torch.randn(b, 3, dim, generator=g, dtype=F64) * scale,
              "beta0": torch.randn(b, 3, generator=g, dtype=F64) * scale[..., 0]}
    full, cheap = _separated_rows(model, x, params), _may_separate(model, x, params)
    scores = model.gate.scores(x, params)
    leads = torch.nn.functional.one_hot(scores.argmax(-1), 3).sum(-2)          # (B, E)
    regular = ((leads == 0) | (leads >= MIN_TRANSITION_SAMPLES)).all(-1)
    assert full.sum() > 20 and (~cheap).sum() > 20        # both outcomes occur
    assert not (full & ~cheap & regular).any()


def test_the_cheap_check_skips_a_steep_gate_whose_gaps_stay_inside_the_transition():
    # the softmax-gaussian truth: gap 25 x - 8 in [-8, 17] over x in [0, 1], never beyond
    # the transition on either side; 45 x - 18 in [-18, 27] neither; 45 x - 22 both sides
    from gatelab.fit.status import _may_separate
    model = gl.GaussianMoE(2, 1)
    x = torch.linspace(0, 1, 50, dtype=F64).view(1, -1, 1)
    assert not _may_separate(model, x, _params([[25.0], [0.0]], [-8.0, 0.0]))
    assert not _may_separate(model, x, _params([[45.0], [0.0]], [-18.0, 0.0]))
    assert _may_separate(model, x, _params([[45.0], [0.0]], [-22.0, 0.0]))
