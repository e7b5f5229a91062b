"""The M-step parts of EM for Gaussian experts and the E-step of the Gaussian MoE, in the
models' (B, N, E) layout. Each part never lowers the expected log-likelihood Q (an
ECM/GEM step):
- experts linear in their parameters: exact weighted least squares per expert;
- other experts (FFN): damped Newton steps on Q by autograd, with step halving;
- variances: closed form sum_n r_ni (y_n - h_i(x_n))^2 / sum_n r_ni (the exact MLE),
  floored at ``var_floor * Var(y)`` with the fit flagged ``degenerate``;
- the gate: ``gate_step.gate_update``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ... import _experts_first as ef
from ...models import GaussianMoE
from ...params import Params, pack, pick, unpack
from ..newton import newton_ascent
from ..status import MIN_EXPERT_WEIGHT
from .gate_step import gate_update

__all__ = ["e_step", "solve_ridge", "wls_experts", "newton_experts", "variances", "m_step"]


def e_step(model: GaussianMoE, x_BND: Tensor, y_BN: Tensor, params: Params) -> tuple[Tensor, Tensor]:
    """Log-likelihood (B,) and responsibilities (B, N, E)."""
    comp_BNE = model.component_log_probs(x_BND, y_BN, params)
    ll_BN = torch.logsumexp(comp_BNE, dim=-1)
    return ll_BN.sum(-1), torch.exp(comp_BNE - ll_BN.unsqueeze(-1))


def solve_ridge(a: Tensor, b: Tensor, previous: Tensor) -> Tensor:
    """Solve (a + lam I) c = b + lam c_prev with lam = 1e-10 (mean diag(a) + 1): exact
    least squares up to a 1e-10 relative ridge toward the previous value, so that an
    expert with no responsibility (a = 0) keeps its parameters instead of becoming NaN."""
    lam = 1e-10 * (a.diagonal(dim1=-2, dim2=-1).mean(-1) + 1.0)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    return torch.linalg.solve(a + lam[..., None, None] * eye,
                              b + lam[..., None, None] * previous.unsqueeze(-1))


def wls_experts(model: GaussianMoE, x_BND: Tensor, y_BN: Tensor, resp_BNE: Tensor,
                 params: Params) -> Params:
    """Exact weighted least squares per expert: (Z^T R_i Z) c_i = Z^T R_i y, Z = [1, phi(x)]."""
    feats = model.expert.features(x_BND)
    z_BNP = torch.cat([torch.ones_like(feats[..., :1]), feats], dim=-1)
    p = z_BNP.shape[-1]
    rt_BEN = resp_BNE.transpose(-1, -2)
    gram_BEPP = (rt_BEN @ ef.outer(z_BNP)).unflatten(-1, (p, p))
    rhs_BEP = rt_BEN @ (z_BNP * y_BN.unsqueeze(-1))
    has_a = "a" in model.expert_blocks()
    previous = torch.cat([params["b"].unsqueeze(-1)] + ([params["a"]] if has_a else []), dim=-1)
    coef_BEP = solve_ridge(gram_BEPP, rhs_BEP.unsqueeze(-1), previous).squeeze(-1)
    out = {"b": coef_BEP[..., 0]}
    if has_a:
        out["a"] = coef_BEP[..., 1:]
    return out


def weighted_normal_ll(model: GaussianMoE, x_BND, y_BN, resp_BNE, expert_params, var_BE) -> Tensor:
    """sum_n sum_i r_ni log N(y_n | h_i(x_n), var_i): the experts' part of Q, (B,)."""
    mu = model.expert.mean(x_BND, expert_params)
    ll = -0.5 * (torch.log(var_BE).unsqueeze(-2) + (y_BN.unsqueeze(-1) - mu).square()
                 / var_BE.unsqueeze(-2))
    return (resp_BNE * ll).sum((-1, -2))


def newton_experts(model, x_BND, y_BN, resp_BNE, params, steps) -> Params:
    """Experts not linear in their parameters: damped Newton on Q (variances held)."""
    shapes = model.expert_blocks()
    objective = lambda t: weighted_normal_ll(model, x_BND, y_BN, resp_BNE,  # noqa: E731
                                              unpack(t, shapes), params["var"])
    theta, _ = newton_ascent(objective, pack(pick(params, shapes), shapes), steps=steps)
    return unpack(theta, shapes)


def variances(model, x_BND, y_BN, resp_BNE, params, floor_B) -> tuple[Tensor, Tensor]:
    """Closed-form variances, floored; also whether any expert degenerated, (B,). An
    expert with (numerically) no responsibility keeps its variance."""
    mu = model.expert_means(x_BND, params)
    nk_BE = resp_BNE.sum(-2)
    var = (resp_BNE * (y_BN.unsqueeze(-1) - mu).square()).sum(-2) / nk_BE.clamp_min(1e-300)
    var = torch.where(nk_BE > 1e-10, var, params["var"])
    low = (var < floor_B.unsqueeze(-1)) | (nk_BE < MIN_EXPERT_WEIGHT)
    return torch.maximum(var, floor_B.unsqueeze(-1)), low.any(-1)


def _gate_step(model: GaussianMoE, x_BND, resp_BNE, params, steps: int,
               ridge: float = 0.0) -> Params:
    return gate_update(model.gate, model.n_experts, x_BND, resp_BNE,
                       pick(params, model.gate_blocks()), steps, ridge)


def m_step(model: GaussianMoE, x_BND: Tensor, y_BN: Tensor, resp_BNE: Tensor, params: Params,
           floor_B: Tensor, gate_steps: int = 1, gate_ridge: float = 0.0) -> tuple[Params, Tensor]:
    """One ECM update of every block from the responsibilities; returns (params, degenerate).
    ``gate_ridge`` as in ``fit_em``."""
    new = dict(params)
    if model.expert.linear_in_params:
        new.update(wls_experts(model, x_BND, y_BN, resp_BNE, params))
    else:
        new.update(newton_experts(model, x_BND, y_BN, resp_BNE, params, gate_steps))
    new["var"], degenerate = variances(model, x_BND, y_BN, resp_BNE, new, floor_B)
    new.update(_gate_step(model, x_BND, resp_BNE, params, gate_steps, gate_ridge))
    return new, degenerate
