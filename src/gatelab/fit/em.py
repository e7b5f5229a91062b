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
- the softmax gate: Newton/IRLS with the full Hessian and step halving; every other
  gate (top-K, cosine, quadratic, Laplace, ...): the same Newton step by autograd.
Stopping: |l_t - l_{t-1}| <= tol |l_{t-1}| on the log-likelihood l, or ``max_iter``.
``accelerate=True`` uses SQUAREM extrapolation (Varadhan & Roland 2008) with a fall-back
to the plain EM step whenever the extrapolated point has a lower likelihood, so the
log-likelihood still never decreases.

Shape legend: B problems, N samples, D features, E experts, P parameters.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..gates import LinearGate
from ..models import GaussianMoE
from ..params import Params, pack, pick, unpack
from .newton import halving_step, newton_ascent, newton_direction

__all__ = ["FitResult", "fit_em", "select_best", "e_step", "m_step"]


class FitResult(NamedTuple):
    """Fitted parameters and diagnostics, one entry per problem in the batch."""

    params: Params
    loglik: Tensor       # (*batch,) final log-likelihood
    n_iter: Tensor       # (*batch,) EM updates done
    converged: Tensor    # (*batch,) bool: stopped on the tolerance, not on max_iter
    degenerate: Tensor   # (*batch,) bool: a variance was floored or an expert emptied
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
    """Row-wise outer products z_n z_n^T, flattened: (B, N, P*P)."""
    return (z_BNP.unsqueeze(-1) * z_BNP.unsqueeze(-2)).flatten(-2)


def _wls_experts(model: GaussianMoE, x_BND: Tensor, y_BN: Tensor, resp_BNE: Tensor,
                 params: Params) -> Params:
    """Exact weighted least squares per expert: (Z^T R_i Z) c_i = Z^T R_i y, Z = [1, phi(x)]."""
    feats = model.expert.features(x_BND)
    z_BNP = torch.cat([torch.ones_like(feats[..., :1]), feats], dim=-1)
    p = z_BNP.shape[-1]
    rt_BEN = resp_BNE.transpose(-1, -2)
    gram_BEPP = (rt_BEN @ _outer(z_BNP)).unflatten(-1, (p, p))
    rhs_BEP = rt_BEN @ (z_BNP * y_BN.unsqueeze(-1))
    has_a = "a" in model._expert_shapes()
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
    shapes = model._expert_shapes()
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
    low = (var < floor_B.unsqueeze(-1)) | (nk_BE < 1.0)
    return torch.maximum(var, floor_B.unsqueeze(-1)), low.any(-1)


def _gate_q(gate, x_BND, resp_BNE, gate_params) -> Tensor:
    """sum_n sum_i r_ni log w_i(x_n): the gate's part of Q, (B,). Terms with r = 0 are
    dropped, so that experts top-K removed (log w = -inf) do not give 0 * inf."""
    log_w = gate.log_weights(x_BND, gate_params)
    return torch.where(resp_BNE > 0, resp_BNE * log_w, 0.0).sum((-1, -2))


def _is_plain_softmax(gate) -> bool:
    return type(gate) is LinearGate and gate.normaliser == "softmax" and gate.top_k is None


def _irls_softmax(x_BND: Tensor, resp_BNE: Tensor, params: Params, steps: int) -> Params:
    """Newton/IRLS for the softmax gate with the full Hessian and step halving. The last
    expert's row stays fixed (identifiability); theta_i = (beta0_i, beta1_i).

    gradient_i = sum_n (r_ni - w_ni) z_n,  -Hessian_ij = sum_n w_ni (d_ij - w_nj) z_n z_n^T.
    """
    z_BNP = torch.cat([torch.ones_like(x_BND[..., :1]), x_BND], dim=-1)
    theta_BEP = torch.cat([params["beta0"].unsqueeze(-1), params["beta1"]], dim=-1)
    b, e, p = theta_BEP.shape
    last = theta_BEP[:, -1:]
    zz = _outer(z_BNP)

    def full(t_BF: Tensor) -> Tensor:
        return torch.cat([t_BF.reshape(-1, e - 1, p), last.expand(t_BF.shape[0], 1, p)], dim=1)

    def q(t_BF: Tensor) -> Tensor:
        log_w = torch.log_softmax(z_BNP @ full(t_BF).transpose(-1, -2), dim=-1)
        return (resp_BNE * log_w).sum((-1, -2))

    theta = theta_BEP[:, :-1].reshape(b, -1)
    for _ in range(steps):
        w_BNE = torch.softmax(z_BNP @ full(theta).transpose(-1, -2), dim=-1)
        w_m = w_BNE[..., :-1]
        grad = ((resp_BNE - w_BNE)[..., :-1].transpose(-1, -2) @ z_BNP).reshape(b, -1)
        diag = (w_m.transpose(-1, -2) @ zz).unflatten(-1, (p, p))               # (B, E-1, P, P)
        cross = (_outer(w_m).transpose(-1, -2) @ zz).view(b, e - 1, e - 1, p, p)
        neg_h = _block_diag(diag) - cross.permute(0, 1, 3, 2, 4)                # (B, i, p, j, q)
        direction = newton_direction(grad, neg_h.reshape(b, (e - 1) * p, (e - 1) * p))
        theta, _ = halving_step(q, theta, direction, q(theta))
    out = full(theta)
    return {"beta0": out[..., 0], "beta1": out[..., 1:]}


def _block_diag(diag_BEPP: Tensor) -> Tensor:
    """(B, E, P, P) blocks -> (B, E, P, E, P) with the blocks on the expert diagonal."""
    b, e, p, _ = diag_BEPP.shape
    eye = torch.eye(e, dtype=diag_BEPP.dtype, device=diag_BEPP.device)
    return diag_BEPP.unsqueeze(-2) * eye.view(1, e, 1, e, 1)


def _gate_step(model: GaussianMoE, x_BND, resp_BNE, params, steps: int) -> Params:
    gate = model.gate
    shapes = model._gate_shapes()
    if _is_plain_softmax(gate):
        return _irls_softmax(x_BND, resp_BNE, params, steps)
    free = pack({k: m.expand(params[k].shape[:1] + m.shape)
                 for k, m in gate.free_mask(model.n_experts, model.dim).items()}, shapes)
    objective = lambda t: _gate_q(gate, x_BND, resp_BNE, unpack(t, shapes))  # noqa: E731
    theta, _ = newton_ascent(objective, pack(pick(params, shapes), shapes), free, steps)
    return unpack(theta, shapes)


def m_step(model: GaussianMoE, x_BND: Tensor, y_BN: Tensor, resp_BNE: Tensor, params: Params,
           floor_B: Tensor, gate_steps: int = 1) -> tuple[Params, Tensor]:
    """One ECM update of every block from the responsibilities; returns (params, degenerate)."""
    new = dict(params)
    if model.expert.linear_in_params:
        new.update(_wls_experts(model, x_BND, y_BN, resp_BNE, params))
    else:
        new.update(_newton_experts(model, x_BND, y_BN, resp_BNE, params, gate_steps))
    new["var"], degenerate = _variances(model, x_BND, y_BN, resp_BNE, new, floor_B)
    new.update(_gate_step(model, x_BND, resp_BNE, params, gate_steps))
    return new, degenerate


# --- the fitting loop --------------------------------------------------------------------

def _em_update(model, x, y, params, resp, floor, gate_steps):
    new, degenerate = m_step(model, x, y, resp, params, floor, gate_steps)
    ll, resp = e_step(model, x, y, new)
    return new, ll, resp, degenerate, 1


def _to_vector(params: Params, shapes) -> Tensor:
    """Parameters as one vector per problem, variances on the log scale (unconstrained)."""
    return pack({**params, "var": params["var"].log()}, shapes)


def _from_vector(theta: Tensor, shapes, floor_B: Tensor) -> Params:
    params = unpack(theta, shapes)
    params["var"] = params["var"].exp().maximum(floor_B.unsqueeze(-1))
    return params


def _squarem_update(model, x, y, params, resp, floor, gate_steps):
    """One SQUAREM cycle (scheme S3): two EM updates, an extrapolation along them, and a
    stabilising EM update from the extrapolated point, or from the second EM update where
    the extrapolation lowered the likelihood. Never decreases the log-likelihood."""
    p1, _, r1, d1, _ = _em_update(model, x, y, params, resp, floor, gate_steps)
    p2, ll2, r2, d2, _ = _em_update(model, x, y, p1, r1, floor, gate_steps)
    shapes = model.param_shapes()
    v0, v1, v2 = (_to_vector(p, shapes) for p in (params, p1, p2))
    r, v = v1 - v0, v2 - 2 * v1 + v0
    alpha = -(r.norm(dim=-1) / v.norm(dim=-1).clamp_min(1e-300)).clamp_min(1.0)
    px = _from_vector(v0 - 2 * alpha.unsqueeze(-1) * r + alpha.square().unsqueeze(-1) * v,
                      shapes, floor)
    llx, rx = e_step(model, x, y, px)
    good = torch.isfinite(llx) & (llx >= ll2) & torch.isfinite(rx).all((-1, -2))
    pick_ = lambda a, b: torch.where(good.view(-1, *[1] * (a.dim() - 1)), a, b)  # noqa: E731
    base = {k: pick_(px[k], p2[k]) for k in p2}
    p3, ll3, r3, d3, _ = _em_update(model, x, y, base, pick_(rx, r2), floor, gate_steps)
    return p3, ll3, r3, d1 | d2 | d3, 3


def _broadcast_problem(model: GaussianMoE, x, y, init: Params):
    """x (..., N, D), y (..., N) and parameters (*batch, ...) to one batch axis B."""
    from .._checks import check_inputs
    batch = model.check_params(init)
    dtype = next(iter(init.values())).dtype
    x, y = check_inputs(x, model.dim, y)
    x, y = x.to(dtype), y.to(dtype)
    lead = torch.broadcast_shapes(batch, x.shape[:-2])
    shapes = model.param_shapes()
    params = {k: init[k].expand(*lead, *shapes[k]).reshape(-1, *shapes[k]).clone() for k in shapes}
    x = x.expand(*lead, *x.shape[-2:]).reshape(-1, *x.shape[-2:])
    y = y.expand(*lead, y.shape[-1]).reshape(-1, y.shape[-1])
    return x, y, params, lead


def fit_em(model: GaussianMoE, x: Tensor, y: Tensor, init: Params, *, tol: float = 1e-6,
           max_iter: int = 2000, var_floor: float = 1e-8, gate_steps: int = 1,
           accelerate: bool = False, record: bool = False) -> FitResult:
    """Fit a Gaussian MoE by EM from ``init``, batched over its leading dimensions.

    ``init`` blocks have shape (*batch, ...) (e.g. (starts, replicates, ...)); x and y
    broadcast against them ((replicates, N, D) or one data set (N, D)). Each problem stops
    on its own when the relative change of its log-likelihood falls to ``tol``, or after
    ``max_iter`` EM updates. Results have the batch shape; ``record`` keeps the
    log-likelihood after every update (for monotonicity checks).
    """
    from .._checks import check_int, check_positive
    check_positive("tol", tol)
    check_int("max_iter", max_iter, 1)
    check_int("gate_steps", gate_steps, 1)
    x, y, params, lead = _broadcast_problem(model, x, y, model.normalise(init))
    floor = var_floor * y.var(-1)
    b = x.shape[0]
    out = {k: v.clone() for k, v in params.items()}
    out_ll = x.new_full((b,), float("nan"))
    n_iter = torch.zeros(b, dtype=torch.long)
    converged, degenerate = torch.zeros(b, dtype=torch.bool), torch.zeros(b, dtype=torch.bool)
    history = x.new_full((b, max_iter + 1), float("nan")) if record else None
    update = _squarem_update if accelerate else _em_update
    idx = torch.arange(b)
    ll, resp = e_step(model, x, y, params)
    if history is not None:
        history[:, 0] = ll
    while idx.numel():
        params, ll_new, resp, deg, k = update(model, x, y, params, resp, floor, gate_steps)
        n_iter[idx] += k
        degenerate[idx] |= deg
        if history is not None:
            history[idx, n_iter[idx].clamp_max(max_iter)] = ll_new
        done = (ll_new - ll).abs() <= tol * ll.abs()
        stop = done | (n_iter[idx] >= max_iter)
        ll = ll_new
        if bool(stop.any()):
            fin = idx[stop]
            for name in out:
                out[name][fin] = params[name][stop]
            out_ll[fin], converged[fin] = ll[stop], done[stop]
            keep = ~stop
            idx, x, y, floor, ll, resp = idx[keep], x[keep], y[keep], floor[keep], ll[keep], resp[keep]
            params = {name: v[keep] for name, v in params.items()}
    shape = lambda t: t.reshape(tuple(lead) + tuple(t.shape[1:]))  # noqa: E731
    return FitResult({k: shape(v) for k, v in out.items()}, shape(out_ll), shape(n_iter),
                     shape(converged), shape(degenerate),
                     None if history is None else shape(history))


def select_best(result: FitResult, dim: int = 0) -> FitResult:
    """Keep, along ``dim`` (the restarts axis), the fit with the highest log-likelihood."""
    ll = torch.nan_to_num(result.loglik, nan=float("-inf"))
    best = ll.argmax(dim=dim, keepdim=True)

    def take(t: Tensor) -> Tensor:
        index = best.view(*best.shape, *[1] * (t.dim() - best.dim())).expand(
            *best.shape, *t.shape[best.dim():])
        return t.gather(dim, index).squeeze(dim)

    return FitResult({k: take(v) for k, v in result.params.items()}, take(result.loglik),
                     take(result.n_iter), take(result.converged), take(result.degenerate),
                     None if result.history is None else take(result.history))
