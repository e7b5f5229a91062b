"""How a fit ended, in one word: the one definition the command line, the estimator and
the studies' counts of run-off fits share.

Each fit gets the most serious status that applies, in this order:

- ``stuck``: with two or more experts, no free gate parameter moved from its start. The
  start sat where the gate's step is zero or refused (a top-1 gate at a tie, a cosine
  gate at beta1 = 0), so the gate was never estimated, and nothing else about the fit
  means much (it outranks the rest: a stuck gate often also leaves an expert empty);
- ``degenerate``: an expert's variance fell to ``VARIANCE_COLLAPSE`` times Var(y) or below
  (an expert interpolating a handful of points: the likelihood is unbounded there), or an
  expert carries less than one sample's responsibility (its variance is not estimable);
- ``separated``: fewer than ``MIN_TRANSITION_SAMPLES`` samples lie in the transition of a
  boundary between two experts (where neither leads the other by ``SEPARATION_LOGIT``):
  the boundary sits in an empty stretch of the data, so nothing pins its sharpness down.
  The likelihood then keeps rising as the gate slopes grow (or is held finite only by a
  sample or two with responsibilities near 0 or 1): the estimate is wherever the
  optimiser stopped (see ``gate_ridge`` of ``fit_em`` for a penalised fit that stays
  finite);
- ``max_iter``: stopped on the iteration limit, not on the tolerance;
- ``converged``: none of the above.

Shape legend: B problems, N samples, E experts.
"""

from __future__ import annotations

from enum import IntEnum

import torch
from torch import Tensor

from ..gates import LinearGate
from ..models import GatedExperts
from ..params import Params, pick

__all__ = ["FitStatus", "STATUS_MEANING", "VARIANCE_COLLAPSE", "SEPARATION_LOGIT",
           "MIN_TRANSITION_SAMPLES",
           "STUCK_CHANGE", "MIN_EXPERT_WEIGHT", "fit_status", "status_names", "status_codes",
           "separated"]


class FitStatus(IntEnum):
    """Codes of ``FitResult.status``, in increasing seriousness."""

    CONVERGED = 0
    MAX_ITER = 1
    SEPARATED = 2
    DEGENERATE = 3
    STUCK = 4


STATUS_MEANING = {
    FitStatus.CONVERGED: "converged: the objective (log-likelihood or RSS) stopped changing",
    FitStatus.MAX_ITER: "stopped at max_iter before the tolerance was met; raise max_iter",
    FitStatus.STUCK: "stuck: the gate never moved from its start, so it was not estimated; "
                     "use random starts (n_init > 1) or another gate",
    FitStatus.SEPARATED: "separated: the data fall apart into groups that a gate boundary "
                         "splits with nothing near it, so the gate slopes run off and no "
                         "finite maximum likelihood estimate exists; fewer experts, more "
                         "data or a small gate ridge (--gate-ridge, gate_ridge=) give a "
                         "finite fit",
    FitStatus.DEGENERATE: "degenerate: an expert's variance collapsed onto a few points, or "
                          "an expert is empty; fit fewer experts or use more data",
}

#: A variance below this fraction of Var(y) means an expert fits a few points almost
#: exactly: with a signal-to-noise ratio of a million or more the fit is degenerate
#: (the Gaussian likelihood is unbounded as a variance goes to 0) rather than precise.
VARIANCE_COLLAPSE = 1e-6

#: Score gap beyond which a gate weight is within exp(-20) (2e-9) of 0 or 1. If every
#: sample on both sides of a boundary is that far from it, nothing in the data pins the
#: boundary's sharpness down.
SEPARATION_LOGIT = 20.0

#: A boundary whose transition holds fewer samples than this is not estimated from the
#: data: with no sample there the likelihood rises without bound as the slopes grow,
#: with one or two it is held by their responsibilities alone. A finite, data-determined
#: boundary has a transition 2 SEPARATION_LOGIT / |slope| wide, tens of samples at least
#: for any slope a study uses.
MIN_TRANSITION_SAMPLES = 3

#: Relative change below which a gate parameter counts as unmoved. Any real gate step,
#: even one taken at the optimum, changes more than this; a refused or zero step leaves
#: the parameter bit for bit.
STUCK_CHANGE = 1e-12

#: An expert with less total responsibility than one sample has no estimable variance
#: (EM's M-step checks it: ``em._variances`` and the C kernel).
MIN_EXPERT_WEIGHT = 1.0


def status_codes(result) -> Tensor:
    """The status codes of a fit result; every result gatelab's fitters return has them."""
    if result.status is None:
        raise ValueError("This fit result carries no status: it was not made by fit_em, "
                         "fit_lsq or fit_topk_segments.")
    return result.status


def status_names(status: Tensor | None) -> list[str]:
    """Status codes (any shape) as their names, flattened: ["converged", "separated", ...]."""
    if status is None:
        raise ValueError("No status: this fit result was not made by a gatelab fitter.")
    return [FitStatus(int(c)).name.lower() for c in status.reshape(-1)]


def separated(model: GatedExperts, x_BND: Tensor, params: Params) -> Tensor:
    """Whether some gate boundary lies in an empty stretch of the data, (B,) bool (see
    the module docstring). Softmax-type gates: a pair of experts {i, j} that are the
    leading two at some sample (so they share a boundary among the data), each leading
    somewhere, is separated when fewer than ``MIN_TRANSITION_SAMPLES`` samples have one
    of them leading the other by less than ``SEPARATION_LOGIT``. Sigmoid gates: expert i
    against its own zero score (both signs occur, and fewer samples have |s_i| below it)."""
    out = torch.zeros(x_BND.shape[0], dtype=torch.bool)
    rows = _may_separate(model, x_BND, params).nonzero().squeeze(-1)
    if rows.numel():
        out[rows] = _separated_rows(model, x_BND[rows], {k: v[rows] for k, v in params.items()})
    return out


def _may_separate(model: GatedExperts, x_BND: Tensor, params: Params) -> Tensor:
    """A cheap necessary condition for ``separated``, (B,). With a linear gate, a
    separated pair i, j (for a sigmoid gate, expert i against 0) has fewer than
    ``MIN_TRANSITION_SAMPLES`` of the samples its two experts lead within
    SEPARATION_LOGIT of the other, so if each leads at that many samples or more, the gap
    s_i - s_j reaches +LOGIT on one side and -LOGIT on the other. The gap is linear in x:
    over the data's bounding box [lo, hi] it lies between bottom and top, top = d0 +
    sum_d max(d1_d lo_d, d1_d hi_d) (d0, d1 the pair's intercept and slope differences),
    so a pair may separate only if top >= LOGIT and bottom <= -LOGIT. (A pair whose
    expert leads at one or two samples only is thereby not counted as separated.) Other
    gates: always True."""
    gate = model.gate
    if type(gate) is not LinearGate:
        return torch.ones(x_BND.shape[0], dtype=torch.bool)
    b1, b0 = params["beta1"], params["beta0"]                          # (B, E, D), (B, E)
    if gate.sums_to_one:
        d1, d0 = b1.unsqueeze(2) - b1.unsqueeze(1), b0.unsqueeze(2) - b0.unsqueeze(1)
        box = (x_BND.amin(-2)[:, None, None], x_BND.amax(-2)[:, None, None])   # (B, 1, 1, D)
    else:
        d1, d0 = b1, b0
        box = (x_BND.amin(-2)[:, None], x_BND.amax(-2)[:, None])              # (B, 1, D)
    low, high = d1 * box[0], d1 * box[1]
    top = d0 + torch.maximum(low, high).sum(-1)
    bottom = d0 + torch.minimum(low, high).sum(-1)
    return ((top >= SEPARATION_LOGIT) & (bottom <= -SEPARATION_LOGIT)).flatten(1).any(-1)


def _separated_rows(model: GatedExperts, x_BND: Tensor, params: Params) -> Tensor:
    gate = model.gate
    scores = gate.select(gate.scores(x_BND, pick(params, model.gate_blocks())))
    if not gate.sums_to_one:
        near = (scores.abs() < SEPARATION_LOGIT).sum(-2)                  # (B, E)
        both = (scores > 0).any(-2) & (scores < 0).any(-2)
        return (both & (near < MIN_TRANSITION_SAMPLES)).any(-1)
    e = scores.shape[-1]
    if e < 2:
        return torch.zeros(scores.shape[0], dtype=torch.bool)
    top = scores.topk(2, dim=-1)
    first = top.indices[..., 0]                                        # (B, N)
    # Pairs that are the leading two somewhere: only they share a boundary in the data.
    pair_ok = torch.isfinite(top.values[..., 1])                       # top-K drops: no pair
    pair = torch.where(pair_ok, first * e + top.indices[..., 1], 0)
    adjacent = torch.zeros(scores.shape[0], e * e, dtype=torch.bool).scatter_(1, pair, pair_ok)
    adjacent = adjacent.view(-1, e, e)
    adjacent = adjacent | adjacent.transpose(1, 2)
    # near[b, i, j]: samples that expert i leads by less than SEPARATION_LOGIT over j.
    lead = top.values[..., :1] - scores                                # (B, N, E), inf if dropped
    near = lead.new_zeros((scores.shape[0], e, e))
    near.scatter_add_(1, first.unsqueeze(-1).expand_as(lead), (lead < SEPARATION_LOGIT).to(lead.dtype))
    leads = torch.zeros(scores.shape[0], e, dtype=torch.bool).scatter_(1, first, True)
    both = adjacent & leads.unsqueeze(2) & leads.unsqueeze(1)
    return (both & ((near + near.transpose(1, 2)) < MIN_TRANSITION_SAMPLES)).flatten(1).any(-1)


def _stuck(model: GatedExperts, start: Params, end: Params) -> Tensor:
    """No free gate entry moved from ``start`` (B,), for two or more experts."""
    masks = model.gate.free_mask(model.n_experts, model.dim)
    moved = None
    for name, mask in masks.items():
        a, b = start[name], end[name]
        change = ((b - a).abs() > STUCK_CHANGE * (1 + a.abs())) & mask
        row = change.flatten(1).any(-1)
        moved = row if moved is None else moved | row
    stuck = ~moved if moved is not None else torch.zeros(end["var"].shape[0], dtype=torch.bool)
    return stuck & (model.n_experts > 1)


def _collapsed(var_BE: Tensor, y_BN: Tensor) -> Tensor:
    return (var_BE <= VARIANCE_COLLAPSE * y_BN.var(-1, keepdim=True)).flatten(1).any(-1)


def fit_status(model, x_BND: Tensor, y_BN: Tensor, start: Params, end: Params,
               converged: Tensor, degenerate: Tensor, stuck: Tensor | None = None) -> Tensor:
    """The status (B,) int8 of B fits of ``model`` from ``start`` to ``end`` on their
    data, given the estimator's own ``converged`` and ``degenerate`` flags (a floored
    variance, or an expert with less than ``MIN_EXPERT_WEIGHT`` responsibility, at any
    iteration: EM has the responsibilities at hand, so it checks them). Gate checks (separated, stuck) apply
    to gated models; for deviated and contaminated models only the variance and
    convergence checks do. The noise variance of an ``MoERegression`` is ``nu``. ``stuck``
    (B,) replaces the start-to-end check, for a fit continued from another's end (a
    polish), whose gate was or was not estimated by the first."""
    bad = degenerate.clone()
    var = end["var"] if "var" in end else end.get("nu")
    if var is not None:
        bad |= _collapsed(var.reshape(var.shape[0], -1), y_BN)
    status = torch.where(converged, FitStatus.CONVERGED, FitStatus.MAX_ITER).to(torch.int8)
    gated = isinstance(model, GatedExperts)
    if gated:
        status[separated(model, x_BND, end)] = FitStatus.SEPARATED
    status[bad] = FitStatus.DEGENERATE
    if gated:
        status[_stuck(model, start, end) if stuck is None else stuck] = FitStatus.STUCK
    return status
