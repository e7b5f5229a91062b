"""The gate's M-step in EM: Newton steps on the gate's part of Q,

    Q_gate(theta) = sum_n sum_i r_ni log w_i(x_n; theta),

that never lower it. Where the gate gives closed-form derivatives
(``Gate.q_derivatives``: softmax, Laplace, Gaussian) they are used; every other gate
(top-K, cosine, quadratic, ...) gets the same step by autograd; a hierarchical gate
takes one such step per level and group (its Q splits, see ``_hierarchical_update``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ... import _experts_first as ef
from ...gates import Gate, HierarchicalGate, LinearGate
from ...params import Params, pack, pick, take_prefix, unpack, with_prefix
from .. import distance_gate
from ..newton import halving_step, newton_ascent, ridged_direction

__all__ = ["gate_q", "expected_log", "slope_penalty", "check_gate_ridge", "gate_update"]


def gate_q(gate: Gate, x_BND: Tensor, resp_BNE: Tensor, gate_params: Params) -> Tensor:
    """sum_n sum_i r_ni log w_i(x_n): the gate's part of Q, (B,). Terms with r = 0 are
    dropped, so that experts top-K removed (log w = -inf) do not give 0 * inf."""
    return expected_log(resp_BNE, gate.log_weights(x_BND, gate_params))


def expected_log(resp_BNE: Tensor, log_w_BNE: Tensor) -> Tensor:
    """sum_n sum_i r_ni log w_ni, (B,), with terms of r = 0 dropped (not 0 * -inf)."""
    return torch.where(resp_BNE > 0, resp_BNE * log_w_BNE, 0.0).sum((-1, -2))


def slope_penalty(params: Params, ridge: float) -> Tensor | float:
    """(ridge / 2) * sum of squared gate slopes (every block named ``beta1``, a
    hierarchical gate's levels included), per problem (B,); 0 when ridge is 0."""
    if ridge == 0:
        return 0.0
    return 0.5 * ridge * sum(v.square().flatten(1).sum(-1) for k, v in params.items()
                             if k.rsplit(".", 1)[-1] == "beta1")


def check_gate_ridge(model, ridge: float) -> None:
    """``gate_ridge`` penalises the slopes of linear (softmax, top-K) gates only."""
    if ridge < 0 or not math.isfinite(ridge):
        raise ValueError(f"gate_ridge must be a finite number >= 0; got {ridge}.")
    if ridge == 0:
        return
    gate = getattr(model, "gate", None)
    levels = [gate.outer, gate.inner] if isinstance(gate, HierarchicalGate) else [gate]
    if not all(isinstance(g, LinearGate) for g in levels):
        raise ValueError(f"gate_ridge penalises the slopes beta1 of linear gates (softmax, "
                         f"topk); the gate of {model!r} has none. Use gate_ridge=0.")


def _irls_softmax(x_BND: Tensor, resp_BNE: Tensor, params: Params, steps: int) -> Params:
    """Newton/IRLS for the softmax gate with the full Hessian and step halving. The last
    expert's row stays fixed (identifiability); theta_i = (beta0_i, beta1_i).

    gradient_i = sum_n (r_ni - R_n w_ni) z_n,  -Hessian_ij = sum_n R_n w_ni (d_ij - w_nj) z_n z_n^T,
    R_n = sum_i r_ni (1 in plain EM; a group's share of the responsibility for the inner
    level of a hierarchical gate). Computed experts-first, (B, E, N): reductions over a
    short last axis are slow.
    """
    z_BPN = torch.cat([torch.ones_like(x_BND[..., :1]), x_BND], dim=-1).transpose(-1, -2).contiguous()
    resp = resp_BNE.transpose(-1, -2).contiguous()
    resp_n = resp.sum(1, keepdim=True)
    # _gate_stats takes rows that sum to 1: give it r / R, and R folded into z and z z^T.
    stats_resp, stats_z, zz = resp, z_BPN, ef.outer(z_BPN.transpose(-1, -2))
    if not bool(((resp_n - 1).abs() <= 1e-12).all()):
        stats_resp = torch.where(resp_n > 0, resp / resp_n, 0.0)
        stats_z, zz = z_BPN * resp_n, zz * resp_n.transpose(-1, -2)
    theta_BEP = torch.cat([params["beta0"].unsqueeze(-1), params["beta1"]], dim=-1)
    b, e, p = theta_BEP.shape
    last = theta_BEP[:, -1:]

    def full(t_BF: Tensor) -> Tensor:
        return torch.cat([t_BF.reshape(-1, e - 1, p), last.expand(t_BF.shape[0], 1, p)], dim=1)

    def q(t_BF: Tensor) -> Tensor:
        s = ef.combine(full(t_BF), z_BPN)
        fit = (resp * s).sum((1, 2))
        _, lse = ef.softmax_experts_first(s)  # overwrites s
        return fit - (resp_n * lse).sum((1, 2))

    theta = theta_BEP[:, :-1].reshape(b, -1)
    for _ in range(steps):
        w, _ = ef.softmax_experts_first(ef.combine(full(theta), z_BPN))
        grad, diag, cross = ef.gate_stats(stats_resp, w, stats_z, zz)
        direction = ridged_direction(grad.reshape(b, -1), ef.neg_hessian(diag, cross))
        theta, _ = halving_step(q, theta, direction, q(theta))
    out = full(theta)
    return {"beta0": out[..., 0], "beta1": out[..., 1:]}


def gate_update(gate: Gate, n_experts: int, x_BND: Tensor, resp_BNE: Tensor,
                gate_params: Params, steps: int, ridge: float = 0.0) -> Params:
    """``steps`` Newton steps on the gate's part of Q, sum_n sum_i r_ni log w_i(x_n), that
    never lower it: IRLS for the plain softmax, closed-form Newton for Laplace and
    Gaussian gates (``distance_gate``), autograd Newton for other gates, and for a
    hierarchical gate one update per level (below). With ``ridge`` > 0 the objective is
    Q - (ridge / 2) ||beta1||^2 (``slope_penalty``), by autograd Newton."""
    if n_experts == 1:  # one expert: the normalised weight is 1 whatever the gate
        return dict(gate_params)
    if isinstance(gate, HierarchicalGate):
        return _hierarchical_update(gate, x_BND, resp_BNE, gate_params, steps, ridge)
    if ridge == 0 and gate.is_linear_softmax():
        return _irls_softmax(x_BND, resp_BNE, gate_params, steps)
    if ridge == 0 and distance_gate.is_distance_gate(gate):
        return distance_gate.distance_gate_update(gate, x_BND, resp_BNE, gate_params, steps)
    shapes = gate.param_shapes(n_experts, x_BND.shape[-1])
    free = pack({k: m.expand(gate_params[k].shape[:1] + m.shape)
                 for k, m in gate.free_mask(n_experts, x_BND.shape[-1]).items()}, shapes)

    def objective(t: Tensor) -> Tensor:
        p = unpack(t, shapes)
        return gate_q(gate, x_BND, resp_BNE, p) - slope_penalty(p, ridge)

    theta, _ = newton_ascent(objective, pack(pick(gate_params, shapes), shapes), free, steps)
    return unpack(theta, shapes)


def _hierarchical_update(gate: HierarchicalGate, x_BND: Tensor, resp_BNE: Tensor,
                         gate_params: Params, steps: int, ridge: float = 0.0) -> Params:
    """The hierarchical gate's Q splits by level (arXiv 2410.02935): with r_n,gj the
    responsibility of expert j of group g and R_ng = sum_j r_n,gj,

        sum_n sum_gj r_n,gj log(w_g(x_n) w_j|g(x_n))
          = sum_n sum_g R_ng log w_g(x_n) + sum_g [sum_n sum_j r_n,gj log w_j|g(x_n)],

    and the parts share no parameter: the outer gate is fitted to R, and each group's
    inner gate to its own experts' responsibilities, the groups as one more batch axis.
    Many small Newton systems instead of one over every block (far fewer autograd passes)."""
    b, n, d = x_BND.shape
    g, j = gate.n_groups, gate.n_inner
    resp_BNGJ = resp_BNE.unflatten(-1, (g, j))
    outer = gate_update(gate.outer, g, x_BND, resp_BNGJ.sum(-1),
                        take_prefix("outer.", gate_params), steps, ridge)
    inner_in = {k: v.flatten(0, 1) for k, v in take_prefix("inner.", gate_params).items()}
    inner = gate_update(gate.inner, j, x_BND.unsqueeze(1).expand(b, g, n, d).flatten(0, 1),
                        resp_BNGJ.movedim(2, 1).flatten(0, 1), inner_in, steps, ridge)
    inner = {k: v.unflatten(0, (b, g)) for k, v in inner.items()}
    return {**with_prefix("outer.", outer), **with_prefix("inner.", inner)}
