"""Newton steps for the gate part of Q with distance gates (Laplace and Gaussian, arXiv
2402.03226), from closed-form derivatives instead of autograd.

Scores s_i(x) = -rho(||x - W_i||) + beta0_i with rho(d) = d (Laplace) or d^2 (Gaussian);
theta_i = (beta0_i, W_i). With c_ni = r_ni - R_n w_ni and R_n = sum_i r_ni, the gate's Q,
sum_n sum_i r_ni log w_i(x_n), has

    gradient_i  = sum_n c_ni J_ni,            J_ni = ds_i(x_n)/dtheta_i = (1, rho'(d) u_ni),
    Hessian_ij  = -sum_n R_n w_ni (d_ij - w_nj) J_ni J_nj^T + d_ij sum_n c_ni K_ni,

where u_ni = (x_n - W_i) / d_ni and K the second derivative of s_i in W_i:
-(I - u u^T) / d (Laplace) or -2 I (Gaussian). Halving tries the full step first, then
every shorter step of the sequence 1/2, 1/4, ... in one evaluation: the closed-form Q
takes a stack of candidates, where a generic objective needs one call per step.
Shapes: B problems, N samples, D features, E experts, P = 1 + D, K candidates.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..gates import Gate, GaussianGate, LaplaceGate
from ..params import Params
from .newton import newton_direction

__all__ = ["is_distance_gate", "distance_gate_update"]

_HALVINGS = 12
_MAX_ELEMENTS = 2 ** 24


def is_distance_gate(gate: Gate) -> bool:
    """Laplace or Gaussian gate, softmax-normalised and dense: what this module handles."""
    return (type(gate) in (LaplaceGate, GaussianGate) and gate.normaliser == "softmax"
            and gate.top_k is None)


def _distances(x_BND: Tensor, w_BKED: Tensor) -> tuple[Tensor, Tensor]:
    """x_n - W_i, (B, K, E, N, D), and ||x_n - W_i|| floored away from 0, (B, K, E, N)."""
    diff = x_BND[:, None, None] - w_BKED.unsqueeze(-2)
    dist = diff.square().sum(-1).clamp_min(torch.finfo(diff.dtype).tiny).sqrt()
    return diff, dist


def _scores(gate: Gate, dist: Tensor, beta0_BKE: Tensor) -> Tensor:
    rho = dist if isinstance(gate, LaplaceGate) else dist.square()
    return beta0_BKE.unsqueeze(-1) - rho


def _q(gate: Gate, x_BND: Tensor, resp_BEN: Tensor, theta_BKEP: Tensor) -> Tensor:
    """The gate's Q at K candidates per problem: (B, K)."""
    _, dist = _distances(x_BND, theta_BKEP[..., 1:])
    log_w = torch.log_softmax(_scores(gate, dist, theta_BKEP[..., 0]), dim=-2)
    return torch.where(resp_BEN.unsqueeze(1) > 0, resp_BEN.unsqueeze(1) * log_w, 0.0).sum((-1, -2))


def _derivatives(gate: Gate, x_BND: Tensor, resp_BEN: Tensor, theta_BEP: Tensor):
    """Gradient (B, E*P) and negative Hessian (B, E*P, E*P) of the gate's Q."""
    diff, dist = _distances(x_BND, theta_BEP[:, None, :, 1:])
    diff, dist = diff[:, 0], dist[:, 0]
    w = torch.softmax(_scores(gate, dist, theta_BEP[..., 0]), dim=-2)                 # (B, E, N)
    big_r = resp_BEN.sum(1, keepdim=True)
    c = resp_BEN - big_r * w
    laplace = isinstance(gate, LaplaceGate)
    dw = diff / dist.unsqueeze(-1) if laplace else 2 * diff                      # ds/dW
    jac = torch.cat([torch.ones_like(dist).unsqueeze(-1), dw], dim=-1)           # (B, E, N, P)
    b, e, n, p = jac.shape
    grad = torch.einsum("ben,benp->bep", c, jac)
    rw = big_r * w
    neg = torch.einsum("ben,benp,benq->bepq", rw, jac, jac)                      # diagonal blocks
    cross = torch.einsum("ben,bfn,benp,bfnq->befpq", rw, w, jac, jac)
    eye_e = torch.eye(e, dtype=jac.dtype, device=jac.device)
    neg_hess = neg.unsqueeze(2) * eye_e.view(1, e, e, 1, 1) - cross            # (B, E, E, P, P)
    d = p - 1
    eye_d = torch.eye(d, dtype=jac.dtype, device=jac.device)
    if laplace:  # K = -(I - u u^T) / d
        u = diff / dist.unsqueeze(-1)
        # A sample at a location (random starts put W_i on a data point) sits on the
        # cone's tip, where s_i has no curvature to speak of: 1 / d there (1e154) would
        # swamp the Hessian and freeze the gate. Such samples add no curvature.
        inv = torch.where(dist > 1e-8 * dist.amax(-1, keepdim=True), 1 / dist, 0.0)
        curv = -(eye_d - u.unsqueeze(-1) * u.unsqueeze(-2)) * inv[..., None, None]
        k_sum = torch.einsum("ben,benpq->bepq", c, curv)
    else:        # K = -2 I
        k_sum = -2 * c.sum(-1)[..., None, None] * eye_d
    idx = torch.arange(e)
    neg_hess[:, idx, idx, 1:, 1:] -= k_sum
    return grad.reshape(b, e * p), neg_hess.permute(0, 1, 3, 2, 4).reshape(b, e * p, e * p)


def _halve(gate: Gate, x_BND: Tensor, resp_BEN: Tensor, theta: Tensor, direction: Tensor,
           value: Tensor, shape) -> Tensor:
    """The longest step of 1, 1/2, 1/4, ... that does not lower Q (theta where none)."""
    def q(steps_K: Tensor, rows) -> Tensor:
        cand = theta[rows, None] + steps_K[:, None] * direction[rows, None]
        return _q(gate, x_BND[rows], resp_BEN[rows], cand.reshape(*cand.shape[:2], *shape))

    everyone = torch.arange(theta.shape[0])
    full = q(theta.new_ones(1), everyone)[:, 0]
    ok = torch.isfinite(full) & (full >= value)
    out = torch.where(ok.unsqueeze(-1), theta + direction, theta)
    rows = (~ok).nonzero().squeeze(-1)
    if rows.numel():
        steps = 0.5 ** torch.arange(1, _HALVINGS, dtype=theta.dtype, device=theta.device)
        # as many candidates per call as keep the (rows, K, E, N, D) differences small
        per_call = max(1, _MAX_ELEMENTS // (rows.numel() * x_BND[0].numel() * shape[0]))
        vals = torch.cat([q(chunk, rows) for chunk in steps.split(per_call)], dim=-1)
        good = torch.isfinite(vals) & (vals >= value[rows].unsqueeze(-1))
        first = torch.where(good.any(-1), good.float().argmax(-1), -1)
        step = torch.where(first >= 0, steps[first.clamp_min(0)], 0.0)
        out[rows] = theta[rows] + step.unsqueeze(-1) * direction[rows]
    return out


def distance_gate_update(gate: Gate, x_BND: Tensor, resp_BNE: Tensor, params: Params,
                         steps: int) -> Params:
    """``steps`` damped Newton steps on the gate's part of Q; never lowers it. The last
    expert's intercept stays at 0 (identifiability), every location moves."""
    resp = resp_BNE.transpose(-1, -2)
    theta_BEP = torch.cat([params["beta0"].unsqueeze(-1), params["W"]], dim=-1)
    b, e, p = theta_BEP.shape
    free = torch.ones(e, p, dtype=torch.bool)
    free[-1, 0] = False
    free = free.reshape(1, -1).expand(b, -1)
    theta = theta_BEP.reshape(b, -1)
    for _ in range(steps):
        value = _q(gate, x_BND, resp, theta.reshape(b, 1, e, p))[:, 0]
        grad, neg_hess = _derivatives(gate, x_BND, resp, theta.reshape(b, e, p))
        direction = newton_direction(grad, neg_hess, free)
        theta = _halve(gate, x_BND, resp, theta, direction, value, (e, p))
    out = theta.reshape(b, e, p)
    return {"beta0": out[..., 0], "W": out[..., 1:]}
