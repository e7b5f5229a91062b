"""The model and estimator interfaces (issue 12, points 1 and 5): mixing measures by hand
for every model kind, the Voronoi loss read through them, and the estimator registry."""

from __future__ import annotations

import math

import pytest
import torch

import gatelab as gl
from gatelab.fit import fit_lsq
from gatelab.fit.estimators import ESTIMATORS, estimator
from gatelab.losses import voronoi_loss, wasserstein

F64 = torch.float64
T = lambda v: torch.tensor(v, dtype=F64)  # noqa: E731


def test_softmax_and_sigmoid_measures():
    params = {"beta1": T([[2.0], [0.0]]), "beta0": T([0.5, 0.0]), "a": T([[-1.0], [1.0]]),
              "b": T([1.0, -1.0]), "var": T([0.5, 0.25])}
    m = gl.GaussianMoE(2, 1).mixing_measure(params)
    assert m.relative and m.atoms == ("beta1", "a", "b", "var")
    torch.testing.assert_close(m.masses, T([math.exp(0.5), 1.0]))
    reg = gl.MoERegression(2, 1, "sigmoid")
    s = reg.mixing_measure({**params, "nu": T(0.1)})
    assert not s.relative and s.atoms == ("beta1", "a", "b")          # nu has no expert axis
    torch.testing.assert_close(s.masses, torch.sigmoid(params["beta0"]))


def test_hierarchical_top_k_and_known_part_measures():
    hier = gl.HierarchicalGaussianMoE(2, 2, 1, outer="softmax", inner="laplace")
    p = hier.random_params(torch.Generator().manual_seed(0))
    m = hier.mixing_measure(p)
    want = (torch.softmax(p["outer.beta0"], -1).unsqueeze(-1) * torch.softmax(p["inner.beta0"], -1)).flatten()
    torch.testing.assert_close(m.masses, want)
    assert m.atoms == ("inner.W", "a", "b", "var") and not m.relative
    top1 = gl.GaussianMoE(2, 1, gl.make_gate("topk", top_k=1))
    q = {"beta1": T([[10.0], [0.0]]), "beta0": T([-3.0, 0.0]), "a": T([[1.0], [2.0]]),
         "b": T([0.0, 1.0]), "var": T([1.0, 1.0])}
    # x uniform on [0, 1], expert 0 selected where 10x - 3 > 0: with probability 0.7
    torch.testing.assert_close(top1.mixing_measure(q).masses, T([0.7, 0.3]), atol=1e-12, rtol=0)
    g0 = gl.GaussianMoE(1, 1).freeze({"beta1": T([[0.0]]), "beta0": T([0.0]), "a": T([[0.0]]),
                                     "b": T([0.0]), "var": T([1.0])})
    dev = gl.DeviatedGaussianMoE(g0, 2, 1)
    d = dev.mixing_measure({"lam": T(0.4), "beta0": T([0.0, math.log(3.0)]), "a": T([[1.0], [2.0]]),
                            "b": T([0.0, 1.0]), "var": T([1.0, 1.0])})
    torch.testing.assert_close(d.masses, T([0.1, 0.3]))
    assert d.atoms == ("a", "b", "var")
    cont = gl.ContaminatedMoE(g0, 1, gate="softmax")
    c = cont.mixing_measure({"beta1": T([[1.0]]), "beta0": T([0.3]), "a": T([[1.0]]), "b": T([0.0]),
                             "var": T([1.0])})
    torch.testing.assert_close(c.masses, torch.sigmoid(T([0.3])))


def test_the_loss_through_the_model_equals_the_explicit_masses():
    g0 = gl.GaussianMoE(1, 1).freeze({"beta1": T([[0.0]]), "beta0": T([0.0]), "a": T([[0.0]]),
                                     "b": T([0.0]), "var": T([1.0])})
    dev = gl.DeviatedGaussianMoE(g0, 2, 1)
    truth = {"lam": T(0.5), "beta0": T([0.0, 0.0]), "a": T([[0.0], [4.0]]), "b": T([0.0, 0.0]),
             "var": T([1.0, 1.0])}
    est = {**truth, "lam": T(0.6), "a": T([[0.5], [4.0]])}
    by_model = voronoi_loss(est, truth, "D1", model=dev)
    by_hand = voronoi_loss(est, truth, "D1", blocks=["a", "b", "var"], mass=T([0.3, 0.3]),
                           true_mass=T([0.25, 0.25]))
    torch.testing.assert_close(by_model.total, by_hand.total)
    assert float(by_model.total) == pytest.approx(0.05 + 0.05 + 0.3 * 0.5)
    assert float(wasserstein(est, truth, 1, model=dev)) == pytest.approx(0.25)


def test_estimators_check_their_model_and_return_one_result_type():
    assert set(ESTIMATORS) == {"em", "segments", "lsq", "continuation"}
    reg = gl.MoERegression(2, 1, "sigmoid")
    with pytest.raises(ValueError, match="EM fits densities"):
        estimator("em").fit(reg, None, None, None)
    with pytest.raises(ValueError, match="Least squares fits regressions"):
        estimator("lsq").fit(gl.GaussianMoE(2, 1), None, None, None)
    with pytest.raises(ValueError, match="fit_topk_segments fits"):
        estimator("segments").fit(gl.GaussianMoE(2, 1), None, None, None)
    with pytest.raises(ValueError, match="fit_topk_continuation fits"):
        estimator("continuation").fit(gl.GaussianMoE(2, 2), None, None, None)
    with pytest.raises(ValueError, match="Unknown estimator 'adam'"):
        estimator("adam")
    g = torch.Generator().manual_seed(0)
    truth = reg.random_params(g)
    truth["nu"] = T(0.01)
    x, y = reg.sample(truth, 300, g)
    init = {k: v.unsqueeze(0) for k, v in truth.items()}
    # accelerate is an EM option: the least-squares estimator leaves it out
    res = estimator("lsq").fit(reg, x, y, init, tol=1e-8, accelerate=True)
    plain = fit_lsq(reg, x, y, init, tol=1e-8)
    assert type(res).__name__ == "FitResult"
    torch.testing.assert_close(res.loglik, -150 * (torch.log(2 * math.pi * plain.rss / 300) + 1))
    assert estimator("em").options()["tol"] == 1e-6 and "accelerate" not in estimator("lsq").options()


def test_start_schemes_are_named_by_model_class():
    from gatelab.fit.init import NEAR_TRUTH, near_truth_known, near_truth_starts
    g0 = gl.GaussianMoE(1, 1).freeze({"beta1": T([[0.0]]), "beta0": T([0.0]), "a": T([[0.0]]),
                                     "b": T([0.0]), "var": T([1.0])})
    dev = gl.DeviatedGaussianMoE(g0, 2, 1)
    assert NEAR_TRUTH[type(dev)] is near_truth_known
    truth = {"lam": T(0.5), "beta0": T([0.0, 0.0]), "a": T([[0.0], [4.0]]), "b": T([0.0, 0.0]),
             "var": T([1.0, 1.0])}
    a = near_truth_starts(dev, truth, 1000, 3, torch.Generator().manual_seed(0))
    b = near_truth_known(dev, truth, 1000, 3, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a[k], b[k]) for k in b)
    # a softmax fit to a Laplace truth starts flat, at the truth's experts and intercepts
    laplace_truth = {"W": T([[0.2], [0.8]]), "beta0": T([0.3, 0.0]), "a": T([[1.0], [-1.0]]),
                     "b": T([0.0, 1.0]), "var": T([0.1, 0.1])}
    s = near_truth_starts(gl.GaussianMoE(2, 1), laplace_truth, 1000, 2, torch.Generator().manual_seed(0))
    assert set(s) == {"beta1", "beta0", "a", "b", "var"} and float(s["beta1"].abs().max()) < 0.01
