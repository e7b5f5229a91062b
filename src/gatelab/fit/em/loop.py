"""The EM loop: ``fit_em`` over any ``EMKernel``, with per-problem stopping, batch
compaction, SQUAREM and recording; the kernel for a model comes from ``KERNELS`` (keyed
by model class) or, for a Gaussian MoE, from ``gaussian_kernel``.

Stopping: |l_t - l_{t-1}| <= tol |l_{t-1}| on the log-likelihood l, or ``max_iter``.
``accelerate=True`` uses SQUAREM extrapolation (Varadhan & Roland 2008) with a fall-back
to plain EM steps whenever the extrapolated cycle ends lower, so the log-likelihood still
never decreases; it matters most for over-specified fits, where plain EM crawls.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..._checks import broadcast_shapes, check_inputs, check_int, check_positive
from ..._runtime import keep_freed_memory
from ..._threads import threads_for, using_threads
from ...models import ContaminatedMoE, DeviatedGaussianMoE, GaussianMoE
from ...params import Params, pack, unpack
from ..status import fit_status
from . import softmax_linear
from .gate_step import check_gate_ridge, slope_penalty
from .general import GeneralKernel
from .kernel import EMKernel, FitResult, State, rows, where_rows
from .known import KnownPartKernel
from .softmax_linear import SoftmaxLinearKernel

__all__ = ["ENGINES", "KERNELS", "broadcast_problem", "fit_em", "make_kernel", "run_em",
           "select_best", "shaped"]

# auto: the fast kernel where it applies, its E-step (and plain EM loop) in C when a
# compiler is available; tensor: the fast kernel in PyTorch only; general: the reference.
ENGINES = ("auto", "tensor", "general")


def gaussian_kernel(model: GaussianMoE, x: Tensor, y: Tensor, floor: Tensor, gate_steps: int,
                    engine: str, gate_ridge: float) -> EMKernel:
    """The fast kernel where it applies (``softmax_linear.applies``) and the engine allows
    it, else the reference kernel."""
    if engine != "general" and softmax_linear.applies(model, gate_steps, gate_ridge):
        return SoftmaxLinearKernel.build(model, x, y, floor, None if engine == "auto" else False)
    return GeneralKernel(model, x, y, floor, gate_steps, gate_ridge)


def _known_part_kernel(model, x, y, floor, gate_steps, engine, gate_ridge) -> EMKernel:
    return KnownPartKernel(model, x, y, floor, gate_steps)


#: EM kernels by model class (subclasses included, nearest class first):
#: ``factory(model, x, y, floor, gate_steps, engine, gate_ridge) -> EMKernel``.
KERNELS: dict[type, Callable[..., EMKernel]] = {
    GaussianMoE: gaussian_kernel,
    DeviatedGaussianMoE: _known_part_kernel,
    ContaminatedMoE: _known_part_kernel,
}


def make_kernel(model, x: Tensor, y: Tensor, floor: Tensor, gate_steps: int = 1,
                engine: str = "auto", gate_ridge: float = 0.0) -> EMKernel:
    """The EM kernel for ``model`` on B problems x (B, N, D), y (B, N)."""
    if engine not in ENGINES:
        raise ValueError(f"Unknown engine {engine!r}. Valid: {', '.join(ENGINES)}.")
    for cls in type(model).__mro__:
        if cls in KERNELS:
            return KERNELS[cls](model, x, y, floor, gate_steps, engine, gate_ridge)
    raise ValueError(f"EM has no kernel for {type(model).__name__}; it fits "
                     f"{', '.join(c.__name__ for c in KERNELS)} (register one in "
                     f"gatelab.fit.em.KERNELS).")


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


def _plain_update(kernel: EMKernel, shapes, params: Params, state: State, ll: Tensor, aux):
    return (*kernel.update(params, state, ll), 1)


_STEP_GROWTH = 4.0


def _squarem_update(kernel: EMKernel, shapes, params: Params, state: State, ll: Tensor, aux):
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
    out = {k: where_rows(good, (p3[k],), (p2[k],))[0] for k in p2}
    return (out, torch.where(good, ll3, ll2), where_rows(good, s3, s2), d1 | d2 | (d3 & good), 3)


def broadcast_problem(model, x, y, init: Params):
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
    x, y, params, lead = broadcast_problem(model, x, y, model.normalise(init))
    # Work per pass: samples x experts (the known-part models have no n_experts).
    with using_threads(threads_for(y.numel() * params["var"].shape[-1])):
        kernel = make_kernel(model, x, y, var_floor * y.var(-1), gate_steps, engine, gate_ridge)
        res = run_em(kernel, model.param_shapes(), params, tol, max_iter, accelerate, record)
        del kernel
        status = fit_status(model, x, y, params, res.params, res.converged, res.degenerate)
    loglik = res.loglik + slope_penalty(res.params, gate_ridge)
    return shaped(res._replace(loglik=loglik, status=status), lead)


def shaped(res, lead):
    """A flat result (a ``FitResult`` or ``LSQResult``, fields (B, ...)) with the batch
    shape ``lead`` restored on every field."""
    shape = lambda t: None if t is None else t.reshape(tuple(lead) + tuple(t.shape[1:]))  # noqa: E731
    return type(res)({k: shape(v) for k, v in res.params.items()}, *[shape(t) for t in res[1:]])


def run_em(kernel: EMKernel, shapes, params: Params, tol: float, max_iter: int, accelerate: bool,
            record: bool) -> FitResult:
    """The loop of ``fit_em`` over a kernel's B problems; a flat result (B, ...) without
    its status."""
    b = params["var"].shape[0]
    out = {k: v.clone() for k, v in params.items()}
    out_ll = params["var"].new_full((b,), float("nan"))
    n_iter = torch.zeros(b, dtype=torch.long)
    converged, degenerate = torch.zeros(b, dtype=torch.bool), torch.zeros(b, dtype=torch.bool)
    history = out_ll.new_full((b, max_iter + 1), float("nan")) if record else None
    own = None if accelerate or record else kernel.plain_em(params, tol, max_iter)
    if own is not None:
        return own
    update = _squarem_update if accelerate else _plain_update
    idx = torch.arange(b)                       # problems in the kernel's rows
    live = torch.ones(b, dtype=torch.bool)      # rows still iterating
    ll, state = kernel.e_step(params)
    aux = {"step_max": torch.ones_like(ll)}   # per-problem state of the update scheme
    if history is not None:
        history[:, 0] = ll
    while bool(live.any()):
        params, ll_new, state, deg, k = update(kernel, shapes, params, state, ll, aux)
        active = idx[live]
        n_iter[active] += k
        degenerate[active] |= deg[live]
        if history is not None:
            history[active, n_iter[active].clamp_max(max_iter)] = ll_new[live]
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
            state, params = rows(state, keep), {n: v[keep] for n, v in params.items()}
            aux = {n: v[keep] for n, v in aux.items()}
            live = torch.ones(keep.numel(), dtype=torch.bool)
    return FitResult(out, out_ll, n_iter, converged, degenerate, history=history)


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
