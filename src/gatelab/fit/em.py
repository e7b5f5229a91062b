"""Batched EM for the Gaussian MoE (maximum likelihood).

One call fits B problems at once (replicates x restarts flattened into one batch
axis): every E- and M-step is a tensor program over (B, N, E), and a problem that has
converged leaves the batch, so the others do not pay for it.

E-step: responsibilities r_ni = w_i(x_n) N(y_n | h_i(x_n), var_i) / p(y_n | x_n) in log
space. M-step (an ECM/GEM step: each part never lowers the expected log-likelihood Q):
- experts linear in their parameters: exact weighted least squares per expert;
- other experts (FFN): damped Newton steps on Q by autograd, with step halving;
- variances: closed form sum_n r_ni (y_n - h_i(x_n))^2 / sum_n r_ni (the exact MLE),
  floored at ``var_floor * Var(y)`` with the fit flagged ``degenerate``;
- the softmax gate: Newton/IRLS with the full Hessian and step halving; Laplace and
  Gaussian gates: the same Newton step from closed-form derivatives (``distance_gate``);
  every other gate (top-K, cosine, quadratic, ...): the same step by autograd; a
  hierarchical gate: one such step per level and group (its Q splits, see
  ``_hierarchical_update``).
Stopping: |l_t - l_{t-1}| <= tol |l_{t-1}| on the log-likelihood l, or ``max_iter``.
Limitation: with top-K gates the gate step cannot move the selection boundaries (a sample
whose kept experts change gets Q = -inf, so halving refuses the step); fits keep the
selection regions of their start. Top-1 from a flat start never moves its gate.
``accelerate=True`` uses SQUAREM extrapolation (Varadhan & Roland 2008) with a fall-back
to plain EM steps whenever the extrapolated cycle ends lower, so the log-likelihood still
never decreases; it matters most for over-specified fits, where plain EM crawls.

Two kernels implement the same steps: ``_GeneralKernel`` (any gate and expert; the
reference) and ``_SoftmaxLinearKernel`` (softmax gate with experts linear in their
parameters, the common case, several times faster). Tests check that they agree.

Shape legend: B problems, N samples, D features, E experts, P parameters.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import broadcast_shapes, check_inputs, check_int, check_positive
from .._runtime import keep_freed_memory
from .._threads import split_threads, threads_for, using_threads
from ..gates import Gate, HierarchicalGate, LinearGate
from ..models import GaussianMoE
from ..params import Params, pack, pick, take_prefix, unpack, with_prefix
from . import _fused
from .distance_gate import distance_gate_update, is_distance_gate
from .newton import halving_step, newton_ascent, ridged_direction
from .status import MIN_EXPERT_WEIGHT, fit_status

__all__ = ["FitResult", "fit_em", "select_best", "e_step", "m_step", "gate_update"]


class FitResult(NamedTuple):
    """Fitted parameters and diagnostics, one entry per problem in the batch."""

    params: Params
    loglik: Tensor       # (*batch,) final log-likelihood
    n_iter: Tensor       # (*batch,) EM updates done
    converged: Tensor    # (*batch,) bool: stopped on the tolerance, not on max_iter
    degenerate: Tensor   # (*batch,) bool: a variance was floored or an expert emptied
    status: Tensor | None = None   # (*batch,) int8 ``FitStatus`` codes (see ``fit.status``)
    history: Tensor | None = None  # (*batch, max_iter + 1) log-likelihood trace, NaN-padded


def e_step(model: GaussianMoE, x_BND: Tensor, y_BN: Tensor, params: Params) -> tuple[Tensor, Tensor]:
    """Log-likelihood (B,) and responsibilities (B, N, E)."""
    comp_BNE = model.component_log_probs(x_BND, y_BN, params)
    ll_BN = torch.logsumexp(comp_BNE, dim=-1)
    return ll_BN.sum(-1), torch.exp(comp_BNE - ll_BN.unsqueeze(-1))


def _solve_ridge(a: Tensor, b: Tensor, previous: Tensor) -> Tensor:
    """Solve (a + lam I) c = b + lam c_prev with lam = 1e-10 (mean diag(a) + 1): exact
    least squares up to a 1e-10 relative ridge toward the previous value, so that an
    expert with no responsibility (a = 0) keeps its parameters instead of becoming NaN."""
    lam = 1e-10 * (a.diagonal(dim1=-2, dim2=-1).mean(-1) + 1.0)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    return torch.linalg.solve(a + lam[..., None, None] * eye,
                              b + lam[..., None, None] * previous.unsqueeze(-1))


def _outer(z_BNP: Tensor) -> Tensor:
    """Row-wise outer products z_n z_n^T, flattened: (B, N, P*P). Built column by column:
    a broadcast product over two tiny trailing axes is several times slower."""
    p = z_BNP.shape[-1]
    return torch.stack([z_BNP[..., i] * z_BNP[..., j] for i in range(p) for j in range(p)], -1)


def _wls_experts(model: GaussianMoE, x_BND: Tensor, y_BN: Tensor, resp_BNE: Tensor,
                 params: Params) -> Params:
    """Exact weighted least squares per expert: (Z^T R_i Z) c_i = Z^T R_i y, Z = [1, phi(x)]."""
    feats = model.expert.features(x_BND)
    z_BNP = torch.cat([torch.ones_like(feats[..., :1]), feats], dim=-1)
    p = z_BNP.shape[-1]
    rt_BEN = resp_BNE.transpose(-1, -2)
    gram_BEPP = (rt_BEN @ _outer(z_BNP)).unflatten(-1, (p, p))
    rhs_BEP = rt_BEN @ (z_BNP * y_BN.unsqueeze(-1))
    has_a = "a" in model.expert_blocks()
    previous = torch.cat([params["b"].unsqueeze(-1)] + ([params["a"]] if has_a else []), dim=-1)
    coef_BEP = _solve_ridge(gram_BEPP, rhs_BEP.unsqueeze(-1), previous).squeeze(-1)
    out = {"b": coef_BEP[..., 0]}
    if has_a:
        out["a"] = coef_BEP[..., 1:]
    return out


def _weighted_normal_ll(model: GaussianMoE, x_BND, y_BN, resp_BNE, expert_params, var_BE) -> Tensor:
    """sum_n sum_i r_ni log N(y_n | h_i(x_n), var_i): the experts' part of Q, (B,)."""
    mu = model.expert.mean(x_BND, expert_params)
    ll = -0.5 * (torch.log(var_BE).unsqueeze(-2) + (y_BN.unsqueeze(-1) - mu).square()
                 / var_BE.unsqueeze(-2))
    return (resp_BNE * ll).sum((-1, -2))


def _newton_experts(model, x_BND, y_BN, resp_BNE, params, steps) -> Params:
    """Experts not linear in their parameters: damped Newton on Q (variances held)."""
    shapes = model.expert_blocks()
    objective = lambda t: _weighted_normal_ll(model, x_BND, y_BN, resp_BNE,  # noqa: E731
                                              unpack(t, shapes), params["var"])
    theta, _ = newton_ascent(objective, pack(pick(params, shapes), shapes), steps=steps)
    return unpack(theta, shapes)


def _variances(model, x_BND, y_BN, resp_BNE, params, floor_B) -> tuple[Tensor, Tensor]:
    """Closed-form variances, floored; also whether any expert degenerated, (B,). An
    expert with (numerically) no responsibility keeps its variance."""
    mu = model.expert_means(x_BND, params)
    nk_BE = resp_BNE.sum(-2)
    var = (resp_BNE * (y_BN.unsqueeze(-1) - mu).square()).sum(-2) / nk_BE.clamp_min(1e-300)
    var = torch.where(nk_BE > 1e-10, var, params["var"])
    low = (var < floor_B.unsqueeze(-1)) | (nk_BE < MIN_EXPERT_WEIGHT)
    return torch.maximum(var, floor_B.unsqueeze(-1)), low.any(-1)


def _gate_q(gate, x_BND, resp_BNE, gate_params) -> Tensor:
    """sum_n sum_i r_ni log w_i(x_n): the gate's part of Q, (B,). Terms with r = 0 are
    dropped, so that experts top-K removed (log w = -inf) do not give 0 * inf."""
    return expected_log(resp_BNE, gate.log_weights(x_BND, gate_params))


def expected_log(resp_BNE: Tensor, log_w_BNE: Tensor) -> Tensor:
    """sum_n sum_i r_ni log w_ni, (B,), with terms of r = 0 dropped (not 0 * -inf)."""
    return torch.where(resp_BNE > 0, resp_BNE * log_w_BNE, 0.0).sum((-1, -2))


def _is_plain_softmax(gate) -> bool:
    return type(gate) is LinearGate and gate.normaliser == "softmax" and gate.top_k is None


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
    stats_resp, stats_z, zz = resp, z_BPN, _outer(z_BPN.transpose(-1, -2))
    if not bool(((resp_n - 1).abs() <= 1e-12).all()):
        stats_resp = torch.where(resp_n > 0, resp / resp_n, 0.0)
        stats_z, zz = z_BPN * resp_n, zz * resp_n.transpose(-1, -2)
    theta_BEP = torch.cat([params["beta0"].unsqueeze(-1), params["beta1"]], dim=-1)
    b, e, p = theta_BEP.shape
    last = theta_BEP[:, -1:]

    def full(t_BF: Tensor) -> Tensor:
        return torch.cat([t_BF.reshape(-1, e - 1, p), last.expand(t_BF.shape[0], 1, p)], dim=1)

    def q(t_BF: Tensor) -> Tensor:
        s = _combine(full(t_BF), z_BPN)
        fit = (resp * s).sum((1, 2))
        _, lse = _softmax_experts_first(s)  # overwrites s
        return fit - (resp_n * lse).sum((1, 2))

    theta = theta_BEP[:, :-1].reshape(b, -1)
    for _ in range(steps):
        w, _ = _softmax_experts_first(_combine(full(theta), z_BPN))
        grad, diag, cross = _gate_stats(stats_resp, w, stats_z, zz)
        direction = ridged_direction(grad.reshape(b, -1), _softmax_neg_hessian(diag, cross))
        theta, _ = halving_step(q, theta, direction, q(theta))
    out = full(theta)
    return {"beta0": out[..., 0], "beta1": out[..., 1:]}


def _softmax_experts_first(s_BEN: Tensor) -> tuple[Tensor, Tensor]:
    """softmax over the expert axis of (B, E, N) scores, computed in place (``s_BEN`` is
    overwritten and returned), and its log-normaliser (B, 1, N)."""
    top = _max_over_experts(s_BEN)
    ex = s_BEN.sub_(top).exp_()
    total = ex.sum(1, keepdim=True)
    return ex.div_(total), total.log_().add_(top)


def _gate_stats(resp_BEN: Tensor, w_BEN: Tensor, z_BPN: Tensor, zz_BNK: Tensor):
    """The softmax gate's gradient and Hessian blocks over the free experts (all but the
    last): grad (B, E-1, P) = sum_n (r - w) z; diag (B, E-1, P, P) = sum_n w_i z z^T;
    cross (B, E-1, E-1, P, P) = sum_n w_i w_j z z^T, one zz column k at a time as
    (w * zz_k) @ w^T (no (E-1)^2 x N temporary)."""
    b, e, p = w_BEN.shape[0], w_BEN.shape[1], z_BPN.shape[1]
    w_m = w_BEN[:, :-1]
    grad = (resp_BEN[:, :-1] - w_m) @ z_BPN.transpose(-1, -2)
    diag = (w_m @ zz_BNK).unflatten(-1, (p, p))
    cross = torch.stack([(w_m * zz_BNK[:, None, :, k]) @ w_m.transpose(-1, -2)
                         for k in range(p * p)], -1)
    return grad, diag, cross.view(b, e - 1, e - 1, p, p)


def _softmax_neg_hessian(diag_BEPP: Tensor, cross_BEEPP: Tensor) -> Tensor:
    """-Hessian of the softmax gate's Q over the free experts, ((E-1) P, (E-1) P) per problem,
    from diag_i = sum_n w_ni z_n z_n^T and cross_ij = sum_n w_ni w_nj z_n z_n^T:
    -H_(ip),(jq) = d_ij diag_i[p, q] - cross_ij[p, q]."""
    b, e, p, _ = diag_BEPP.shape
    eye = torch.eye(e, dtype=diag_BEPP.dtype, device=diag_BEPP.device)
    block_diag = diag_BEPP.unsqueeze(-2) * eye.view(1, e, 1, e, 1)          # (B, i, p, j, q)
    return (block_diag - cross_BEEPP.permute(0, 1, 3, 2, 4)).reshape(b, e * p, e * p)


def _gate_step(model: GaussianMoE, x_BND, resp_BNE, params, steps: int,
               ridge: float = 0.0) -> Params:
    return gate_update(model.gate, model.n_experts, x_BND, resp_BNE,
                       pick(params, model.gate_blocks()), steps, ridge)


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
    if ridge == 0 and _is_plain_softmax(gate):
        return _irls_softmax(x_BND, resp_BNE, gate_params, steps)
    if ridge == 0 and is_distance_gate(gate):
        return distance_gate_update(gate, x_BND, resp_BNE, gate_params, steps)
    shapes = gate.param_shapes(n_experts, x_BND.shape[-1])
    free = pack({k: m.expand(gate_params[k].shape[:1] + m.shape)
                 for k, m in gate.free_mask(n_experts, x_BND.shape[-1]).items()}, shapes)

    def objective(t: Tensor) -> Tensor:
        p = unpack(t, shapes)
        return _gate_q(gate, x_BND, resp_BNE, p) - slope_penalty(p, ridge)

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


def m_step(model: GaussianMoE, x_BND: Tensor, y_BN: Tensor, resp_BNE: Tensor, params: Params,
           floor_B: Tensor, gate_steps: int = 1, gate_ridge: float = 0.0) -> tuple[Params, Tensor]:
    """One ECM update of every block from the responsibilities; returns (params, degenerate).
    ``gate_ridge`` as in ``fit_em``."""
    new = dict(params)
    if model.expert.linear_in_params:
        new.update(_wls_experts(model, x_BND, y_BN, resp_BNE, params))
    else:
        new.update(_newton_experts(model, x_BND, y_BN, resp_BNE, params, gate_steps))
    new["var"], degenerate = _variances(model, x_BND, y_BN, resp_BNE, new, floor_B)
    new.update(_gate_step(model, x_BND, resp_BNE, params, gate_steps, gate_ridge))
    return new, degenerate


# --- kernels: one E-step / update interface, a general and a fast implementation ----------

def _rows(state, idx):
    """Rows ``idx`` of a tensor or a tuple of tensors (batch axis first)."""
    return tuple(t[idx] for t in state) if isinstance(state, tuple) else state[idx]


def _where_rows(mask: Tensor, a, b):
    """Row-wise choice between two tensors or tuples of tensors."""
    if isinstance(a, tuple):
        return tuple(_where_rows(mask, u, v) for u, v in zip(a, b))
    return torch.where(mask.view(-1, *[1] * (a.dim() - 1)), a, b)


def _set_rows(state, idx, value):
    if isinstance(state, tuple):
        for t, v in zip(state, value):
            t[idx] = v
    else:
        state[idx] = value


class _GeneralKernel:
    """Any gate, any expert: the reference path, in the (B, N, E) layout of the models.
    Its update is m_step then e_step; m_step's parts never lower Q, so the likelihood
    never decreases. With a gate ridge its "log-likelihood" is the penalised one,
    l - (ridge / 2) ||beta1||^2, which is what then never decreases."""

    def __init__(self, model: GaussianMoE, x: Tensor, y: Tensor, floor: Tensor, gate_steps: int,
                 gate_ridge: float = 0.0):
        self.model, self.x, self.y, self.floor, self.gate_steps = model, x, y, floor, gate_steps
        self.gate_ridge = gate_ridge

    def e_step(self, params: Params):
        ll, resp = e_step(self.model, self.x, self.y, params)
        return ll - slope_penalty(params, self.gate_ridge), resp

    def update(self, params: Params, resp: Tensor, ll: Tensor):
        new, degenerate = m_step(self.model, self.x, self.y, resp, params, self.floor,
                                 self.gate_steps, self.gate_ridge)
        ll_new, resp_new = self.e_step(new)
        return new, ll_new, resp_new, degenerate

    def subset(self, idx: Tensor) -> _GeneralKernel:
        return _GeneralKernel(self.model, self.x[idx], self.y[idx], self.floor[idx],
                              self.gate_steps, self.gate_ridge)


class _SoftmaxLinearKernel:
    """The common case, fast: softmax gate (no top-K) and experts linear in their
    parameters. Same mathematics as the general path, organised for speed:

    - the E-step ends in the sufficient statistics the M-step needs (``_stats``), so the
      state between steps is small: S_i = sum_n r_ni [f f^T, f y, y^2] (f = (1,
      features(x))), the gate gradient sum_n (r_ni - w_ni) z_n and the blocks of its
      Hessian, sum_n w_ni z z^T and sum_n w_ni w_nj z z^T (z = (1, x));
    - the E-step is one fused pass in C where a compiler is available (``_fused``), else
      tensor code in an experts-first layout (B, E, N) with in-place operations;
    - the gate's Newton/IRLS step is taken in full and verified by the next E-step's
      log-likelihood; rows where it lowered the likelihood halve the gate step (down to
      no gate move, a plain ECM step), so the likelihood never decreases.
    """

    def __init__(self, model: GaussianMoE, x: Tensor, y: Tensor, floor: Tensor, gate_steps: int,
                 fused: bool | None = None):
        # Built feature-major directly: transposing a (B, N, small) tensor is a slow copy.
        ones = torch.ones_like(y).unsqueeze(-2)                        # (B, 1, N)
        self.f_T = torch.cat([ones, model.expert.features(x).transpose(-1, -2)], 1)  # (B, Q, N)
        self.z_T = torch.cat([ones, x.transpose(-1, -2)], 1)          # (B, P, N)
        self.model, self.floor, self.has_a = model, floor, "a" in model.expert_blocks()
        self.q, self.p = self.f_T.shape[1], self.z_T.shape[1]
        self.fused = _fused.load() is not None if fused is None else fused
        self.fused = self.fused and model.n_experts <= 16 and x.dtype == torch.float64
        self.threads = split_threads(x.shape[0], y.numel() * model.n_experts)
        self.y = y.unsqueeze(-2).contiguous()                          # (B, 1, N)
        if not self.fused:
            f, z = self.f_T.transpose(-1, -2), self.z_T.transpose(-1, -2)
            self.zz = _outer(z)                                        # (B, N, P*P)
            self.design = torch.cat([_outer(f), f * y.unsqueeze(-1), y.unsqueeze(-1).square()], -1)

    def subset(self, idx: Tensor) -> _SoftmaxLinearKernel:
        new = object.__new__(_SoftmaxLinearKernel)
        new.__dict__.update(self.__dict__)
        for name in ("floor", "f_T", "z_T", "zz", "design", "y"):
            if name in self.__dict__:
                setattr(new, name, getattr(self, name)[idx])
        return new

    def _coef(self, params: Params) -> Tensor:
        parts = [params["b"].unsqueeze(-1)] + ([params["a"]] if self.has_a else [])
        return torch.cat(parts, dim=-1)                                # (B, E, Q)

    def e_step(self, params: Params):
        """Log-likelihood (B,) and the statistics (S, G, Hd, Hc) of ``_stats``."""
        gate = torch.cat([params["beta0"].unsqueeze(-1), params["beta1"]], dim=-1)
        if self.fused:
            ll, s, g, hd, hc = _fused.estep(self.f_T, self.z_T, self.y.squeeze(-2),
                                            self._coef(params), gate, params["var"], self.threads)
            return ll, (s, g[:, :-1], hd[:, :-1], hc[:, :-1, :-1])
        var = params["var"].unsqueeze(-1)
        s = _combine(gate, self.z_T)                                   # scores
        comp = _combine(self._coef(params), self.f_T)                  # expert means
        comp.sub_(self.y).square_().mul_(-0.5 / var).add_(s).sub_(0.5 * torch.log(_TWO_PI * var))
        resp, ll_n = _softmax_experts_first(comp)                      # log sum_i e^{s_i} N_i
        w, lse_s = _softmax_experts_first(s)
        return (ll_n - lse_s).sum((-1, -2)), self._stats(resp, w)

    def _stats(self, resp: Tensor, w: Tensor):
        """S (B, E, Q*Q+Q+1) and the gate's ``_gate_stats``."""
        return (resp @ self.design, *_gate_stats(resp, w, self.z_T, self.zz))

    def _experts_and_variances(self, params: Params, stats: Tensor):
        q = self.q
        gram, rhs, syy = stats[..., : q * q].unflatten(-1, (q, q)), stats[..., q * q: -1], stats[..., -1]
        coef = _solve_ridge(gram, rhs.unsqueeze(-1), self._coef(params)).squeeze(-1)
        rss = syy - 2 * (coef * rhs).sum(-1) + (coef.unsqueeze(-2) @ gram @ coef.unsqueeze(-1))[..., 0, 0]
        nk = gram[..., 0, 0]
        var = torch.where(nk > 1e-10, rss.clamp_min(0) / nk.clamp_min(1e-300), params["var"])
        low = (var < self.floor.unsqueeze(-1)) | (nk < MIN_EXPERT_WEIGHT)
        out = {"b": coef[..., 0], "var": torch.maximum(var, self.floor.unsqueeze(-1))}
        if self.has_a:
            out["a"] = coef[..., 1:]
        return out, low.any(-1)

    def _gate_direction(self, grad: Tensor, diag: Tensor, cross: Tensor) -> Tensor:
        """IRLS direction for the free experts' (beta0, beta1): (B, E-1, P).
        gradient_i = sum_n (r_ni - w_ni) z_n; -Hessian_ij = sum_n w_ni (d_ij - w_nj) z_n z_n^T."""
        b, m, p = grad.shape
        neg_hess = _softmax_neg_hessian(diag, cross)
        return ridged_direction(grad.reshape(b, -1), neg_hess).view(b, m, p)

    def _with_gate_step(self, params: Params, direction: Tensor, t: Tensor) -> Params:
        beta0 = params["beta0"].clone()
        beta1 = params["beta1"].clone()
        step = t.view(-1, 1, 1) * direction
        beta0[:, :-1] += step[..., 0]
        beta1[:, :-1] += step[..., 1:]
        return {**params, "beta0": beta0, "beta1": beta1}

    def update(self, params: Params, state, ll: Tensor):
        s, grad, diag, cross = state
        experts, degenerate = self._experts_and_variances(params, s)
        new = {**params, **experts}
        if s.shape[1] == 1:
            ll_new, state_new = self.e_step(new)
            return new, ll_new, state_new, degenerate
        direction = self._gate_direction(grad, diag, cross)
        ones = torch.ones_like(ll)
        cand = self._with_gate_step(new, direction, ones)
        ll_new, state_new = self.e_step(cand)
        bad = ~(ll_new >= ll - 1e-12 * ll.abs())
        if bool(bad.any()):
            self._halve(bad, new, direction, ll, cand, ll_new, state_new)
        return cand, ll_new, state_new, degenerate

    def _halve(self, bad, new, direction, ll, cand, ll_new, state_new) -> None:
        """Halve the gate step on rows ``bad`` until the likelihood does not decrease;
        the last try (t = 0) is the ECM step with the gate unchanged. Writes in place."""
        idx = bad.nonzero().squeeze(-1)
        sub = self.subset(idx)
        sub_new = {k: v[idx] for k, v in new.items()}
        sub_dir, sub_ll = direction[idx], ll[idx]
        pending = torch.ones_like(sub_ll, dtype=torch.bool)
        for t in [0.5 ** h for h in range(1, 11)] + [0.0]:
            trial = sub._with_gate_step(sub_new, sub_dir, torch.full_like(sub_ll, t))
            ll_t, state_t = sub.e_step(trial)
            ok = pending & ((ll_t >= sub_ll - 1e-12 * sub_ll.abs()) | (t == 0.0))
            rows = idx[ok]
            for k in cand:
                cand[k][rows] = trial[k][ok]
            ll_new[rows] = ll_t[ok]
            _set_rows(state_new, rows, _rows(state_t, ok))
            pending &= ~ok
            if not bool(pending.any()):
                break


_TWO_PI = 2 * torch.pi


def _combine(coef_BEK: Tensor, design_BKN: Tensor) -> Tensor:
    """coef @ design, (B, E, N). With few columns K, fused multiply-adds beat a batched
    matmul whose inner dimension is tiny."""
    if coef_BEK.shape[-1] > 4:
        return coef_BEK @ design_BKN
    out = coef_BEK[..., :1] * design_BKN[:, :1]
    for k in range(1, coef_BEK.shape[-1]):
        out.addcmul_(coef_BEK[..., k:k + 1], design_BKN[:, k:k + 1])
    return out


def _max_over_experts(t_BEN: Tensor) -> Tensor:
    """max over the expert axis, (B, 1, N): pairwise maxima beat a reduction over a short
    middle axis."""
    top = t_BEN[:, :1].clone()
    for i in range(1, t_BEN.shape[1]):
        torch.maximum(top, t_BEN[:, i:i + 1], out=top)
    return top


# auto: the fast kernel where it applies, its E-step (and plain EM loop) in C when a
# compiler is available; tensor: the fast kernel in PyTorch only; general: the reference.
ENGINES = ("auto", "tensor", "general")


def _make_kernel(model: GaussianMoE, x, y, floor, gate_steps, engine: str = "auto",
                 gate_ridge: float = 0.0):
    from ..models import ContaminatedMoE, DeviatedGaussianMoE
    if engine not in ENGINES:
        raise ValueError(f"Unknown engine {engine!r}. Valid: {', '.join(ENGINES)}.")
    if isinstance(model, (DeviatedGaussianMoE, ContaminatedMoE)):
        from .em_known import KnownPartKernel  # imports this module: import it late
        return KnownPartKernel(model, x, y, floor, gate_steps)
    fast = (engine != "general" and _is_plain_softmax(model.gate)
            and model.expert.linear_in_params and gate_steps == 1 and gate_ridge == 0)
    if fast:
        return _SoftmaxLinearKernel(model, x, y, floor, gate_steps, fused=None if engine == "auto" else False)
    return _GeneralKernel(model, x, y, floor, gate_steps, gate_ridge)


# --- the fitting loop --------------------------------------------------------------------

def _to_vector(params: Params, shapes) -> Tensor:
    """Parameters as one vector per problem, unconstrained: variances on the log scale,
    a mixing proportion ``lam`` (deviated / contaminated models) on the logit scale."""
    free = {**params, "var": params["var"].log()}
    if "lam" in params:
        free["lam"] = torch.logit(params["lam"])
    return pack(free, shapes)


def _from_vector(theta: Tensor, shapes, floor_B: Tensor) -> Params:
    params = unpack(theta, shapes)
    params["var"] = params["var"].exp().maximum(floor_B.unsqueeze(-1))
    if "lam" in params:
        params["lam"] = torch.sigmoid(params["lam"])
    return params


def _plain_update(kernel, shapes, params, state, ll, aux):
    new, ll_new, state_new, degenerate = kernel.update(params, state, ll)
    return new, ll_new, state_new, degenerate, 1


_STEP_GROWTH = 4.0


def _squarem_update(kernel, shapes, params, state, ll, aux):
    """One SQUAREM cycle (Varadhan & Roland 2008, scheme S3, with the adaptive step bound
    of their R package): two EM updates p1, p2, the extrapolation
    p' = p0 + 2 a (p1 - p0) + a^2 (p2 - 2 p1 + p0) with a = |r| / |v| clamped to
    [1, step_max], then a stabilising EM update from p'. If that ends below the cycle's
    start (or is not finite), the cycle returns p2 instead and step_max shrinks; when a
    reaches step_max it grows 4x. The log-likelihood never decreases across cycles."""
    p1, ll1, s1, d1 = kernel.update(params, state, ll)
    p2, ll2, s2, d2 = kernel.update(p1, s1, ll1)
    v0, v1, v2 = (_to_vector(p, shapes) for p in (params, p1, p2))
    r, v = v1 - v0, v2 - 2 * v1 + v0
    step_max = aux["step_max"]
    alpha = (r.norm(dim=-1) / v.norm(dim=-1).clamp_min(1e-300)).clamp(min=1.0).minimum(step_max)
    px = _from_vector(v0 + 2 * alpha.unsqueeze(-1) * r + alpha.square().unsqueeze(-1) * v,
                      shapes, kernel.floor)
    llx, sx = kernel.e_step(px)
    p3, ll3, s3, d3 = kernel.update(px, sx, llx)
    good = torch.isfinite(ll3) & (ll3 >= ll)
    at_max = alpha >= step_max
    aux["step_max"] = torch.where(good, torch.where(at_max, step_max * _STEP_GROWTH, step_max),
                                  torch.where(at_max, (step_max / _STEP_GROWTH).clamp_min(1.0),
                                              step_max))
    out = {k: _where_rows(good, p3[k], p2[k]) for k in p2}
    return (out, torch.where(good, ll3, ll2), _where_rows(good, s3, s2), d1 | d2 | (d3 & good), 3)


def _broadcast_problem(model, x, y, init: Params):
    """x (..., N, D), y (..., N) and parameters (*batch, ...) to one batch axis B."""
    batch = model.check_params(init)
    dtype = next(iter(init.values())).dtype
    x, y = check_inputs(x, model.dim, y)
    x, y = x.to(dtype), y.to(dtype)
    lead = broadcast_shapes(batch, x.shape[:-2])
    shapes = model.param_shapes()
    params = {k: init[k].expand(tuple(lead) + tuple(shapes[k])).reshape(-1, *shapes[k]).clone()
              for k in shapes}
    x = x.expand(*lead, *x.shape[-2:]).reshape(-1, *x.shape[-2:])
    y = y.expand(*lead, y.shape[-1]).reshape(-1, y.shape[-1])
    return x, y, params, lead


@torch.no_grad()
def fit_em(model: GaussianMoE, x: Tensor, y: Tensor, init: Params, *, tol: float = 1e-6,
           max_iter: int = 2000, var_floor: float = 1e-8, gate_steps: int = 1,
           accelerate: bool = False, record: bool = False, engine: str = "auto",
           gate_ridge: float = 0.0) -> FitResult:
    """Fit a Gaussian MoE by EM from ``init``, batched over its leading dimensions. Also
    fits a ``DeviatedGaussianMoE`` or ``ContaminatedMoE`` (see ``em_known``).

    ``init`` blocks have shape (*batch, ...) (e.g. (starts, replicates, ...)); x and y
    broadcast against them ((replicates, N, D) or one data set (N, D)). Each problem stops
    on its own when the relative change of its log-likelihood falls to ``tol``, or after
    ``max_iter`` EM updates. Results have the batch shape, each with a ``status`` (see
    ``gatelab.fit.status``: converged, max_iter, stuck, separated or degenerate);
    ``record`` keeps the log-likelihood after every update (for monotonicity checks).
    ``engine="tensor"`` keeps the fast kernel in PyTorch (no C), ``engine="general"``
    forces the reference kernel (the fast one is used by default where it applies).

    ``gate_ridge`` > 0 maximises the penalised likelihood l - (gate_ridge / 2) ||beta1||^2
    over linear gates' slopes instead of l, for data that a gate separates (status
    ``separated``), where the MLE runs off to infinite slopes. It is an option, not the
    default: the penalised estimate is not the MLE. The log-likelihood returned is l.
    """
    keep_freed_memory()
    check_positive("tol", tol)
    check_int("max_iter", max_iter, 1)
    check_int("gate_steps", gate_steps, 1)
    check_gate_ridge(model, gate_ridge)
    x, y, params, lead = _broadcast_problem(model, x, y, model.normalise(init))
    # Work per pass: samples x experts (the known-part models have no n_experts).
    with using_threads(threads_for(y.numel() * params["var"].shape[-1])):
        kernel = _make_kernel(model, x, y, var_floor * y.var(-1), gate_steps, engine, gate_ridge)
        res = _run_em(kernel, model.param_shapes(), params, tol, max_iter, accelerate, record)
        del kernel
        status = fit_status(model, x, y, params, res.params, res.converged, res.degenerate)
    loglik = res.loglik + slope_penalty(res.params, gate_ridge)
    return _shaped(res._replace(loglik=loglik, status=status), lead)


def _shaped(res, lead):
    """A flat result (a ``FitResult`` or ``LSQResult``, fields (B, ...)) with the batch
    shape ``lead`` restored on every field."""
    shape = lambda t: None if t is None else t.reshape(tuple(lead) + tuple(t.shape[1:]))  # noqa: E731
    return type(res)({k: shape(v) for k, v in res.params.items()}, *[shape(t) for t in res[1:]])


def _run_em(kernel, shapes, params: Params, tol: float, max_iter: int, accelerate: bool,
            record: bool) -> FitResult:
    """The loop of ``fit_em`` over a kernel's B problems; a flat result (B, ...) without
    its status."""
    b = params["var"].shape[0]
    out = {k: v.clone() for k, v in params.items()}
    out_ll = params["var"].new_full((b,), float("nan"))
    n_iter = torch.zeros(b, dtype=torch.long)
    converged, degenerate = torch.zeros(b, dtype=torch.bool), torch.zeros(b, dtype=torch.bool)
    history = out_ll.new_full((b, max_iter + 1), float("nan")) if record else None
    if not (accelerate or record) and getattr(kernel, "fused", False):
        return _fused_plain_em(kernel, params, tol, max_iter)
    update = _squarem_update if accelerate else _plain_update
    idx = torch.arange(b)                       # problems in the kernel's rows
    live = torch.ones(b, dtype=torch.bool)      # rows still iterating
    ll, state = kernel.e_step(params)
    aux = {"step_max": torch.ones_like(ll)}   # per-problem state of the update scheme
    if history is not None:
        history[:, 0] = ll
    while bool(live.any()):
        params, ll_new, state, deg, k = update(kernel, shapes, params, state, ll, aux)
        rows = idx[live]
        n_iter[rows] += k
        degenerate[rows] |= deg[live]
        if history is not None:
            history[rows, n_iter[rows].clamp_max(max_iter)] = ll_new[live]
        done = (ll_new - ll).abs() <= tol * ll.abs()
        stop = live & (done | (n_iter[idx] >= max_iter))
        ll = ll_new
        if bool(stop.any()):
            fin = idx[stop]
            for name in out:
                out[name][fin] = params[name][stop]
            out_ll[fin], converged[fin] = ll[stop], done[stop]
            live &= ~stop
        # Finished rows keep riding along (their results are saved) until they are a
        # quarter of the batch; then the batch is compacted.
        if 4 * int((~live).sum()) >= live.numel() and bool(live.any()):
            keep = live.nonzero().squeeze(-1)
            kernel, idx, ll = kernel.subset(keep), idx[keep], ll[keep]
            state, params = _rows(state, keep), {n: v[keep] for n, v in params.items()}
            aux = {n: v[keep] for n, v in aux.items()}
            live = torch.ones(keep.numel(), dtype=torch.bool)
    return FitResult(out, out_ll, n_iter, converged, degenerate, history=history)


def _fused_plain_em(kernel: _SoftmaxLinearKernel, params: Params, tol: float,
                    max_iter: int) -> FitResult:
    """Plain EM with every iteration in C (``_fused.em``): the same updates and stopping
    rule as the loop of ``fit_em`` with ``_SoftmaxLinearKernel``, without a Python round
    trip per iteration (what small fits spend most of their time on)."""
    gate = torch.cat([params["beta0"].unsqueeze(-1), params["beta1"]], dim=-1)
    coef, gate, var, ll, n_iter, converged, degenerate = _fused.em(
        kernel.f_T, kernel.z_T, kernel.y.squeeze(-2), kernel.floor, kernel._coef(params), gate,
        params["var"], tol, max_iter, kernel.threads)
    out = {"b": coef[..., 0], "beta0": gate[..., 0], "beta1": gate[..., 1:], "var": var}
    if kernel.has_a:
        out["a"] = coef[..., 1:]
    return FitResult({k: out[k] for k in params}, ll, n_iter, converged, degenerate)


def select_best(result, dim: int = 0):
    """Keep, along ``dim`` (the restarts axis), the fit with the highest log-likelihood (a
    ``FitResult``) or the lowest residual sum of squares (an ``LSQResult``)."""
    score = result.loglik if isinstance(result, FitResult) else -result.rss
    best = torch.nan_to_num(score, nan=float("-inf")).argmax(dim=dim, keepdim=True)

    def take(t: Tensor) -> Tensor:
        index = best.view(*best.shape, *[1] * (t.dim() - best.dim())).expand(
            *best.shape, *t.shape[best.dim():])
        return t.gather(dim, index).squeeze(dim)

    return type(result)({k: take(v) for k, v in result.params.items()},
                        *[None if t is None else take(t) for t in result[1:]])
