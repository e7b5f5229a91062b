import numpy as np
import pytest
import torch

import gatelab as gl
from gatelab.fit.lsq import fit_lsq

GEN = lambda s: torch.Generator().manual_seed(s)  # noqa: E731

LSQ_CASES = {
    "softmax-linear": ("softmax", "linear"),
    "sigmoid-relu": ("sigmoid", gl.make_expert("ffn", activation="relu")),
    "sigmoid-gelu": ("sigmoid", gl.make_expert("ffn", activation="gelu")),
    "perturbed_cosine-linear": ("perturbed_cosine", "linear"),
    "quadratic-poly2": ("quadratic", gl.make_expert("polynomial", degree=2)),
    "laplace-linear": ("laplace", "linear"),
}


def _problem(gate, expert, n=800, reps=2, seed=0, noise=0.3):
    g = GEN(seed)
    model = gl.MoERegression(2, 2, gate, expert, covariates=gl.GaussianCovariates(dim=2))
    truth = model.random_params(g)
    truth["nu"] = torch.tensor(0.01, dtype=torch.float64)
    x, y = model.sample(truth, n, g, replicates=reps)
    init = {k: v + noise * torch.randn((reps, *v.shape), generator=g, dtype=v.dtype)
            for k, v in truth.items() if k != "nu"}
    init["nu"] = torch.ones(reps, dtype=torch.float64)
    return model, truth, x, y, init


@pytest.mark.parametrize("case", list(LSQ_CASES), ids=list(LSQ_CASES))
def test_rss_never_increases(case):
    model, truth, x, y, init = _problem(*LSQ_CASES[case])   # far starts: local optima allowed
    res = fit_lsq(model, x, y, init, max_iter=60, record=True)
    steps = torch.diff(res.history, dim=-1)
    assert steps[torch.isfinite(steps)].max() <= 0
    assert torch.all(res.rss <= res.history[..., 0])


@pytest.mark.parametrize("case", list(LSQ_CASES), ids=list(LSQ_CASES))
def test_near_start_fits_at_least_as_well_as_the_truth(case):
    model, truth, x, y, init = _problem(*LSQ_CASES[case], noise=0.05)
    res = fit_lsq(model, x, y, init, max_iter=300)
    truth_rss = (y - model.predict(x, truth)).square().sum(-1)
    assert torch.all(res.rss <= truth_rss * (1 + 1e-9))
    torch.testing.assert_close(res.params["nu"], res.rss / x.shape[-2])


def test_one_expert_softmax_lse_is_linear_regression():
    model = gl.MoERegression(1, 2, "softmax", "linear")
    g = GEN(1)
    x = torch.randn(300, 2, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([0.5, -1.0], dtype=torch.float64) + 2 + torch.randn(300, generator=g,
                                                                             dtype=torch.float64)
    res = fit_lsq(model, x, y, model.random_params(g))
    design = np.column_stack([np.ones(300), x.numpy()])
    coef, rss, *_ = np.linalg.lstsq(design, y.numpy(), rcond=None)
    np.testing.assert_allclose(res.params["b"].numpy(), coef[:1], rtol=1e-9)
    np.testing.assert_allclose(res.params["a"][0].numpy(), coef[1:], rtol=1e-9)
    np.testing.assert_allclose(res.rss.item(), rss[0], rtol=1e-9)


def test_batched_equals_single():
    # A smooth problem: with ReLU kinks, rounding-level differences between batched and
    # single matmuls can move the stopping iteration in the flat tail.
    model, _, x, y, init = _problem("sigmoid", gl.make_expert("ffn", activation="tanh"),
                                    n=400, reps=3, seed=2, noise=0.1)
    batched = fit_lsq(model, x, y, init)
    for r in range(3):
        alone = fit_lsq(model, x[r], y[r], {k: v[r] for k, v in init.items()})
        torch.testing.assert_close(alone.rss, batched.rss[r], rtol=1e-9, atol=1e-12)
        for k in alone.params:
            torch.testing.assert_close(alone.params[k], batched.params[k][r], rtol=1e-5, atol=1e-6)


def test_large_sample_recovers_the_regression_function():
    model, truth, x, y, init = _problem("softmax", "linear", n=20_000, reps=1, seed=3, noise=0.1)
    res = fit_lsq(model, x, y, init)
    grid = model.covariates.sample(500, GEN(4))
    err = (model.predict(grid, {k: v[0] for k, v in res.params.items()})
           - model.predict(grid, truth)).abs().max()
    assert err < 0.05 and bool(res.converged.all())


def test_fixed_gate_entries_stay_fixed():
    model, _, x, y, init = _problem("softmax", "linear", seed=5)
    res = fit_lsq(model, x, y, init)
    assert torch.all(res.params["beta1"][:, -1] == 0) and torch.all(res.params["beta0"][:, -1] == 0)


def test_the_rss_gradient_norm_is_autograd_s_and_vanishes_at_the_fit():
    from gatelab.fit.lsq import rss_gradient_norm
    from gatelab.fit.polish import free_masks
    model, truth, x, y, init = _problem("softmax", "linear", noise=0.05)
    got = rss_gradient_norm(model, x, y, init)
    masks = {k: m for k, m in free_masks(model).items() if k != "nu"}
    for b in range(2):
        params = {k: v[b].detach().clone().requires_grad_(True) for k, v in init.items()}
        mse = (y[b] - model.predict(x[b], params)).square().mean()
        grads = torch.autograd.grad(mse, [params[k] for k in masks])
        want = torch.cat([g[m].reshape(-1) for g, m in zip(grads, masks.values())]).norm()
        assert float(got[b]) == pytest.approx(float(want), rel=1e-10)
    fitted = fit_lsq(model, x, y, init, tol=1e-14, max_iter=300).params
    assert float(rss_gradient_norm(model, x, y, fitted).max()) < 1e-6 * float(got.min())


def test_a_gradient_bound_stops_on_the_certificate_and_says_when_it_was_not_met():
    from gatelab.fit.lsq import rss_gradient_norm
    model, truth, x, y, init = _problem("softmax", "linear", noise=0.05)
    res = fit_lsq(model, x, y, init, grad_bound=1e-9, max_iter=300)
    assert bool(res.converged.all())
    assert float(rss_gradient_norm(model, x, y, res.params).max()) <= 1e-9
    # the protocol's own stop is not a gradient bound: a loose tol stops above it
    loose = fit_lsq(model, x, y, init, tol=1e-3, max_iter=300)
    assert float(rss_gradient_norm(model, x, y, loose.params).max()) > 1e-9
    short = fit_lsq(model, x, y, init, grad_bound=1e-12, max_iter=2)
    assert not bool(short.converged.any()) and set(short.status.tolist()) == {1}  # max_iter
    with pytest.raises(ValueError, match="grad_bound"):
        fit_lsq(model, x, y, init, grad_bound=0.0)


def _autograd_jacobian(model, x_ND, params):
    """df/dtheta over every block but nu, by reverse-mode autograd on one replicate."""
    names = [k for k in model.param_shapes() if k != "nu"]

    def f(*blocks):
        return model.predict(x_ND, {**params, **dict(zip(names, blocks))})
    jac = torch.autograd.functional.jacobian(f, tuple(params[k] for k in names))
    return torch.cat([j.reshape(x_ND.shape[0], -1) for j in jac], dim=-1)


STRUCTURED_CASES = {**LSQ_CASES, "top2-softmax-linear": (gl.make_gate("softmax", top_k=2), "linear"),
                    "cosine-linear": ("cosine", "linear"),
                    "monomial-ffn": ("quadratic_monomial", "ffn")}


@pytest.mark.parametrize("case", list(STRUCTURED_CASES), ids=list(STRUCTURED_CASES))
def test_the_structured_jacobian_is_autograd_s(case):
    gate, expert = STRUCTURED_CASES[case]
    model = gl.MoERegression(3, 2, gate, expert, covariates=gl.GaussianCovariates(dim=2))
    params = model.random_params(GEN(3))
    params["nu"] = torch.tensor(0.01, dtype=torch.float64)
    x = torch.randn(40, 2, generator=GEN(4), dtype=torch.float64)
    f, jac = model.mean_jacobian(x, params)
    torch.testing.assert_close(f, model.predict(x, params), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jac, _autograd_jacobian(model, x, params), rtol=1e-10, atol=1e-12)


def test_the_structured_jacobian_without_a_closed_form_slope(monkeypatch):
    # A normaliser without score_slope takes forward passes through it: the same Jacobian.
    from dataclasses import replace

    from gatelab import gates
    model = gl.MoERegression(3, 2, "softmax", "linear")
    params = model.random_params(GEN(5))
    params["nu"] = torch.tensor(0.01, dtype=torch.float64)
    x = torch.randn(30, 2, generator=GEN(6), dtype=torch.float64)
    want = model.mean_jacobian(x, params)[1]
    plain = replace(gates.NORMALISERS["softmax"], score_slope=None)
    monkeypatch.setitem(gates.NORMALISERS, "softmax", plain)
    torch.testing.assert_close(model.mean_jacobian(x, params)[1], want, rtol=1e-12, atol=1e-13)


def test_a_hierarchical_gate_declines_the_structured_jacobian_and_still_fits():
    gate = gl.HierarchicalGate(outer=gl.make_gate("softmax"), inner=gl.make_gate("softmax"),
                               n_groups=2, n_inner=2)
    model = gl.MoERegression(4, 1, gate, "linear")
    params = model.random_params(GEN(7))
    x = torch.randn(20, 1, generator=GEN(8), dtype=torch.float64)
    assert model.mean_jacobian(x, params) is None


@pytest.mark.parametrize("case", ["sigmoid-gelu", "quadratic-poly2"])
def test_normal_equations_in_chunks_equal_the_whole_jacobian_s(case, monkeypatch):
    """RSS, J^T J and J^T r summed over sample chunks (odd sizes, a short last chunk) are
    those of the whole Jacobian, and a fit in chunks is the fit in one piece."""
    from gatelab.fit import lsq
    model, _, x, y, init = _problem(*LSQ_CASES[case], n=301)
    problem = lsq._Problem(model, x, y, model.normalise(init))
    theta = problem.theta()
    r, jac = problem.jacobian(theta)
    whole = lsq.fit_lsq(model, x, y, init, max_iter=30)
    width = sum(int(np.prod(shape)) for shape in problem.shapes.values())
    monkeypatch.setattr(lsq, "_CHUNK_ELEMENTS", 2 * width * 37)  # 37 rows per chunk, 2 problems
    rss, jtj, grad = problem.normal_equations(theta)
    torch.testing.assert_close(rss, r.square().sum(-1), rtol=1e-12, atol=0)
    torch.testing.assert_close(jtj, jac.mT @ jac, rtol=1e-11, atol=1e-9)
    torch.testing.assert_close(grad, (jac.mT @ r.unsqueeze(-1)).squeeze(-1), rtol=1e-11, atol=1e-9)
    chunked = lsq.fit_lsq(model, x, y, init, max_iter=30)
    torch.testing.assert_close(chunked.rss, whole.rss, rtol=1e-9, atol=0)
