"""Maximum likelihood for top-K sparse softmax gating with one covariate (arXiv 2309.13850).

EM cannot fit a top-K gate. With K = 1 the expected gate term sum_n r_n log w(x_n) is 0
at the current selection and -inf for any gate move that changes one sample's selection,
so the gate never leaves its start. With one covariate, though, the selection is
piecewise constant in x and the likelihood is a change-point likelihood.

Two linear experts under a top-1 gate split the line at one boundary t, one expert on
each side. Only t is identifiable (any positive multiple of the gate's scores selects the
same way). The MLE profiles the boundary: for a split after the m-th smallest x, each side
is an OLS fit with its MLE variance, and

    l(m) = -m/2 (log(2 pi RSS_left / m) + 1) - (n-m)/2 (log(2 pi RSS_right / (n-m)) + 1),

evaluated for every split at once from cumulative sums (O(n log n) with the sort).

Over-specified fits (k experts, top-K, to a two-region truth) reach the likelihood's
supremum only in a limit: each region is served by its own experts, and the other
region's experts get zero weight there, which needs infinite gate scores.
``fit_topk_segments`` fits that limit: the boundary from the two-expert profile, then on
each side a dense softmax Gaussian MoE over that side's experts by EM (one expert: the
side's OLS fit). It is the MLE of the limiting model given the boundary; the boundary
converges at n^-1 (a jump in the regression function), faster than everything else, so
fixing it changes no rate.

Shape legend: S starts, R replicates, N samples, E experts.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .._threads import threads_for, using_threads
from ..experts import LinearExpert
from ..gates import LinearGate
from ..models import GaussianMoE
from ..params import Params
from .em import FitResult, fit_em
from .status import VARIANCE_COLLAPSE, FitStatus, status_codes

__all__ = ["Split", "split_profile", "fit_topk_segments", "segment_top_k", "check_sparse",
           "random_sides",
           "BOUNDARY_SCALE"]

#: Gate-score slope that stands in for the infinite one of the limiting model: a
#: wrong-side expert's weight is exp(-1e6 |x - t|), below 1e-40 beyond 1e-4 of the boundary.
BOUNDARY_SCALE = 1e6


class Split(NamedTuple):
    """The two-segment MLE: boundary t (R,), per side (left: x < t, right: x > t) the OLS
    intercept b, slope a and MLE variance var, each (R, 2), and the log-likelihood (R, 2)
    of each side."""

    boundary: Tensor
    b: Tensor
    a: Tensor
    var: Tensor
    loglik: Tensor


def split_profile(x: Tensor, y: Tensor, min_size: int = 5, var_floor: float = 1e-8) -> Split:
    """Exact MLE of two linear-Gaussian segments y = a_s x + b_s + N(0, var_s), s = left
    or right of a boundary t, batched over leading dims: x, y (R, N). Every split between
    distinct sorted covariates with at least ``min_size`` samples per side is scored; t is
    the midpoint of the winning gap. Variances are floored at ``var_floor * Var(y)``."""
    if x.shape != y.shape or x.dim() != 2:
        raise ValueError(f"split_profile needs x and y of one shape (R, N); got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}.")
    n = x.shape[-1]
    if n < 2 * min_size:
        raise ValueError(f"A two-segment fit needs at least {2 * min_size} samples (min_size="
                         f"{min_size} per side); got {n}.")
    xs, order = x.sort(-1)
    ys = y.gather(-1, order)
    # Centring keeps the cumulative sums well conditioned.
    xc = xs - xs.mean(-1, keepdim=True)
    yc = ys - ys.mean(-1, keepdim=True)
    moments = torch.stack([torch.ones_like(xc), xc, xc * xc, yc, xc * yc, yc * yc], -1)
    csum = torch.nn.functional.pad(moments.cumsum(-2), (0, 0, 1, 0))     # (R, N+1, 6)
    left = csum[:, 1:n]                                                  # splits m = 1..n-1
    right = csum[:, n:n + 1] - left
    floor = var_floor * y.var(-1, keepdim=True)
    ll_left, ll_right = _side_loglik(left, floor), _side_loglik(right, floor)
    total = ll_left + ll_right
    m = torch.arange(1, n, device=x.device)
    usable = (m >= min_size) & (m <= n - min_size)
    usable = usable & (xs[:, 1:] > xs[:, :-1])       # a split must fall between distinct x
    best = torch.where(usable, total, float("-inf")).argmax(-1)             # (R,)
    pick = best.unsqueeze(-1)
    boundary = 0.5 * (xs.gather(-1, pick) + xs.gather(-1, pick + 1)).squeeze(-1)
    sides = [_ols(s.gather(1, pick.unsqueeze(-1).expand(-1, 1, 6)).squeeze(1), f.squeeze(-1))
             for s, f in ((left, floor), (right, floor))]
    shift_x, shift_y = xs.mean(-1), ys.mean(-1)
    a = torch.stack([s[0] for s in sides], -1)
    b = torch.stack([s[1] for s in sides], -1) + shift_y.unsqueeze(-1) - a * shift_x.unsqueeze(-1)
    var = torch.stack([s[2] for s in sides], -1)
    loglik = torch.stack([ll_left.gather(-1, pick), ll_right.gather(-1, pick)], -1).squeeze(-2)
    return Split(boundary, b, a, var, loglik)


def _ols(stats: Tensor, floor: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(slope, intercept, MLE variance) from moment sums (..., 6) of centred data."""
    count, sx, sxx, sy, sxy, syy = stats.unbind(-1)
    cxx = sxx - sx * sx / count
    cxy = sxy - sx * sy / count
    slope = cxy / cxx
    rss = syy - sy * sy / count - slope * cxy
    return slope, sy / count - slope * sx / count, torch.maximum(rss / count, floor)


def _side_loglik(stats: Tensor, floor: Tensor) -> Tensor:
    """Profile Gaussian log-likelihood of an OLS fit, -m/2 (log(2 pi var) + 1), per split;
    -inf where a side has fewer than 3 samples."""
    count = stats[..., 0]
    _, _, var = _ols(stats, floor)
    ll = -0.5 * count * (torch.log(2 * math.pi * var) + 1)
    return torch.where(count >= 3, ll, float("-inf"))


def check_sparse(top_k: int, n_experts: int) -> None:
    """A ValueError unless a top-K gate drops some of its experts (K < k): one that keeps
    them all is a dense softmax gate, which EM fits."""
    if top_k >= n_experts:
        raise ValueError(f"A top-{top_k} gate over {n_experts} experts keeps them all: "
                         f"it is a dense softmax gate; fit it with fit_em.")


def segment_top_k(model) -> int:
    """K of a model that ``fit_topk_segments`` can fit; a ValueError naming the fix if not."""
    gate = model.gate
    if not (isinstance(model, GaussianMoE) and type(gate) is LinearGate and gate.top_k
            and gate.normaliser == "softmax" and model.dim == 1
            and type(model.expert) is LinearExpert):
        raise ValueError(f"fit_topk_segments fits a Gaussian MoE with one covariate, linear "
                         f"experts and a top-K softmax gate (make_gate('topk', top_k=K)); got "
                         f"{model!r}. Use fit_em for dense gates.")
    check_sparse(gate.top_k, model.n_experts)
    if model.n_experts > 2 * gate.top_k:
        raise ValueError(f"fit_topk_segments gives each side of the boundary at most K = "
                         f"{gate.top_k} experts, so it fits at most {2 * gate.top_k}; got "
                         f"n_experts={model.n_experts}. Fit fewer experts or a larger top_k.")
    return gate.top_k


def fit_topk_segments(model: GaussianMoE, x: Tensor, y: Tensor, init: Params, *,
                      tol: float = 1e-6, max_iter: int = 2000, accelerate: bool = False,
                      min_size: int = 5, var_floor: float = 1e-8,
                      sides: Tensor | None = None) -> FitResult:
    """Fit a top-K sparse softmax Gaussian MoE (k experts, one covariate, linear experts)
    to data from a two-region truth, as the limit described in the module docstring.

    x (R, N, 1), y (R, N) with starts ``init`` (S, R, k, ...), or one data set x (N, 1),
    y (N,) with starts (S, k, ...), in the model's own form (e.g. ``near_truth`` or
    ``random_starts``). Each start's experts go to the side whose OLS fit is nearest in
    (a, b, var), as far as each side gets between 1 and K experts (``_assign_sides``);
    or ``sides`` gives the assignment, (S, [R,] k) bool, True for the right side (e.g.
    ``random_sides`` for random starts, whose experts all resemble the pooled fit).
    A side with m >= 2 experts is fitted by EM from the start's own values with a dense
    softmax gate, as the top-K gate is there (the starts that give a side the same m are
    one batched ``fit_em``). The result (S, R, ...) is in the model's form, each side's
    experts' scores lifted by +-c (x - t), with c at least ``BOUNDARY_SCALE`` times the
    largest within-side score, so that the top-K selection switches at t. The
    log-likelihood is the model's own at the returned parameters. The status is the most
    serious of the two sides' (``gatelab.fit.status``): the lifted boundary is the
    limiting model by design, not a separated fit."""
    top_k = segment_top_k(model)
    if x.dim() == 2:
        one = fit_topk_segments(model, x.unsqueeze(0), y.unsqueeze(0),
                                {k: v.unsqueeze(1) for k, v in init.items()}, tol=tol,
                                max_iter=max_iter, accelerate=accelerate, min_size=min_size,
                                var_floor=var_floor,
                                sides=None if sides is None else sides.unsqueeze(1))
        return FitResult({k: v.squeeze(1) for k, v in one.params.items()}, one.loglik.squeeze(1),
                         one.n_iter.squeeze(1), one.converged.squeeze(1),
                         one.degenerate.squeeze(1), status_codes(one).squeeze(1))
    x1 = x.squeeze(-1)
    with using_threads(threads_for(y.numel())):
        split = split_profile(x1, y, min_size, var_floor)
    right = _assign_sides(init, split, top_k) if sides is None else _checked_sides(sides, init, top_k)
    out = {k: v.clone() for k, v in init.items()}
    shape = right.shape[:2]
    n_iter = torch.zeros(shape, dtype=torch.long)
    converged, degenerate = torch.ones(shape, dtype=torch.bool), torch.zeros(shape, dtype=torch.bool)
    status = torch.zeros(shape, dtype=torch.int8)
    options = {"tol": tol, "max_iter": max_iter, "accelerate": accelerate, "var_floor": var_floor}
    for r in range(shape[1]):
        starts = list(range(shape[0]))
        side_fits = [_fit_side(model, x1[r], y[r], split, r, j, right[:, r], starts,
                               {k: v[:, r] for k, v in init.items()}, options) for j in (0, 1)]
        for s in starts:
            fits = [side[s] for side in side_fits]
            lift = BOUNDARY_SCALE * (1.0 + max(_score_bound(f.params, x1[r]) for f in fits))
            for block in ("a", "b", "var", "beta0", "beta1"):
                out[block][s, r] = _merge(block, fits, right[s, r], split.boundary[r], lift)
            n_iter[s, r] = max(f.n_iter for f in fits)
            converged[s, r] = all(f.converged for f in fits)
            degenerate[s, r] = any(f.degenerate for f in fits)
            status[s, r] = max(f.status for f in fits)
    out = model.normalise(out)
    # The log-likelihood of the returned parameters themselves, so that a side fit whose
    # gate ran off (overflowing its own bookkeeping) cannot win the choice of start.
    loglik = torch.nan_to_num(model.log_likelihood(x1.unsqueeze(-1), y, out), nan=float("-inf"))
    broken = ~torch.isfinite(loglik)
    status[broken] = torch.maximum(status[broken], torch.tensor(FitStatus.DEGENERATE, dtype=torch.int8))
    return FitResult(out, loglik, n_iter, converged, degenerate | broken, status)


def random_sides(n_starts: int, n_experts: int, top_k: int,
                 generator: torch.Generator | None = None) -> Tensor:
    """Side assignments for ``n_starts`` starts, (S, k) bool (True: right): start s puts
    the c-th feasible count of experts on the right (every count from max(1, k - K) to
    min(K, k - 1), in turn), a random choice of which."""
    counts = list(range(max(1, n_experts - top_k), min(top_k, n_experts - 1) + 1))
    rows = []
    for s in range(n_starts):
        order = torch.randperm(n_experts, generator=generator)
        rows.append(order < counts[s % len(counts)])
    return torch.stack(rows)


def _checked_sides(sides: Tensor, init: Params, top_k: int) -> Tensor:
    if sides.dtype != torch.bool or sides.shape != init["var"].shape:
        raise ValueError(f"sides must be a bool tensor of shape {tuple(init['var'].shape)} "
                         f"(starts, [replicates,] experts); got {sides.dtype} "
                         f"{tuple(sides.shape)}.")
    n_right = sides.sum(-1)
    k = sides.shape[-1]
    if bool(((n_right < max(1, k - top_k)) | (n_right > min(top_k, k - 1))).any()):
        raise ValueError(f"sides must give each side 1 to top_k={top_k} experts.")
    return sides


def _assign_sides(init: Params, split: Split, top_k: int) -> Tensor:
    """True where a start's expert goes to the right side: the experts nearest the right
    side's OLS fit in (a, b, var), relative to the left's, as many as are nearer to it,
    but at least k - K and at most K (each side gets 1 to K experts; k <= 2K)."""
    start = torch.stack([init["a"][..., 0], init["b"], init["var"]], -1)        # (S, R, k, 3)
    sides = torch.stack([split.a, split.b, split.var], -1)                      # (R, 2, 3)
    dist = (start.unsqueeze(-2) - sides.unsqueeze(-3)).square().sum(-1)        # (S, R, k, 2)
    lean = dist[..., 1] - dist[..., 0]                # < 0: nearer the right side
    k = lean.shape[-1]
    n_right = (lean < 0).sum(-1).clamp(max(1, k - top_k), min(top_k, k - 1))   # (S, R)
    rank = lean.argsort(-1).argsort(-1)               # 0 for the most right-leaning expert
    return rank < n_right.unsqueeze(-1)


class _Side(NamedTuple):
    params: Params          # the side's experts (m, ...)
    n_iter: int
    converged: bool
    degenerate: bool
    status: int             # a ``FitStatus`` code


def _fit_side(model: GaussianMoE, x: Tensor, y: Tensor, split: Split, r: int, j: int,
              right: Tensor, starts: list[int], init: Params, options: dict) -> dict[int, _Side]:
    """Side j (0 left, 1 right) of replicate r for every start in ``starts``: the side's
    OLS fit where a start puts one expert there, else EM with a dense softmax gate, one
    batched fit per number of experts m. ``right`` (S, k), ``init`` blocks (S, k, ...)."""
    members = right if j else ~right
    m_of = {s: int(members[s].sum()) for s in starts}
    ols = {"a": split.a[r, j].view(1, 1), "b": split.b[r, j].view(1),
           "var": split.var[r, j].view(1), "beta1": x.new_zeros(1, 1), "beta0": x.new_zeros(1)}
    collapsed = bool(split.var[r, j] <= VARIANCE_COLLAPSE * y.var())
    ols_status = FitStatus.DEGENERATE if collapsed else FitStatus.CONVERGED
    fits = {s: _Side(ols, 1, True, collapsed, ols_status) for s in starts if m_of[s] == 1}
    mask = (x > split.boundary[r]) if j else (x < split.boundary[r])
    for m in sorted(set(m_of.values()) - {1}):
        group = [s for s in starts if m_of[s] == m]
        batch = {k: torch.stack([v[s][members[s]] for s in group]) for k, v in init.items()}
        dense = GaussianMoE(m, 1, "softmax", model.expert, model.covariates)
        res = fit_em(dense, x[mask].unsqueeze(-1), y[mask], batch, **options)
        for i, s in enumerate(group):
            fits[s] = _Side({k: v[i] for k, v in res.params.items()}, int(res.n_iter[i]),
                            bool(res.converged[i]), bool(res.degenerate[i]),
                            int(status_codes(res)[i]))
    return fits


def _score_bound(params: Params, x: Tensor) -> float:
    """A bound on |beta1 x + beta0| over the data, for a side's dense gate."""
    reach = float(x.abs().max())
    return float((params["beta1"].abs().sum(-1) * reach + params["beta0"].abs()).max())


def _merge(block: str, sides: list[_Side], right: Tensor, boundary: Tensor,
           lift: float) -> Tensor:
    """One block of the full model from the two sides' fits, each expert in its own slot;
    gate blocks get the side's lift +-lift (x - t), lift >= BOUNDARY_SCALE times the
    largest within-side score, so that the top-K selection switches at t."""
    out = torch.empty((right.shape[0], *sides[0].params[block].shape[1:]),
                      dtype=sides[0].params[block].dtype)
    for j, fit in enumerate(sides):
        value = fit.params[block]
        sign = 1.0 if j else -1.0
        if block == "beta1":
            value = value + sign * lift
        elif block == "beta0":
            value = value - sign * lift * boundary
        out[right == bool(j)] = value
    return out
