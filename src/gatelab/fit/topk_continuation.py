"""Maximum likelihood for top-K sparse softmax gating in any number of covariates, by a
smoothed top-K continuation (arXiv 2309.13850).

EM cannot move a top-K boundary (``fit.topk``), and in d >= 2 covariates the selection
regions are polyhedra, so the one-covariate change-point profile does not apply. The
continuation replaces the hard selection by ``gates.smoothed_top_k`` at temperature T,

    w_T(x) = softmax_i( s_i(x) + log sigmoid((s_i(x) - tau(x)) / T) ),

tau(x) halfway between the K-th and (K+1)-th largest score, which is continuous in the
parameters, so EM's gate step (closed-form Newton, ``SmoothedTopK.q_derivatives``) moves
the boundaries with everything else. The path starts at T = infinity, where the
smoothing is a constant and w_T is the dense softmax (EM's fast kernel), and T then
falls through a schedule (decades from 1 to 1e-4 by default, ``TEMPERATURES``), each
stage starting where the last stopped. A last stage at T = 0 is the hard model itself: a
few Newton steps of ``fit.polish``, where the gradient reaches the experts and, for
K >= 2, the softmax among the kept (a step that changes a selection is kept only if the
hard likelihood does not fall). The log-likelihood reported is the
hard model's, so starts compare on the model fitted.

What the result is: a local maximum of the hard likelihood reached by a path that let
the regions move, in the sense of ``_polish_hard``: the experts stationary, and no
Newton step on all parameters gaining more than the bound (at a kink, where a selection
boundary passes through a covariate, the gate's gradient need not vanish). It is not
certified to be the global maximum (no estimator of a top-K MLE in d >= 2 is), and
over-specified fits reach the supremum only as gate scores grow without bound (a K = 1
gate's scale is not identified at all), so the gate's scale is wherever the schedule
left it.

Shape legend: S starts, R replicates, N samples, D covariates, E experts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..gates import Gate, LinearGate, _expert_major, _reorder, smoothed_top_k
from ..models import GaussianMoE
from ..params import Params, Shapes
from .em import FitResult, fit_em
from .polish import DEFAULT_BOUND, polish
from .status import FitStatus, _collapsed, _stuck
from .topk import check_sparse

__all__ = ["SmoothedTopK", "smoothed_model", "smoothed_score_derivatives", "fit_topk_continuation",
           "check_temperatures", "TEMPERATURES"]

#: The default schedule after the dense start (T = infinity): temperatures on the scores'
#: own scale (a dropped score T below the threshold keeps weight factor 1/(1 + e)),
#: ending in the hard model (0). It runs to 1e-4 because a path stopped at 0.01 left
#: covariates within a few hundredths of a boundary half-selected: on a top-2 truth in
#: d = 2 (n = 8000) the T = 0.01 fit was 4.6 above the truth's log-likelihood and its hard
#: model 18.6 below it, while 1e-3 and 1e-4 brought the hard model to 9.8 and 10.2 above.
#: A stage at 1e-5 added 0.24 more: a stage moves a boundary only through the covariates
#: within about T of it, a handful below 1e-4 at these n.
TEMPERATURES = (1.0, 0.1, 0.01, 1e-3, 1e-4, 0.0)

#: Sample-rows per polish call: the autograd Hessian keeps P graphs of this size alive.
_CHUNK_ELEMENTS = 1 << 18


@dataclasses.dataclass(frozen=True, kw_only=True)
class SmoothedTopK(Gate):
    """``base``'s scores with ``smoothed_top_k`` at ``temperature`` in place of its hard
    top-K selection; everything else (blocks, free entries, normalisation) is the base
    gate's."""

    base: Gate
    temperature: float

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.base.top_k is None:
            raise ValueError(f"SmoothedTopK smooths a top-K gate; {self.base!r} has top_k=None.")

    def param_shapes(self, n_experts: int, dim: int) -> Shapes:
        return self.base.param_shapes(n_experts, dim)

    def scores(self, x_ND: Tensor, params: Params) -> Tensor:
        return self.base.scores(x_ND, params)

    def select(self, scores_NE: Tensor) -> Tensor:
        assert self.base.top_k is not None
        return smoothed_top_k(scores_NE, self.base.top_k, self.temperature)

    def free_mask(self, n_experts: int, dim: int) -> dict[str, Tensor]:
        return self.base.free_mask(n_experts, dim)

    def normalise(self, params: Params) -> Params:
        return self.base.normalise(params)

    def differentiable(self, dim: int) -> bool:
        return True

    def q_derivatives(self, x_BND: Tensor, resp_BNE: Tensor,
                      params: Params) -> tuple[Tensor, Tensor] | None:
        """Closed form for a base of linear softmax scores s_i = beta0_i + beta1_i . x
        (``smoothed_score_derivatives`` in the scores, chained through z = (1, x));
        None (autograd) for other bases."""
        base = self.base
        if not (type(base) is LinearGate and base.normaliser == "softmax"):
            return None
        assert base.top_k is not None
        scores = base.scores(x_BND, params)
        grad_BNE, neg_hess_BNEE = smoothed_score_derivatives(scores, resp_BNE, base.top_k,
                                                             self.temperature)
        z = torch.cat([torch.ones_like(x_BND[..., :1]), x_BND], -1)              # (B, N, P)
        b, e, p = scores.shape[0], scores.shape[-1], z.shape[-1]
        grad = (grad_BNE.transpose(-1, -2) @ z).reshape(b, e * p)
        zz = (z.unsqueeze(-1) * z.unsqueeze(-2)).reshape(b, -1, p * p)
        neg_hess = (neg_hess_BNEE.reshape(b, -1, e * e).transpose(-1, -2) @ zz)    # (B, E E, P P)
        neg_hess = neg_hess.reshape(b, e, e, p, p).transpose(2, 3).reshape(b, e * p, e * p)
        order = _expert_major(self, e, x_BND.shape[-1], ("beta0", "beta1"))
        return _reorder(grad, neg_hess, order)


def smoothed_score_derivatives(scores_BNE: Tensor, resp_BNE: Tensor, k: int,
                               temperature: float) -> tuple[Tensor, Tensor]:
    """Per covariate, the gradient and negative Hessian in the scores s of
    Q_n = sum_i r_i log w_i, w = softmax(u), u_i = s_i + log sigmoid(z_i),
    z_i = (s_i - tau) / T, tau = (s_a + s_b) / 2 (a, b the k-th and (k+1)-th largest:
    locally a fixed linear function c . s). With R = sum_i r_i, a_i = r_i - R w_i,
    q_i = sigmoid(-z_i) and g_i = q_i / T, the Jacobian du/ds is
    J_ij = d_ij (1 + g_i) - g_i c_j, and

        gradient = J^T a,
        -Hessian = R J^T (diag w - w w^T) J + sum_i h_i (d_i - c)(d_i - c)^T,

    h_i = a_i sigmoid(z_i) q_i / T^2 (from d^2 log sigmoid(z)/dz^2 = -sigmoid(z) q). Both
    are expanded below into diagonals and rank-one terms in c (no per-covariate matrix
    products). For k >= E the smoothing is the identity (g = 0, c = 0): the dense
    softmax's IRLS. Returns (B, N, E) and (B, N, E, E)."""
    e = scores_BNE.shape[-1]
    if k >= e:
        zero = torch.zeros_like(scores_BNE)
        u, g, c, curv = scores_BNE, zero, zero, zero
    else:
        ordered = scores_BNE.topk(k + 1, dim=-1)
        c = 0.5 * (F.one_hot(ordered.indices[..., k - 1], e)
                   + F.one_hot(ordered.indices[..., k], e)).to(scores_BNE.dtype)  # dtau/ds
        tau = 0.5 * (ordered.values[..., k - 1:k] + ordered.values[..., k:k + 1])
        z = (scores_BNE - tau) / temperature
        u, q = scores_BNE + F.logsigmoid(z), torch.sigmoid(-z)
        g, curv = q / temperature, torch.sigmoid(z) * q / temperature ** 2
    w = torch.softmax(u, -1)
    big_r = resp_BNE.sum(-1, keepdim=True)
    a = resp_BNE - big_r * w
    grad = a * (1 + g) - c * (a * g).sum(-1, keepdim=True)
    # J^T diag(w) J = diag(w (1+g)^2) - (m c^T + c m^T) + (sum w g^2) c c^T, m = w (1+g) g;
    # J^T w = w (1 + g) - c sum(w g); the curvature sum is diag(h) - (h c^T + c h^T) + (sum h) c c^T.
    h = a * curv
    m = big_r * w * (1 + g) * g + h
    v = w * (1 + g) - c * (w * g).sum(-1, keepdim=True)
    cc = (big_r * (w * g * g).sum(-1, keepdim=True) + h.sum(-1, keepdim=True)).unsqueeze(-1)
    outer = lambda p, r: p.unsqueeze(-1) * r.unsqueeze(-2)  # noqa: E731
    neg_hess = (torch.diag_embed(big_r * w * (1 + g) ** 2 + h) - outer(m, c) - outer(c, m)
                + cc * outer(c, c) - big_r.unsqueeze(-1) * outer(v, v))
    return grad, neg_hess


def smoothed_model(model: GaussianMoE, temperature: float) -> GaussianMoE:
    """``model`` with its top-K gate smoothed at ``temperature`` (the model itself at 0)."""
    if temperature == 0:
        return model
    gate = SmoothedTopK(base=model.gate, temperature=temperature, normaliser=model.gate.normaliser,
                        top_k=model.gate.top_k)
    return GaussianMoE(model.n_experts, model.dim, gate, model.expert, model.covariates)


def _warm_start(dense: FitResult, start: Params) -> Params:
    """The dense stage's fit where it is usable, the start elsewhere. A top-1 truth's data
    are nearly separable for a dense softmax, whose gate then runs off: usually to a few
    1e5 and harmlessly (the smoothed stages bring it back), but on one topk-cells data set
    (n = 8000) to 1e294, where the scores overflowed (status degenerate) and the path
    ended 8176 below the truth's log-likelihood, every covariate given to one expert."""
    assert dense.status is not None
    finite = torch.stack([torch.isfinite(v).flatten(1).all(-1) for v in dense.params.values()]).all(0)
    usable = finite & torch.isfinite(dense.loglik) & (dense.status != FitStatus.DEGENERATE)
    return {k: torch.where(usable.view(-1, *[1] * (v.dim() - 1)), v, start[k])
            for k, v in dense.params.items()}


def _polish_hard(model: GaussianMoE, x: Tensor, y: Tensor, params: Params, bound: float,
                 max_steps: int) -> tuple[Params, Tensor, Tensor]:
    """``fit.polish`` on the hard model, in chunks of rows: Newton on every free entry
    (``max_steps``), one more such step as a probe, then Newton on the experts alone.
    Returns (params, Newton steps, converged).

    Converged: the gradient over every free entry is at most ``bound``; or the experts'
    is, and the probe step raised the log-likelihood by at most ``bound`` per sample. The
    second case is a top-K gate's usual end, and a weaker certificate: the smoothed path
    leaves selection boundaries through covariates (at small T a boundary settles on a
    point), where the hard likelihood has a kink, so the gate's gradient need not vanish
    at a maximum (0.0092 per sample on a top-2 fit in d = 2, n = 2000, unchanged by 30
    further Newton steps, which gained 1.3e-7 in all), and a step on all entries that crosses the
    kink is refused, the experts' part with it (their gradient 6.7e-6 there). The
    experts, which no selection depends on, are smooth: Newton on them alone converges
    (to 7e-11 there)."""
    gate_blocks = set(model.gate.param_shapes(model.n_experts, model.dim))
    experts = [b for b in params if b not in gate_blocks]
    rows, n = x.shape[0], x.shape[-2]
    per = max(1, _CHUNK_ELEMENTS // (n * model.n_experts))
    steps = torch.zeros(rows, dtype=torch.long)
    converged = torch.zeros(rows, dtype=torch.bool)
    for i in range(0, rows, per):
        idx = slice(i, i + per)
        full = polish(model, x[idx], y[idx], {k: v[idx] for k, v in params.items()}, bound,
                      max_steps)
        probe = polish(model, x[idx], y[idx], full.params, bound, 1)
        smooth = polish(model, x[idx], y[idx], probe.params, bound, max_steps, blocks=experts)
        for k in params:
            params[k][idx] = smooth.params[k]
        steps[idx] = full.steps + probe.steps + smooth.steps
        flat = probe.gain <= bound * n
        converged[idx] = (full.grad_norm <= bound) | ((smooth.grad_norm <= bound) & flat)
    return params, steps, converged


def check_temperatures(temperatures: Any) -> None:
    """A ValueError unless ``temperatures`` is a falling sequence of numbers ending at 0
    (the hard model), the schedule ``fit_topk_continuation`` follows."""
    ok = (isinstance(temperatures, (list, tuple)) and len(temperatures) > 0
          and all(isinstance(t, (int, float)) for t in temperatures)
          and list(temperatures) == sorted(temperatures, reverse=True) and temperatures[-1] == 0)
    if not ok:
        raise ValueError(f"temperatures must be a falling list of numbers ending at 0 (the hard "
                         f"model), e.g. [1.0, 0.1, 0.01, 0.0]; got {temperatures!r}.")


def check_continuation(model: Any) -> None:
    """A ValueError naming the fix unless ``model`` is a Gaussian MoE with a top-K sparse
    softmax gate of linear scores. Other top-K gates are refused: a Laplace gate's scores
    cannot sharpen by scaling, and from the truth's own start in d = 2 (n = 1000) the path
    ended 31 below the truth's log-likelihood (dense stage first) or, without the dense
    stage, with the centres W run off to norms of 200 to 1300 (where -||W_i - x|| is
    nearly linear in x): no estimate of W."""
    gate = getattr(model, "gate", None)
    if not (isinstance(model, GaussianMoE) and type(gate) is LinearGate
            and gate.top_k is not None and gate.normaliser == "softmax"):
        raise ValueError(f"fit_topk_continuation fits a Gaussian MoE with a top-K sparse softmax "
                         f"gate of linear scores (make_gate('topk', top_k=K)); got {model!r}. "
                         f"Use fit_em for dense gates.")
    check_sparse(gate.top_k, model.n_experts)


def fit_topk_continuation(model: GaussianMoE, x: Tensor, y: Tensor, init: Params, *,
                          temperatures: tuple[float, ...] = TEMPERATURES, tol: float = 1e-8,
                          max_iter: int = 300, accelerate: bool = True, polish_steps: int = 10,
                          bound: float = DEFAULT_BOUND) -> FitResult:
    """Fit a top-K sparse softmax Gaussian MoE by the smoothed continuation of the module
    docstring: EM on the gate with every expert kept (T = infinity; its fit kept where usable,
    ``_warm_start``), then EM on the gate smoothed at
    each positive temperature (falling), each stage at most ``max_iter`` iterations from
    where the last stopped, then at most ``polish_steps`` Newton steps of ``fit.polish`` on
    the hard model (T = 0, the schedule's last entry).

    x (R, N, D), y (R, N) with starts ``init`` (S, R, k, ...), or one data set x (N, D),
    y (N,) with starts (S, k, ...). Returns (S, R, ...) [or (S, ...)]: the parameters, the
    hard model's log-likelihood, the EM iterations and Newton steps taken, ``converged``
    (``_polish_hard``: the hard model's gradient is at most ``bound``, or the experts' is
    and a Newton step on all parameters gains at most ``bound`` per sample), and the status:
    degenerate (a variance collapsed), stuck (the gate never moved), max_iter (not
    converged) or converged. No fit is called separated: a top-K gate's boundaries are
    sharp by definition."""
    check_continuation(model)
    check_temperatures(temperatures)
    if x.dim() == 2:
        one = fit_topk_continuation(model, x.unsqueeze(0), y.unsqueeze(0),
                                    {k: v.unsqueeze(1) for k, v in init.items()},
                                    temperatures=temperatures, tol=tol, max_iter=max_iter,
                                    accelerate=accelerate, polish_steps=polish_steps, bound=bound)
        assert one.status is not None
        return FitResult({k: v.squeeze(1) for k, v in one.params.items()}, one.loglik.squeeze(1),
                         one.n_iter.squeeze(1), one.converged.squeeze(1),
                         one.degenerate.squeeze(1), one.status.squeeze(1))
    n_starts, n_rep = init["var"].shape[:2]
    rows = n_starts * n_rep
    start = {k: v.reshape(rows, *v.shape[2:]).to(x.dtype) for k, v in init.items()}
    xb = x.unsqueeze(0).expand(n_starts, *x.shape).reshape(rows, *x.shape[1:])
    yb = y.unsqueeze(0).expand(n_starts, *y.shape).reshape(rows, y.shape[-1])
    # T = infinity: the same scores, every expert kept (a linear gate's is EM's fast kernel).
    dense = GaussianMoE(model.n_experts, model.dim, dataclasses.replace(model.gate, top_k=None),
                        model.expert, model.covariates)
    res = fit_em(dense, xb, yb, start, tol=tol, max_iter=max_iter, accelerate=accelerate)
    params, n_iter = _warm_start(res, start), res.n_iter.clone()
    for t in temperatures:
        if t > 0:
            res = fit_em(smoothed_model(model, t), xb, yb, params, tol=tol, max_iter=max_iter,
                         accelerate=accelerate)
            params, n_iter = res.params, n_iter + res.n_iter
    params, steps, converged = _polish_hard(model, xb, yb, params, bound, polish_steps)
    n_iter += steps
    loglik = torch.nan_to_num(model.log_likelihood(xb, yb, params), nan=float("-inf"))
    degenerate = _collapsed(params["var"], yb) | ~torch.isfinite(loglik)
    status = torch.where(converged, FitStatus.CONVERGED, FitStatus.MAX_ITER).to(torch.int8)
    status[degenerate] = FitStatus.DEGENERATE
    status[_stuck(model, start, params)] = FitStatus.STUCK
    shape = (n_starts, n_rep)
    return FitResult({k: v.reshape(*shape, *v.shape[1:]) for k, v in params.items()},
                     loglik.reshape(shape), n_iter.reshape(shape), converged.reshape(shape),
                     degenerate.reshape(shape), status.reshape(shape))
