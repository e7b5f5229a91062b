"""A gate that the library has never heard of, defined here and nowhere else: it must fit
by EM through its own closed-form derivatives, score with the Voronoi loss and route in
gatelab.nn, with no edit outside this file (the test of issue 12's "one room per
concept": a new gate touches gates.py, or here a test, only)."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import gatelab as gl
import gatelab.nn as gn
from gatelab.fit import fit_em, random_starts, select_best
from gatelab.fit.newton import grad_and_hessian
from gatelab.gates import Gate, separable_q_derivatives
from gatelab.losses import voronoi_loss
from gatelab.params import pack, unpack

CALLS = {"q_derivatives": 0}


@dataclass(frozen=True, kw_only=True)
class StudentTGate(Gate):
    """s_i(x) = -((nu + D) / 2) log(1 + ||x - W_i||^2 / nu) + beta0_i: the log of a
    Student-t kernel around W_i (heavier tails than the Gaussian gate's).
    Blocks: W (E, D), beta0 (E,)."""

    nu: float = 3.0
    name: ClassVar[str] = "student_t"

    def param_shapes(self, n_experts, dim):
        return {"W": (n_experts, dim), "beta0": (n_experts,)}

    def scores(self, x_ND, params):
        sq = (x_ND.unsqueeze(-2) - params["W"].unsqueeze(-3)).square().sum(-1)
        c = 0.5 * (self.nu + x_ND.shape[-1])
        return -c * torch.log1p(sq / self.nu) + params["beta0"].unsqueeze(-2)

    def q_derivatives(self, x_BND, resp_BNE, params):
        """ds_i/dW_i = 2c (x - W_i) / (nu + u), u = ||x - W_i||^2;
        d2s_i/dW_i^2 = 2c [-I / (nu + u) + 2 (x - W_i)(x - W_i)^T / (nu + u)^2]."""
        CALLS["q_derivatives"] += 1
        d = x_BND.shape[-1]
        c = 0.5 * (self.nu + d)
        diff = x_BND.unsqueeze(1) - params["W"].unsqueeze(-2)            # (B, E, N, D)
        den = self.nu + diff.square().sum(-1)                            # (B, E, N)
        jac = torch.cat([torch.ones_like(den).unsqueeze(-1), 2 * c * diff / den.unsqueeze(-1)], -1)
        eye = torch.eye(d, dtype=x_BND.dtype)

        def curvature(c_BEN):
            out = c_BEN.new_zeros(*c_BEN.shape[:2], d + 1, d + 1)
            outer = diff.unsqueeze(-1) * diff.unsqueeze(-2) / den[..., None, None].square()
            k = 2 * c * (-eye / den[..., None, None] + 2 * outer)
            out[..., 1:, 1:] = torch.einsum("ben,benpq->bepq", c_BEN, k)
            return out

        scores = params["beta0"].unsqueeze(-1) - c * torch.log1p(diff.square().sum(-1) / self.nu)
        return separable_q_derivatives(self, x_BND, resp_BNE, scores, jac, curvature,
                                       ("beta0", "W"))


TRUTH = {"W": torch.tensor([[-1.5], [1.5]], dtype=torch.float64),
         "beta0": torch.tensor([0.4, 0.0], dtype=torch.float64),
         "a": torch.tensor([[2.0], [-1.0]], dtype=torch.float64),
         "b": torch.tensor([0.5, -0.5], dtype=torch.float64),
         "var": torch.tensor([0.2, 0.3], dtype=torch.float64)}


@pytest.mark.parametrize("d", [1, 2])
def test_its_derivatives_equal_autograd(d):
    gate = StudentTGate()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 150, d, generator=g, dtype=torch.float64)
    resp = torch.softmax(torch.randn(2, 150, 3, generator=g, dtype=torch.float64), -1)
    resp = resp * torch.rand(2, 150, 1, generator=g, dtype=torch.float64)
    shapes = gate.param_shapes(3, d)
    params = gate.normalise(gate.random_params(3, d, g, (2,)))
    grad, neg_hess = gate.q_derivatives(x, resp, params)
    free = torch.cat([m.flatten() for m in gate.free_mask(3, d).values()])
    q = lambda t: (resp * gate.log_weights(x, unpack(t, shapes))).sum((-1, -2))  # noqa: E731
    _, g_auto, h_auto = grad_and_hessian(q, pack(params, shapes))
    torch.testing.assert_close(grad, g_auto[:, free], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(neg_hess, -h_auto[:, free][:, :, free], rtol=1e-9, atol=1e-9)


def test_it_fits_by_em_with_its_own_derivatives_and_scores_with_the_voronoi_loss():
    # locations inside the covariates' range: outside it W and beta0 barely separate
    box = gl.covariates.UniformBox(dim=1, low=-3.0, high=3.0)
    model = gl.GaussianMoE(2, 1, StudentTGate(), covariates=box)
    losses = []
    for n in (500, 10000):
        x, y = model.sample(TRUTH, n, torch.Generator().manual_seed(1), replicates=4)
        init = random_starts(model, x, y, 2, torch.Generator().manual_seed(2))
        before = CALLS["q_derivatives"]
        res = select_best(fit_em(model, x, y, init, tol=1e-8, max_iter=1000, record=True))
        assert CALLS["q_derivatives"] > before, "EM did not use the gate's derivatives"
        steps = res.history[..., 1:] - res.history[..., :-1]
        assert bool((steps.nan_to_num(0.0) >= -1e-8 * res.history[..., :1].abs()).all())
        loss = voronoi_loss(res.params, TRUTH, "D1", model=model)
        losses.append(loss.total.median().item())
    # 20x the data: a root-n loss shrinks 4.5x
    assert losses[1] < 0.4 * losses[0], losses
    assert losses[1] < 0.2, losses


def test_it_routes_in_gatelab_nn():
    gate = StudentTGate()
    router = gn.Router(5, 4, 2, gate, bias=True).double()
    x = torch.randn(11, 5, dtype=torch.float64)
    routing = router(x)
    dense = gate.weights(x, {k: v.detach() for k, v in router.scores.params().items()})
    top = dense.topk(2, -1)
    expected = top.values / top.values.sum(-1, keepdim=True)
    torch.testing.assert_close(routing.weight.view(11, 2), expected.detach())
    layer = gn.MoELayer(5, 7, 4, 2, router=gate).double()
    layer(x).output.square().sum().backward()
    assert layer.router.scores.W.grad is not None
    assert bool(layer.router.scores.W.grad.abs().sum() > 0)
