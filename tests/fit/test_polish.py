"""Certified convergence (issue 14, reading (b)): the Newton polish reaches its gradient
bound, never lowers the log-likelihood, and its closed-form derivatives are the autograd
ones; the certificate is checked against finite differences, not against itself."""

from __future__ import annotations

import pytest
import torch

from gatelab.fit import _fused, fit_em, near_truth, select_best
from gatelab.fit.newton import grad_and_hessian
from gatelab.fit.polish import (
    _closed_form,
    _derivatives,
    _masks,
    _objective,
    _Packing,
    _softmax_linear_derivatives,
    free_masks,
    gradient_norm,
    polish,
)
from gatelab.models import GaussianMoE

F64 = torch.float64
TRUTH = {"beta1": torch.tensor([[8.0], [0.0]], dtype=F64), "beta0": torch.tensor([-4.0, 0.0], dtype=F64),
         "a": torch.tensor([[-3.0], [3.0]], dtype=F64), "b": torch.tensor([2.0, -1.0], dtype=F64),
         "var": torch.tensor([0.09, 0.16], dtype=F64)}


def _data(n: int, replicates: int, seed: int = 0):
    truth_model = GaussianMoE(2, 1)   # x uniform on [0, 1]
    g = torch.Generator().manual_seed(seed)
    xs, ys = zip(*(truth_model.sample(TRUTH, n, g) for _ in range(replicates)))
    return torch.stack(xs), torch.stack(ys), g


def _em_fit(k: int, n: int = 600, replicates: int = 4):
    x, y, g = _data(n, replicates)
    model = GaussianMoE(k, 1)
    init = near_truth(model, TRUTH, n, 1, replicates, generator=g)
    return model, x, y, select_best(fit_em(model, x, y, init, tol=1e-4))


@pytest.mark.parametrize("expert, dim", [("linear", 1), ("linear", 2), ("polynomial", 2)])
def test_closed_form_derivatives_are_autograd_s(expert, dim):
    model = GaussianMoE(3, dim, "softmax", expert)
    assert _closed_form(model)
    g = torch.Generator().manual_seed(3)
    params = {k: v.to(F64) for k, v in model.random_params(g, (2,)).items()}
    x = torch.randn(2, 150, dim, generator=g, dtype=F64)
    y = torch.randn(2, 150, generator=g, dtype=F64)
    packing = _Packing(free_masks(model), params)
    theta = packing.pack(params)
    want = grad_and_hessian(lambda t: model.log_likelihood(x, y, packing.unpack(t)), theta)
    got = _softmax_linear_derivatives(model, x, y, params, packing, chunk=37)  # several chunks
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-9)


@pytest.mark.skipif(_fused.load() is None, reason="no C compiler: no fused kernel")
@pytest.mark.parametrize("k, expert, dim, blocks", [(2, "linear", 1, None), (4, "linear", 1, None),
                                                    (3, "linear", 2, None), (3, "polynomial", 2, None),
                                                    (3, "linear", 1, ("a", "var"))])
def test_c_derivatives_and_values_are_autograd_s(k, expert, dim, blocks):
    """The polish's derivatives in C (``_derivatives`` where the fused kernel is built),
    over 300 samples (a full block of 256 and a partial one), against autograd on the
    PyTorch log-likelihood; the step search's objective is the same log-likelihood."""
    model = GaussianMoE(k, dim, "softmax", expert)
    g = torch.Generator().manual_seed(5)
    params = {n: v.to(F64) for n, v in model.random_params(g, (3,)).items()}
    x = torch.randn(3, 300, dim, generator=g, dtype=F64)
    y = torch.randn(3, 300, generator=g, dtype=F64)
    packing = _Packing(_masks(model, blocks), params)
    theta = packing.pack(params)
    want = grad_and_hessian(lambda t: model.log_likelihood(x, y, packing.unpack(t)), theta)
    got = _derivatives(model, x, y, packing, torch.arange(3), theta)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(_objective(model, x, y, packing, torch.arange(3))(theta), want[0],
                               rtol=1e-12, atol=0)


def test_other_gates_and_experts_take_autograd():
    assert not _closed_form(GaussianMoE(2, 1, "laplace"))
    assert not _closed_form(GaussianMoE(2, 1, "softmax", "constant"))


def _finite_difference_norm(model, x, y, params, h=1e-6):
    """The certificate by central differences in the packed coordinates."""
    packing = _Packing(free_masks(model), params)
    theta = packing.pack(params)
    grads = []
    for p in range(theta.shape[-1]):
        step = torch.zeros_like(theta)
        step[:, p] = h
        up = model.log_likelihood(x, y, packing.unpack(theta + step))
        down = model.log_likelihood(x, y, packing.unpack(theta - step))
        grads.append((up - down) / (2 * h))
    return torch.stack(grads, -1).norm(dim=-1) / x.shape[-2]


@pytest.mark.parametrize("k", [2, 3])
def test_polish_reaches_the_bound_by_finite_differences(k):
    model, x, y, res = _em_fit(k)
    bound = 1e-7
    before = _finite_difference_norm(model, x, y, res.params)
    assert bool((before > bound).any())   # EM at tol 1e-4 left something to do
    done = polish(model, x, y, res.params, bound=bound)
    assert bool((done.grad_norm <= bound).all())
    # 1e-6 steps on a sum of 600 terms: differences are good to about 1e-8 per sample.
    assert bool((_finite_difference_norm(model, x, y, done.params) <= bound + 1e-7).all())
    torch.testing.assert_close(done.grad_norm, gradient_norm(model, x, y, done.params))


def test_polish_never_lowers_the_log_likelihood():
    model, x, y, res = _em_fit(3)
    g = torch.Generator().manual_seed(9)
    # far starts too: a step that would lower the likelihood must be refused
    far = {k: v + (0.5 * torch.randn(v.shape, generator=g, dtype=F64) if k != "var" else 0.0)
           for k, v in res.params.items()}
    for start in (res.params, far):
        done = polish(model, x, y, start, max_steps=5)
        assert bool((done.gain >= 0).all())
        torch.testing.assert_close(done.gain, done.loglik - model.log_likelihood(x, y, start))


def test_polish_at_a_maximum_takes_no_step_and_keeps_fixed_entries():
    model, x, y, res = _em_fit(2)
    done = polish(model, x, y, polish(model, x, y, res.params, bound=1e-9).params, bound=1e-6)
    assert bool((done.steps == 0).all()) and bool((done.gain == 0).all())
    # the reference expert's gate entries stay at 0 (identifiability), variances positive
    assert bool((done.params["beta1"][:, -1] == 0).all() and (done.params["beta0"][:, -1] == 0).all())
    assert bool((done.params["var"] > 0).all())


def test_polish_with_autograd_derivatives_reaches_the_bound():
    x, y, g = _data(500, 2, seed=4)
    model = GaussianMoE(2, 1, "laplace")
    init = {k: v.to(F64) for k, v in model.random_params(g, (2,)).items()}
    res = fit_em(model, x, y, init, tol=1e-4)
    done = polish(model, x, y, res.params, bound=1e-6, max_steps=60)
    assert bool((done.gain >= 0).all()) and bool((done.grad_norm <= 1e-6).all())
    assert bool((_finite_difference_norm(model, x, y, done.params) <= 1e-6 + 1e-7).all())


def test_polish_rejects_a_bound_of_zero():
    model, x, y, res = _em_fit(2, n=100, replicates=1)
    with pytest.raises(ValueError, match="bound must be > 0"):
        polish(model, x, y, res.params, bound=0.0)
