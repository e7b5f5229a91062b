"""EM for models with a known component (deviated and contaminated MoE), and their
studies."""

import math

import pytest
import torch

import gatelab as gl
from cases import assert_rows_score_their_estimates
from gatelab.fit import fit_em, select_best
from gatelab.fit.init import near_truth_known
from gatelab.losses import voronoi_loss, wasserstein
from gatelab.studies import Store, catalogue, rate_table, reproduce

T = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731


def _g0(mean_slope=0.0):
    base = gl.GaussianMoE(1, 1)
    return base.freeze({"beta1": T([[0.0]]), "beta0": T([0.0]), "a": T([[mean_slope]]),
                        "b": T([0.0]), "var": T([1.0])})


DEVIATED = {"lam": T(0.6), "beta0": T([0.3, 0.0]), "a": T([[-2.0], [2.0]]), "b": T([1.0, -1.0]),
            "var": T([0.1, 0.2])}
PROMPT = {"beta1": T([[1.5]]), "beta0": T([-0.5]), "a": T([[2.0]]), "b": T([1.0]), "var": T([0.3])}


def _data(model, truth, n, seed=0, replicates=None):
    return model.sample(truth, n, torch.Generator().manual_seed(seed), replicates=replicates)


def _shifted(truth, by=0.05):
    out = {k: v + by for k, v in truth.items()}
    if "lam" in out:
        out["lam"] = truth["lam"] - by
    return out


@pytest.mark.parametrize("accelerate", [False, True], ids=["plain", "squarem"])
@pytest.mark.parametrize("case", ["deviated", "contaminated-softmax"])
def test_em_never_decreases_the_log_likelihood(case, accelerate):
    if case == "deviated":
        model, truth = gl.DeviatedGaussianMoE(_g0(), 3, 1), DEVIATED
        init = near_truth_known(model, truth, 500, 1, torch.Generator().manual_seed(3))
        data_model = gl.DeviatedGaussianMoE(_g0(), 2, 1)
    else:
        model = data_model = gl.ContaminatedMoE(_g0(), 1, gate="softmax")
        truth, init = PROMPT, _shifted(PROMPT, 0.3)
    x, y = _data(data_model, truth, 500)
    res = fit_em(model, x, y, init, tol=1e-12, max_iter=60, accelerate=accelerate, record=True)
    trace = res.history.reshape(-1)
    trace = trace[torch.isfinite(trace)]
    assert trace.numel() >= 5
    assert (trace.diff() >= -1e-9 * trace[:-1].abs()).all()


def test_contaminated_input_free_prompt_is_a_one_expert_deviated_moe():
    """Two code paths, one model: (1 - lam) f0 + lam N(a x + b, var)."""
    contaminated = gl.ContaminatedMoE(_g0(1.0), 1, gate="input_free")
    deviated = gl.DeviatedGaussianMoE(_g0(1.0), 1, 1)
    truth = {"lam": T(0.4), "a": T([[3.0]]), "b": T([-1.0]), "var": T([0.2])}
    x, y = _data(contaminated, truth, 2000, seed=1)
    init = _shifted(truth, 0.1)
    a = fit_em(contaminated, x, y, init, tol=1e-12, max_iter=500)
    b = fit_em(deviated, x, y, {**init, "beta0": T([0.0])}, tol=1e-12, max_iter=500)
    torch.testing.assert_close(a.loglik, b.loglik, rtol=1e-12, atol=1e-9)
    for k in truth:
        torch.testing.assert_close(a.params[k], b.params[k], rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("case", ["deviated", "contaminated-softmax"])
def test_large_sample_recovers_the_truth(case):
    if case == "deviated":
        model, truth = gl.DeviatedGaussianMoE(_g0(), 2, 1), DEVIATED
    else:
        model, truth = gl.ContaminatedMoE(_g0(), 1, gate="softmax"), PROMPT
    x, y = _data(model, truth, 40000, seed=2)
    init = _shifted(truth, 0.4)
    # Every block far enough that staying at the start (a no-op M-step) fails below.
    assert min(float((init[k] - v).abs().max()) for k, v in truth.items()) > 3 * 0.08
    res = fit_em(model, x, y, init, tol=1e-10, max_iter=2000, accelerate=True)
    assert bool(res.converged)
    for k, v in truth.items():
        torch.testing.assert_close(res.params[k], v, rtol=0, atol=0.08)


def test_batched_fit_equals_fitting_each_replicate_alone():
    model = gl.DeviatedGaussianMoE(_g0(), 2, 1)
    x, y = _data(model, DEVIATED, 400, seed=4, replicates=3)
    init = _shifted(DEVIATED)
    batched = fit_em(model, x, y, init, tol=1e-9, max_iter=300)
    for r in range(3):
        alone = fit_em(model, x[r], y[r], init, tol=1e-9, max_iter=300)
        torch.testing.assert_close(batched.loglik[r], alone.loglik)
        assert int(batched.n_iter[r]) == int(alone.n_iter)
        for k in DEVIATED:
            torch.testing.assert_close(batched.params[k][r], alone.params[k])


def test_voronoi_loss_with_deviated_masses_by_hand():
    truth = {"a": T([[0.0], [4.0]]), "b": T([0.0, 0.0]), "var": T([1.0, 1.0])}
    est = {"a": T([[0.5], [4.0]]), "b": T([0.0, 0.0]), "var": T([1.0, 1.0])}
    # masses lam * p: truth 0.5 * (0.5, 0.5); estimate 0.6 * (0.5, 0.5)
    loss = voronoi_loss(est, truth, "D1", mass=T([0.3, 0.3]), true_mass=T([0.25, 0.25]))
    assert float(loss.total) == pytest.approx(0.05 + 0.05 + 0.3 * 0.5)
    assert float(wasserstein(est, truth, 1, mass=T([0.3, 0.3]),
                             true_mass=T([0.25, 0.25]))) == pytest.approx(0.5 * 0.5)


@pytest.mark.parametrize("name", ["deviated", "contaminated"])
def test_known_part_studies_run_end_to_end(name, tmp_path):
    study = catalogue.get(name)
    study = type(study).from_dict({**study.to_dict(), "quick_sizes": [300, 1200],
                                   "quick_replicates": 3})
    with Store(tmp_path / "s.sqlite") as store:
        reproduce(study, store, quick=True, progress=False)
        rows = store.rows(name)
        table = rate_table(study, rows, n_boot=50)
    assert len(rows) == 2 * 3 * len(study.settings)
    assert all(math.isfinite(r.loss) for r in rows)
    assert {"W1"} <= set(rows[0].blocks)
    assert_rows_score_their_estimates(study, rows)
    assert {r["setting"] for r in table} == {s.name for s in study.settings}


def test_near_truth_known_keeps_lam_inside_the_unit_interval():
    model = gl.DeviatedGaussianMoE(_g0(), 3, 1)
    starts = near_truth_known(model, {**DEVIATED, "lam": T(0.999)}, 100, 5,
                              torch.Generator().manual_seed(0))
    assert starts["a"].shape == (5, 3, 1) and starts["lam"].shape == (5,)
    assert bool((starts["lam"] <= 0.99).all())
    best = select_best(fit_em(model, *_data(gl.DeviatedGaussianMoE(_g0(), 2, 1), DEVIATED, 300),
                              starts, max_iter=20))
    assert torch.isfinite(best.loglik)
