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

from ...gates import Gate, HierarchicalGate, LinearGate
from ...params import Params, pack, pick, take_prefix, unpack, with_prefix
from ..newton import at_stationary_point, halving_step, newton_ascent, newton_direction, ridged_direction

__all__ = ["gate_q", "expected_log", "slope_penalty", "check_gate_ridge", "gate_update",
           "closed_form_update"]


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


def closed_form_update(gate: Gate, n_experts: int, x_BND: Tensor, resp_BNE: Tensor,
                       gate_params: Params, steps: int) -> Params | None:
    """``steps`` Newton steps from the gate's own derivatives (``Gate.q_derivatives``),
    each halved (1, 1/2, ..., 1/2^11) until Q does not decrease (rows already at a
    stationary point, ``at_stationary_point``, keep theta); None where the gate gives
    none. Concave Q (softmax): the ridged Cholesky step of the C kernel
    (``ridged_direction``); otherwise the autograd path's rule (``newton_direction``,
    absolute eigenvalues where the system is indefinite)."""
    shapes = gate.param_shapes(n_experts, x_BND.shape[-1])
    free = torch.cat([m.flatten() for m in gate.free_mask(n_experts, x_BND.shape[-1]).values()])
    theta = pack(pick(gate_params, shapes), shapes)
    q = lambda t: gate_q(gate, x_BND, resp_BNE, unpack(t, shapes))  # noqa: E731
    for _ in range(steps):
        derivatives = gate.q_derivatives(x_BND, resp_BNE, unpack(theta, shapes))
        if derivatives is None:
            return None
        grad, neg_hess = derivatives
        direction = torch.zeros_like(theta)
        if gate.q_concave:
            direction[:, free] = ridged_direction(grad, neg_hess)
        else:  # the rule of the autograd path, on the same full system
            direction = newton_direction(*_embed(grad, neg_hess, free), free.expand_as(theta))
        value = q(theta)
        theta, _ = halving_step(q, theta, direction, value,
                                skip=at_stationary_point(grad, direction[:, free], value))
    return unpack(theta, shapes)


def _embed(grad: Tensor, neg_hess: Tensor, free: Tensor) -> tuple[Tensor, Tensor]:
    """Derivatives over the free entries as the full system over every entry (zeros
    elsewhere), as the autograd path builds it."""
    b, f = grad.shape[0], free.numel()
    g = grad.new_zeros(b, f)
    g[:, free] = grad
    h = neg_hess.new_zeros(b, f, f)
    h[:, free.nonzero().squeeze(-1)[:, None], free] = neg_hess
    return g, h


def gate_update(gate: Gate, n_experts: int, x_BND: Tensor, resp_BNE: Tensor,
                gate_params: Params, steps: int, ridge: float = 0.0) -> Params:
    """``steps`` Newton steps on the gate's part of Q, sum_n sum_i r_ni log w_i(x_n), that
    never lower it: Newton from the gate's own derivatives where it gives them
    (``closed_form_update``: IRLS for the dense softmax, Laplace and Gaussian gates),
    autograd Newton for other gates, and for a hierarchical gate one update per level
    (below). With ``ridge`` > 0 the objective is
    Q - (ridge / 2) ||beta1||^2 (``slope_penalty``), by autograd Newton."""
    if n_experts == 1:  # one expert: the normalised weight is 1 whatever the gate
        return dict(gate_params)
    if isinstance(gate, HierarchicalGate):
        return _hierarchical_update(gate, x_BND, resp_BNE, gate_params, steps, ridge)
    if ridge == 0:
        closed = closed_form_update(gate, n_experts, x_BND, resp_BNE, gate_params, steps)
        if closed is not None:
            return closed
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
