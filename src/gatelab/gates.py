"""The gate catalogue: score functions, the shared normalise and select steps, and the
hierarchical two-level composition.

A gate maps covariates to one score ("logit") per expert; turning scores into weights is
a separate step that every gate shares: optional top-K selection (all but the K largest
scores set to -inf), then a normaliser (softmax, or an elementwise sigmoid that is not
normalised). The statistical models and the ``gatelab.nn`` layers call the same code.

Shape legend: N samples, D features, E experts. Leading ``...`` dimensions are batch
(replicate) dimensions; covariates ``x_ND`` of shape (..., N, D) broadcast against
parameter blocks of shape (..., E, ...), and scores have shape (..., N, E).

Every gate has an intercept block ``beta0`` of shape (E,): the gate's contribution to an
expert's mass (m_i = exp(beta0_i) for softmax-type gates, sigmoid(beta0_i) for sigmoid).
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _experts_first as _ef
from ._checks import broadcast_shapes, build, check_int, check_positive, choose
from .params import Params, Shapes, random_blocks, take_prefix, with_prefix

__all__ = [
    "Gate", "LinearGate", "CosineGate", "PerturbedCosineGate", "QuadraticGate", "LaplaceGate",
    "GaussianGate", "InputFreeGate", "HierarchicalGate", "GATES", "NORMALISERS", "make_gate",
    "top_k_mask", "top_k_indices", "smoothed_top_k", "separable_q_derivatives",
    "EXAMPLE_OPTIONS", "example_gate", "network_form",
]

NEG_INF = float("-inf")


# --- the shared steps: select, then normalise -----------------------------------------

def top_k_indices(scores_NE: Tensor, k: int) -> Tensor:
    """The experts of the ``k`` largest scores in each row, (..., N, k), largest first;
    ties broken by ``torch.topk``'s order. The one top-K of the models and the routers."""
    return scores_NE.topk(k, dim=-1).indices


def top_k_mask(scores_NE: Tensor, k: int) -> Tensor:
    """Keep exactly the ``k`` largest scores in each row (``top_k_indices``); set the
    rest to -inf, so exactly ``k`` entries stay finite.
    Sparse softmax gating (arXiv 2309.13850): softmax over the K kept scores.
    """
    if k >= scores_NE.shape[-1]:
        return scores_NE
    idx_NK = top_k_indices(scores_NE, k)
    keep = torch.zeros_like(scores_NE, dtype=torch.bool).scatter(-1, idx_NK, True)
    return scores_NE.masked_fill(~keep, NEG_INF)


def smoothed_top_k(scores_NE: Tensor, k: int, temperature: float) -> Tensor:
    """A continuous stand-in for ``top_k_mask``: the scores plus log sigmoid((s_i - tau) / T),
    tau halfway between the k-th and (k+1)-th largest score in each row. As T -> 0 the
    kept scores gain 0 and the dropped ones -inf, so the softmax of the result tends to the
    top-K sparse softmax (arXiv 2309.13850); at T > 0 it is continuous in the scores and
    differentiable almost everywhere, so a selection boundary can move under a gradient
    (``fit.topk.fit_topk_continuation``). For k >= E the scores are returned unchanged."""
    if k >= scores_NE.shape[-1]:
        return scores_NE
    if not temperature > 0:
        raise ValueError(f"smoothed_top_k needs a temperature > 0, got {temperature}; "
                         f"use top_k_mask for the hard selection.")
    ordered = scores_NE.topk(k + 1, dim=-1).values
    tau = 0.5 * (ordered[..., k - 1:k] + ordered[..., k:k + 1])
    return scores_NE + F.logsigmoid((scores_NE - tau) / temperature)


@dataclass(frozen=True)
class Normaliser:
    """Turns scores into weights; ``log_weights`` is the numerically stable log."""

    name: str
    weights: Any
    log_weights: Any
    sums_to_one: bool
    # df/ds_i of f = sum_l w_l(s) h_l from the weights w and values h (both (..., E)):
    # the gate's part of a least-squares Jacobian (``MoERegression.mean_jacobian``).
    score_slope: Any = None


def _over_experts(fn: Any, s: Tensor) -> Tensor:
    """``fn(s, -1)`` (softmax or log_softmax over the expert axis). Batched scores
    (B, N, E) with few experts on a CPU, the statistics lab's problems, run on the
    transposed view: PyTorch's kernel along a short last axis is 2-5x slower there
    (measured at E <= 8, N = 4,000); values agree to rounding. A router's (T, E) logits
    keep the plain kernel, which matches transformers' routers to the bit."""
    if s.dim() >= 3 and s.shape[-1] <= 16 and s.device.type == "cpu":
        return fn(s.transpose(-1, -2), -2).transpose(-1, -2)
    return fn(s, -1)


NORMALISERS: dict[str, Normaliser] = {
    # dw_l/ds_i = w_l (delta_li - w_i), so df/ds_i = w_i (h_i - f).
    "softmax": Normaliser("softmax", lambda s: _over_experts(torch.softmax, s),
                          lambda s: _over_experts(torch.log_softmax, s), True,
                          lambda w, h: w * (h - (w * h).sum(-1, keepdim=True))),
    # Sigmoid gating (arXiv 2405.13997): each weight is sigmoid(s_i); weights need not sum
    # to 1. dw_i/ds_i = w_i (1 - w_i).
    "sigmoid": Normaliser("sigmoid", torch.sigmoid, F.logsigmoid, False,
                          lambda w, h: w * (1 - w) * h),
}


# --- the gate base class -------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Gate(ABC):
    """A score function s(x; params) -> (..., N, E) plus how its scores become weights.

    Weights: w(x) = normaliser(top_k_mask(s(x), top_k)); with ``top_k=None`` all
    experts stay. Instances hold hyper-parameters only; parameters are passed in as a
    dict of blocks so that many replicates (leading dimensions) evaluate at once.
    """

    normaliser: str = "softmax"
    top_k: int | None = None

    name: ClassVar[str] = "gate"
    # Blocks that absorb a common shift of all scores (softmax identifiability).
    shift_blocks: ClassVar[tuple[str, ...]] = ("beta0",)
    # Whether expert i's score depends on row i of each block alone (every block leading
    # with the expert axis): least squares then builds its Jacobian a row entry at a
    # time for all experts at once (``MoERegression.mean_jacobian``). A gate that couples
    # experts' parameters must say False.
    separable_scores: ClassVar[bool] = True

    def __post_init__(self) -> None:
        choose("normaliser", self.normaliser, NORMALISERS)
        if self.top_k is not None:
            check_int("top_k", self.top_k, 1)

    @abstractmethod
    def param_shapes(self, n_experts: int, dim: int) -> Shapes:
        """Event shape of each parameter block for ``n_experts`` experts in dimension ``dim``."""

    @abstractmethod
    def scores(self, x_ND: Tensor, params: Params) -> Tensor:
        """Scores (..., N, E) for covariates (..., N, D)."""

    def select(self, scores_NE: Tensor) -> Tensor:
        """Top-K selection (identity when ``top_k`` is None)."""
        if self.top_k is None:
            return scores_NE
        if self.top_k > scores_NE.shape[-1]:
            raise ValueError(f"top_k={self.top_k} exceeds the {scores_NE.shape[-1]} experts this "
                             f"gate routes over; choose top_k <= {scores_NE.shape[-1]}.")
        return top_k_mask(scores_NE, self.top_k)

    def weights(self, x_ND: Tensor, params: Params) -> Tensor:
        """Gate weights w(x), shape (..., N, E)."""
        return NORMALISERS[self.normaliser].weights(self.select(self.scores(x_ND, params)))

    def log_weights(self, x_ND: Tensor, params: Params) -> Tensor:
        """log w(x), shape (..., N, E); -inf for experts that top-K dropped."""
        return NORMALISERS[self.normaliser].log_weights(self.select(self.scores(x_ND, params)))

    @property
    def sums_to_one(self) -> bool:
        """Whether the weights form a probability vector (needed by density models)."""
        return NORMALISERS[self.normaliser].sums_to_one

    def check(self, n_experts: int) -> None:
        """Validate the gate against the number of experts it will route over."""
        if self.top_k is not None:
            check_int("top_k", self.top_k, 1, n_experts,
                      fix="Top-K keeps K of the k experts: choose top_k <= n_experts.")

    def normalise(self, params: Params) -> Params:
        """Identifiable form: softmax-type gates are invariant to a common shift of all
        scores, so the shift blocks are taken relative to the last expert (whose become 0).
        Sigmoid gates are not shift-invariant and are returned unchanged."""
        out = dict(params)
        if self.normaliser != "softmax":
            return out
        ndims = {k: len(v) for k, v in self.param_shapes(1, 1).items()}
        for name in self.shift_blocks:
            t = params[name]
            last = t.select(t.dim() - ndims[name], -1).unsqueeze(t.dim() - ndims[name])
            out[name] = t - last
        return out

    def translations(self, n_experts: int, dim: int) -> dict[str, tuple[int, ...]]:
        """The blocks besides the intercepts whose shift by a common t leaves the weights
        unchanged, each with the shape of t, which broadcasts over the block's shape
        (softmax-type gates: beta1 with t of shape (1, D), a quadratic gate's A with (1, D,
        D)); ``losses.translated_loss`` minimises over them. None for sigmoid gates, which
        have no such invariance."""
        if self.normaliser != "softmax":
            return {}
        shapes = self.param_shapes(n_experts, dim)
        return {b: (1, *shapes[b][1:]) for b in self.shift_blocks if b != "beta0"}

    def random_params(self, n_experts: int, dim: int, generator: torch.Generator | None = None,
                      batch_shape: tuple[int, ...] = (), dtype: torch.dtype = torch.float64) -> Params:
        """Standard-normal draws for every block (tests and random starts)."""
        return random_blocks(self.param_shapes(n_experts, dim), generator, batch_shape, dtype)

    def log_masses(self, params: Params) -> tuple[Tensor, bool]:
        """The masses of the experts' atoms in the mixing measure, as logs (..., E), and
        whether they are relative: m_i = exp(beta0_i) for softmax-type gates (defined up
        to a common factor, like the intercepts), sigmoid(beta0_i) for sigmoid gates."""
        beta0 = params["beta0"]
        if self.normaliser == "sigmoid":
            return F.logsigmoid(beta0), False
        return beta0, True

    def atom_blocks(self, n_experts: int, dim: int) -> list[str]:
        """The gate blocks that belong to each expert's atom: all but the intercepts,
        which give the masses."""
        return [b for b in self.param_shapes(n_experts, dim) if b != "beta0"]

    def q_derivatives(self, x_BND: Tensor, resp_BNE: Tensor,
                      params: Params) -> tuple[Tensor, Tensor] | None:
        """Closed-form derivatives of the gate's part of EM's expected log-likelihood,

            Q(theta) = sum_n sum_i r_ni log w_i(x_n; theta),

        for B problems (x (B, N, D), resp (B, N, E), blocks (B, ...)): the gradient (B, F)
        and the negative Hessian (B, F, F) over the F entries ``free_mask`` leaves free,
        in the order of ``params.pack`` over ``param_shapes``. Rows of resp need not sum
        to 1 (an inner level of a hierarchical gate gets R_n = sum_i r_ni < 1).

        None (the default): the estimator differentiates ``log_weights`` by autograd. A
        gate that gives them gets EM's closed-form Newton step (``q_concave`` chooses its
        rule for a system that is not positive definite); the test suite checks every
        gate's against autograd."""
        return None

    #: Whether Q is concave in the free entries (softmax of linear scores): EM then takes
    #: the ridged Cholesky step that the C kernel also takes, else a modified Newton step.
    q_concave: ClassVar[bool] = False

    def is_linear_softmax(self) -> bool:
        """Whether the weights are a dense softmax of linear scores beta1 . x + beta0:
        the case EM's fast kernel (and its C path) is written for."""
        return False

    def differentiable(self, dim: int) -> bool:
        """Whether the weights are differentiable in the gate parameters at almost every
        parameter value that data can put an optimum at, so that a gradient certificate
        (``fit.polish``) means something. Top-K selection makes them jump where the
        selection changes: not."""
        return self.top_k is None

    def random_start_blocks(self) -> tuple[str, ...]:
        """Blocks that data-driven random starts draw at random instead of at zero: those
        where a flat gate is a point its estimator cannot leave. A top-K gate at zero slopes
        ties every score, so the selection (and with K = 1 the gate) never changes."""
        if self.top_k is not None and "beta1" in self.param_shapes(2, 1):
            return ("beta1",)
        return ()

    def free_mask(self, n_experts: int, dim: int) -> dict[str, Tensor]:
        """Boolean masks of the entries an estimator may move: all but, for softmax-type
        gates, the last expert's shift blocks, which ``normalise`` fixes at zero."""
        masks = {k: torch.ones(v, dtype=torch.bool)
                 for k, v in self.param_shapes(n_experts, dim).items()}
        if self.normaliser == "softmax":
            for name in self.shift_blocks:
                masks[name][-1] = False
        return masks


def _norm(v: Tensor) -> Tensor:
    """Euclidean norm over the last axis, floored so 0/0 and its gradient stay finite."""
    return v.square().sum(-1).clamp_min(torch.finfo(v.dtype).tiny).sqrt()


def _linear(x_ND: Tensor, beta1_ED: Tensor) -> Tensor:
    """x . beta1_i for every expert: (..., N, E)."""
    return x_ND @ beta1_ED.transpose(-1, -2)


def _sq_dist(x_ND: Tensor, w_ED: Tensor, expanded: bool = False) -> Tensor:
    """||x - W_i||^2 for every expert: (..., N, E). By default the explicit difference is
    used because it keeps full precision when x is near W_i, at N*E*D memory. With
    ``expanded`` it is ||x||^2 - 2 x.W + ||W||^2 (one matmul, N*E memory), which deep
    layers need at large D; it is clamped at 0 against cancellation."""
    if not expanded:
        return (x_ND.unsqueeze(-2) - w_ED.unsqueeze(-3)).square().sum(-1)
    cross = _linear(x_ND, w_ED)
    sq = x_ND.square().sum(-1, keepdim=True) - 2 * cross + w_ED.square().sum(-1).unsqueeze(-2)
    return sq.clamp_min(0)


class _ExpandedDistance(torch.autograd.Function):
    """||x - W_i|| from the expanded square (``_sq_dist(..., expanded=True)``) with its
    gradient written out: with u = g / d (0 where the square was clamped),
    dx = (sum_i u_i) x - u W and dW_i = (sum_n u_ni) W_i - sum_n u_ni x_n. Autograd's
    version of the same formula keeps every intermediate (N, E) and (N, D) tensor of the
    square, the two clamps and the root; a deep layer's Laplace router or prefix gate
    spends most of its gate time there. The backward is made of differentiable
    operations, so second derivatives work."""

    @staticmethod
    def forward(ctx, x_ND: Tensor, w_ED: Tensor) -> Tensor:  # type: ignore[override]
        tiny = torch.finfo(x_ND.dtype).tiny
        dist = _sq_dist(x_ND, w_ED, expanded=True).clamp_min(tiny).sqrt()
        ctx.save_for_backward(x_ND, w_ED, dist)
        return dist

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        x_ND, w_ED, dist = ctx.saved_tensors
        floor = torch.finfo(dist.dtype).tiny ** 0.5
        u = torch.where(dist > floor, grad / dist, 0.0)                     # (..., N, E)
        g_x = u.sum(-1, keepdim=True) * x_ND - u @ w_ED
        g_w = u.sum(-2).unsqueeze(-1) * w_ED - u.transpose(-1, -2) @ x_ND
        return _sum_to(g_x, x_ND.shape), _sum_to(g_w, w_ED.shape)


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    """``t`` summed over the leading dimensions it was broadcast along to reach ``shape``."""
    extra = t.dim() - len(shape)
    t = t.sum(tuple(range(extra))) if extra > 0 else t
    dims = tuple(i for i, (a, b) in enumerate(zip(t.shape, shape)) if b == 1 and a != 1)
    return t.sum(dims, keepdim=True) if dims else t


# --- the catalogue -------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class LinearGate(Gate):
    """Linear scores s_i(x) = beta1_i . x + beta0_i.

    With the softmax normaliser this is the softmax gate (arXiv 2305.03288, 2402.02952);
    with ``top_k`` the top-K sparse softmax gate (arXiv 2309.13850); with
    ``normaliser="sigmoid"`` the sigmoid gate (arXiv 2405.13997).
    Blocks: beta1 (E, D), beta0 (E,).
    """

    name: ClassVar[str] = "softmax"
    shift_blocks: ClassVar[tuple[str, ...]] = ("beta1", "beta0")

    def param_shapes(self, n_experts: int, dim: int) -> Shapes:
        return {"beta1": (n_experts, dim), "beta0": (n_experts,)}

    def scores(self, x_ND: Tensor, params: Params) -> Tensor:
        return _linear(x_ND, params["beta1"]) + params["beta0"].unsqueeze(-2)

    def is_linear_softmax(self) -> bool:
        # A subclass may change the scores: only this class's own are known linear.
        return type(self) is LinearGate and self.normaliser == "softmax" and self.top_k is None

    @property
    def q_concave(self) -> bool:  # type: ignore[override]
        return self.is_linear_softmax()

    def q_derivatives(self, x_BND: Tensor, resp_BNE: Tensor,
                      params: Params) -> tuple[Tensor, Tensor] | None:
        """The dense softmax gate's (IRLS): with z = (1, x), R_n = sum_i r_ni and
        theta_i = (beta0_i, beta1_i) over the free experts (all but the last),

            gradient_i = sum_n (r_ni - R_n w_ni) z_n,
            -Hessian_ij = sum_n R_n w_ni (d_ij - w_nj) z_n z_n^T.

        Top-K and sigmoid linear gates: None (autograd)."""
        if not self.is_linear_softmax():
            return None
        z_BPN = torch.cat([torch.ones_like(x_BND[..., :1]), x_BND], -1).transpose(-1, -2).contiguous()
        resp = resp_BNE.transpose(-1, -2).contiguous()
        resp_n = resp.sum(1, keepdim=True)
        # gate_stats takes rows that sum to 1: give it r / R, and R folded into z and z z^T.
        zz = _ef.outer(z_BPN.transpose(-1, -2))
        if not bool(((resp_n - 1).abs() <= 1e-12).all()):
            resp = torch.where(resp_n > 0, resp / resp_n, 0.0)
            z_w, zz = z_BPN * resp_n, zz * resp_n.transpose(-1, -2)
        else:
            z_w = z_BPN
        theta_BEP = torch.cat([params["beta0"].unsqueeze(-1), params["beta1"]], -1)
        w, _ = _ef.softmax_experts_first(_ef.combine(theta_BEP, z_BPN))
        grad, diag, cross = _ef.gate_stats(resp, w, z_w, zz)
        order = _expert_major(self, resp_BNE.shape[-1], x_BND.shape[-1], ("beta0", "beta1"))
        return _reorder(grad.flatten(1), _ef.neg_hessian(diag, cross), order)


@dataclass(frozen=True, kw_only=True)
class CosineGate(Gate):
    """Cosine router (arXiv 2405.14131):
    s_i(x) = beta1_i . x / ((||beta1_i|| + tau1) (||x|| + tau2)) + beta0_i.

    With tau1 = tau2 = 0 (this class's default) it is the plain cosine router, whose
    parameter interactions slow estimation to 1/log^tau(n); ``PerturbedCosineGate``
    fixes tau1, tau2 > 0. Blocks: beta1 (E, D), beta0 (E,).

    ``center``: x and beta1_i lose their mean over the D features first. Then
    sqrt(D) * s_i(x) = LN(x) . LN(beta1_i) / sqrt(D), LN a LayerNorm without affine (and
    without its epsilon), which is PHATGOOSE's routing score (arXiv 2402.05859).
    """

    tau1: float = 0.0
    tau2: float = 0.0
    unit_x: bool = True
    unit_beta: bool = True
    center: bool = False
    name: ClassVar[str] = "cosine"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tau1 < 0 or self.tau2 < 0:
            raise ValueError(f"tau1 and tau2 must be >= 0. Got tau1={self.tau1}, tau2={self.tau2}.")

    def param_shapes(self, n_experts: int, dim: int) -> Shapes:
        return {"beta1": (n_experts, dim), "beta0": (n_experts,)}

    def scores(self, x_ND: Tensor, params: Params) -> Tensor:
        beta1 = params["beta1"]
        if self.center:
            x_ND, beta1 = x_ND - x_ND.mean(-1, keepdim=True), beta1 - beta1.mean(-1, keepdim=True)
        s = _linear(x_ND, beta1)
        # unit_x / unit_beta choose which sides are normalised (X-MoE normalises both).
        if self.unit_x:
            s = s / (_norm(x_ND) + self.tau2).unsqueeze(-1)
        if self.unit_beta:
            s = s / (_norm(beta1) + self.tau1).unsqueeze(-2)
        return s + params["beta0"].unsqueeze(-2)

    def random_start_blocks(self) -> tuple[str, ...]:
        """At beta1 = 0 the cosine score is 0/0 (taken as 0) with no usable derivative."""
        return ("beta1",)

    def normalise(self, params: Params) -> Params:
        """With tau1 = 0 the score depends on beta1_i only through its direction, so the
        identifiable form puts every beta1_i on the unit sphere; then beta0 is shifted."""
        out = dict(params)
        if self.tau1 == 0 and self.unit_beta:
            out["beta1"] = params["beta1"] / _norm(params["beta1"]).unsqueeze(-1)
        return super().normalise(out)


@dataclass(frozen=True, kw_only=True)
class PerturbedCosineGate(CosineGate):
    """Perturbed cosine router (arXiv 2405.14131): the cosine router with fixed noise
    tau1, tau2 > 0 added to both L2 norms, which restores polynomial estimation rates.
    The defaults 0.1 are gatelab's choice; the paper only requires positivity."""

    tau1: float = 0.1
    tau2: float = 0.1
    name: ClassVar[str] = "perturbed_cosine"

    def __post_init__(self) -> None:
        super().__post_init__()
        fix = "The perturbed cosine router needs positive perturbations; use 'cosine' for 0."
        check_positive("tau1", self.tau1, fix)
        check_positive("tau2", self.tau2, fix)


@dataclass(frozen=True, kw_only=True)
class QuadraticGate(Gate):
    """Quadratic gate (arXiv 2410.11222, form unverified):
    polynomial s_i(x) = x^T A_i x + beta1_i . x + beta0_i, or with ``monomial=True``
    s_i(x) = x^T A_i x + beta0_i. Only the symmetric part of A_i affects the scores;
    ``normalise`` symmetrises it. Blocks: A (E, D, D), [beta1 (E, D)], beta0 (E,).

    With ``rank=r`` (for deep layers, where E*D*D is too large) A_i = U_i V_i^T, so
    x^T A_i x = sum_r (x . U_ir)(x . V_ir): blocks U, V (E, D, r) replace A, and
    ``normalise`` leaves them as they are (a low-rank factorisation is not unique).
    """

    monomial: bool = False
    rank: int | None = None
    name: ClassVar[str] = "quadratic"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank is not None:
            check_int("rank", self.rank, 1)

    @property
    def shift_blocks(self) -> tuple[str, ...]:  # type: ignore[override]
        quad = () if self.rank else ("A",)
        return (*quad, "beta0") if self.monomial else (*quad, "beta1", "beta0")

    def param_shapes(self, n_experts: int, dim: int) -> Shapes:
        shapes: dict[str, tuple[int, ...]]
        if self.rank:
            shapes = {"U": (n_experts, dim, self.rank), "V": (n_experts, dim, self.rank)}
        else:
            shapes = {"A": (n_experts, dim, dim)}
        shapes |= {"beta1": (n_experts, dim), "beta0": (n_experts,)}
        if self.monomial:
            del shapes["beta1"]
        return shapes

    def scores(self, x_ND: Tensor, params: Params) -> Tensor:
        x_1ND = x_ND.unsqueeze(-3)
        if self.rank:
            quad_EN = ((x_1ND @ params["U"]) * (x_1ND @ params["V"])).sum(-1)
        else:
            quad_EN = ((x_1ND @ params["A"]) * x_1ND).sum(-1)
        s = quad_EN.transpose(-1, -2) + params["beta0"].unsqueeze(-2)
        return s if self.monomial else s + _linear(x_ND, params["beta1"])

    def normalise(self, params: Params) -> Params:
        out = dict(params)
        if not self.rank:
            out["A"] = 0.5 * (params["A"] + params["A"].transpose(-1, -2))
        return super().normalise(out)


@dataclass(frozen=True, kw_only=True)
class LaplaceGate(Gate):
    """Laplace gate (FuseMoE, arXiv 2402.03226): s_i(x) = -||W_i - x|| + beta0_i.
    Blocks: W (E, D), beta0 (E,). ``expanded=True`` computes distances with one matmul
    (see ``_sq_dist``), for large D."""

    expanded: bool = False
    name: ClassVar[str] = "laplace"

    def param_shapes(self, n_experts: int, dim: int) -> Shapes:
        return {"W": (n_experts, dim), "beta0": (n_experts,)}

    def scores(self, x_ND: Tensor, params: Params) -> Tensor:
        if self.expanded:
            dist = _ExpandedDistance.apply(x_ND, params["W"])
        else:
            sq = _sq_dist(x_ND, params["W"])
            dist = sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt()
        return -dist + params["beta0"].unsqueeze(-2)

    def q_derivatives(self, x_BND: Tensor, resp_BNE: Tensor,
                      params: Params) -> tuple[Tensor, Tensor] | None:
        """Closed form (``_distance_q_derivatives``, rho(d) = d); None with top-K or sigmoid."""
        return _distance_q_derivatives(self, x_BND, resp_BNE, params, laplace=True)

    def differentiable(self, dim: int) -> bool:
        """In one covariate -|W_i - x| has a kink at every sample as W_i passes it, and
        the likelihood's maximum generically sits on one: no gradient bound below the
        O(1/n) jump can be met there (measured: 3.5e-4, 1e-4, 1e-5 at n = 1e3, 4e3, 1.6e4).
        With d >= 2 the norm is smooth except at W_i = x_n exactly."""
        return dim >= 2 and super().differentiable(dim)


@dataclass(frozen=True, kw_only=True)
class GaussianGate(Gate):
    """Gaussian gate (FuseMoE / HMoE code, arXiv 2402.03226): s_i(x) = -||W_i - x||^2 + beta0_i.
    Blocks: W (E, D), beta0 (E,). ``expanded`` as for ``LaplaceGate``."""

    expanded: bool = False
    name: ClassVar[str] = "gaussian"

    def param_shapes(self, n_experts: int, dim: int) -> Shapes:
        return {"W": (n_experts, dim), "beta0": (n_experts,)}

    def scores(self, x_ND: Tensor, params: Params) -> Tensor:
        return -_sq_dist(x_ND, params["W"], self.expanded) + params["beta0"].unsqueeze(-2)

    def q_derivatives(self, x_BND: Tensor, resp_BNE: Tensor,
                      params: Params) -> tuple[Tensor, Tensor] | None:
        """Closed form (``_distance_q_derivatives``, rho(d) = d^2); None with top-K or sigmoid."""
        return _distance_q_derivatives(self, x_BND, resp_BNE, params, laplace=False)


@dataclass(frozen=True, kw_only=True)
class InputFreeGate(Gate):
    """Covariate-free gate s_i(x) = beta0_i: constant mixing proportions, as in the
    deviated (arXiv 2402.05220) and contaminated (arXiv 2410.12258) MoE. Blocks: beta0 (E,)."""

    name: ClassVar[str] = "input_free"

    def param_shapes(self, n_experts: int, dim: int) -> Shapes:
        return {"beta0": (n_experts,)}

    def scores(self, x_ND: Tensor, params: Params) -> Tensor:
        beta0 = params["beta0"].unsqueeze(-2)
        return beta0.expand(*broadcast_shapes(beta0.shape[:-2], x_ND.shape[:-2]),
                            x_ND.shape[-2], beta0.shape[-1])


@dataclass(frozen=True, kw_only=True)
class HierarchicalGate(Gate):
    """Two-level gate (HMoE, arXiv 2410.02935): an outer gate over ``n_groups`` groups and,
    per group, an inner gate over ``n_inner`` experts; expert (g, j) has weight
    w_outer_g(x) * w_inner_{j|g}(x). Experts are numbered g * n_inner + j.

    Each level chooses its own gate (e.g. softmax outer, Laplace inner = "SL") and may use
    top-K; both levels must be normalised (softmax). The scores returned are the log
    weights, so the softmax normaliser reproduces the product exactly.
    Blocks: ``outer.<block>`` with E = n_groups, ``inner.<block>`` with shape
    (n_groups, n_inner, ...).
    """

    outer: Gate
    inner: Gate
    n_groups: int
    n_inner: int
    name: ClassVar[str] = "hierarchical"
    separable_scores: ClassVar[bool] = False   # an outer weight is shared by its group

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("n_groups", self.n_groups, 1)
        check_int("n_inner", self.n_inner, 1)
        for level, gate in (("outer", self.outer), ("inner", self.inner)):
            if not isinstance(gate, Gate) or not gate.sums_to_one:
                raise ValueError(f"The {level} gate of a hierarchical gate must be a softmax-"
                                 f"normalised Gate instance; got {gate!r}.")
        self.outer.check(self.n_groups)
        self.inner.check(self.n_inner)

    def check(self, n_experts: int) -> None:
        if n_experts != self.n_groups * self.n_inner:
            raise ValueError(f"A hierarchical gate with n_groups={self.n_groups} and n_inner="
                             f"{self.n_inner} routes over {self.n_groups * self.n_inner} experts; "
                             f"got n_experts={n_experts}. Set n_experts = n_groups * n_inner.")
        super().check(n_experts)

    def param_shapes(self, n_experts: int, dim: int) -> Shapes:
        inner = {k: (self.n_groups, *v) for k, v in self.inner.param_shapes(self.n_inner, dim).items()}
        return {**with_prefix("outer.", self.outer.param_shapes(self.n_groups, dim)),
                **with_prefix("inner.", inner)}

    def scores(self, x_ND: Tensor, params: Params) -> Tensor:
        log_outer_NG = self.outer.log_weights(x_ND, take_prefix("outer.", params))
        # The group axis of the inner blocks acts as one more batch axis of the inner gate.
        log_inner_GNJ = self.inner.log_weights(x_ND.unsqueeze(-3), take_prefix("inner.", params))
        log_inner_NGJ = log_inner_GNJ.movedim(-3, -2)
        return (log_outer_NG.unsqueeze(-1) + log_inner_NGJ).flatten(-2)

    def log_masses(self, params: Params) -> tuple[Tensor, bool]:
        """m_(g,j) = softmax(outer.beta0)_g softmax(inner.beta0 of g)_j: normalised."""
        outer = torch.log_softmax(params["outer.beta0"], -1)          # (..., G)
        inner = torch.log_softmax(params["inner.beta0"], -1)          # (..., G, J)
        return (outer.unsqueeze(-1) + inner).flatten(-2), False

    def translations(self, n_experts: int, dim: int) -> dict[str, tuple[int, ...]]:
        """The outer level's common translation, and one per group for the inner level
        (each group's inner softmax is invariant to its own shift): t of shape (G, 1, ...)."""
        outer = self.outer.translations(self.n_groups, dim)
        inner = self.inner.translations(self.n_inner, dim)
        return {**{f"outer.{b}": t for b, t in outer.items()},
                **{f"inner.{b}": (self.n_groups, *t) for b, t in inner.items()}}

    def atom_blocks(self, n_experts: int, dim: int) -> list[str]:
        """The inner level's atom blocks (the outer blocks have a group axis, not an
        expert axis)."""
        return [f"inner.{b}" for b in self.inner.atom_blocks(self.n_inner, dim)]

    def differentiable(self, dim: int) -> bool:
        return self.outer.differentiable(dim) and self.inner.differentiable(dim) \
            and super().differentiable(dim)

    def random_start_blocks(self) -> tuple[str, ...]:
        return (tuple(f"outer.{b}" for b in self.outer.random_start_blocks())
                + tuple(f"inner.{b}" for b in self.inner.random_start_blocks()))

    def free_mask(self, n_experts: int, dim: int) -> dict[str, Tensor]:
        inner = {k: m.expand(self.n_groups, *m.shape)
                 for k, m in self.inner.free_mask(self.n_inner, dim).items()}
        return {**with_prefix("outer.", self.outer.free_mask(self.n_groups, dim)),
                **with_prefix("inner.", inner)}

    def normalise(self, params: Params) -> Params:
        outer = self.outer.normalise(take_prefix("outer.", params))
        inner = self.inner.normalise(take_prefix("inner.", params))
        return {**with_prefix("outer.", outer), **with_prefix("inner.", inner)}


# --- closed-form derivatives of the gate's Q (see ``Gate.q_derivatives``) -------------

def _expert_major(gate: Gate, n_experts: int, dim: int, order: tuple[str, ...]) -> Tensor:
    """Where each free entry, in pack order, sits in an expert-major vector (E, P) whose
    row i lays out expert i's entries of the blocks in ``order`` (e.g. beta0_i, then
    beta1_i): a derivative computed per expert is reordered by indexing with this."""
    shapes = gate.param_shapes(n_experts, dim)
    sizes = [math.prod(shapes[name][1:]) for name in order]
    width = sum(sizes)
    positions = []
    for name, shape in shapes.items():                       # pack order
        offset = sum(sizes[:order.index(name)])
        per = torch.arange(math.prod(shape[1:])) + offset
        positions.append((torch.arange(n_experts).unsqueeze(-1) * width + per).flatten())
    masks = gate.free_mask(n_experts, dim)
    free = [masks[name].flatten() for name in shapes]
    return torch.cat(positions)[torch.cat(free)]


def _reorder(grad_BK: Tensor, neg_hess_BKK: Tensor, order: Tensor) -> tuple[Tensor, Tensor]:
    """Derivatives over an expert-major vector, taken at ``order`` (``_expert_major``)."""
    return grad_BK[:, order], neg_hess_BKK[:, order][:, :, order]


def separable_q_derivatives(gate: Gate, x_BND: Tensor, resp_BNE: Tensor, scores_BEN: Tensor,
                            jac_BENP: Tensor, curvature: Callable[[Tensor], Tensor],
                            order: tuple[str, ...]) -> tuple[Tensor, Tensor]:
    """``Gate.q_derivatives`` for a dense softmax gate whose expert i's score depends on
    its own parameters theta_i only (the blocks in ``order``, laid out per expert):
    with w = softmax(s), R_n = sum_i r_ni and c_ni = r_ni - R_n w_ni,

        gradient_i = sum_n c_ni J_ni,                       J_ni = ds_i(x_n)/dtheta_i,
        -Hessian_ij = sum_n R_n w_ni (d_ij - w_nj) J_ni J_nj^T - d_ij sum_n c_ni K_ni,

    K_ni = d^2 s_i(x_n)/dtheta_i^2. The gate gives its scores (B, E, N), the Jacobian
    (B, E, N, P) and ``curvature(c_BEN)`` = sum_n c_ni K_ni, (B, E, P, P) (summed by the
    gate, which knows K's structure). Returns (B, F), (B, F, F) over the free entries."""
    resp = resp_BNE.transpose(-1, -2)                                            # (B, E, N)
    w = torch.softmax(scores_BEN, dim=-2)
    big_r = resp.sum(1, keepdim=True)
    c = resp - big_r * w
    b, e, n, p = jac_BENP.shape
    grad = torch.einsum("ben,benp->bep", c, jac_BENP)
    rw = big_r * w
    neg = torch.einsum("ben,benp,benq->bepq", rw, jac_BENP, jac_BENP)            # diagonal blocks
    cross = torch.einsum("ben,bfn,benp,bfnq->befpq", rw, w, jac_BENP, jac_BENP)
    eye_e = torch.eye(e, dtype=jac_BENP.dtype, device=jac_BENP.device)
    neg_hess = neg.unsqueeze(2) * eye_e.view(1, e, e, 1, 1) - cross             # (B, E, E, P, P)
    idx = torch.arange(e)
    neg_hess[:, idx, idx] -= curvature(c)
    flat = neg_hess.permute(0, 1, 3, 2, 4).reshape(b, e * p, e * p)
    positions = _expert_major(gate, e, x_BND.shape[-1], order)
    return _reorder(grad.reshape(b, e * p), flat, positions)


def _distance_q_derivatives(gate: Gate, x_BND: Tensor, resp_BNE: Tensor, params: Params,
                            laplace: bool) -> tuple[Tensor, Tensor] | None:
    """Laplace and Gaussian gates (arXiv 2402.03226): s_i(x) = -rho(||x - W_i||) + beta0_i,
    rho(d) = d or d^2, theta_i = (beta0_i, W_i): J_ni = (1, rho'(d) u_ni) with
    u_ni = (x_n - W_i) / d_ni, and K the second derivative in W_i, -(I - u u^T) / d
    (Laplace) or -2 I (Gaussian) (``separable_q_derivatives``). Dense softmax only."""
    if gate.normaliser != "softmax" or gate.top_k is not None:
        return None
    diff = x_BND.unsqueeze(1) - params["W"].unsqueeze(-2)                       # (B, E, N, D)
    dist = diff.square().sum(-1).clamp_min(torch.finfo(diff.dtype).tiny).sqrt()
    u = diff / dist.unsqueeze(-1)
    jac = torch.cat([torch.ones_like(dist).unsqueeze(-1), u if laplace else 2 * diff], -1)
    eye_d = torch.eye(x_BND.shape[-1], dtype=x_BND.dtype, device=x_BND.device)

    def curvature(c_BEN: Tensor) -> Tensor:
        out = c_BEN.new_zeros(*c_BEN.shape[:2], jac.shape[-1], jac.shape[-1])
        if laplace:
            # A sample at a location (random starts put W_i on a data point) sits on the
            # cone's tip, where s_i has no curvature to speak of: 1 / d there (1e154) would
            # swamp the Hessian and freeze the gate. Such samples add no curvature.
            inv = torch.where(dist > 1e-8 * dist.amax(-1, keepdim=True), 1 / dist, 0.0)
            curv = -(eye_d - u.unsqueeze(-1) * u.unsqueeze(-2)) * inv[..., None, None]
            out[..., 1:, 1:] = torch.einsum("ben,benpq->bepq", c_BEN, curv)
        else:
            out[..., 1:, 1:] = -2 * c_BEN.sum(-1)[..., None, None] * eye_d
        return out

    rho = dist if laplace else dist.square()
    return separable_q_derivatives(gate, x_BND, resp_BNE, params["beta0"].unsqueeze(-1) - rho,
                                   jac, curvature, ("beta0", "W"))


# --- the registry --------------------------------------------------------------------

def _topk(**kwargs: Any) -> Gate:
    if kwargs.get("top_k") is None:
        raise ValueError("The 'topk' gate needs top_k: e.g. make_gate('topk', top_k=2).")
    return LinearGate(**kwargs)


def _hierarchical(outer: str | Gate = "softmax", inner: str | Gate = "softmax",
                  outer_options: dict | None = None, inner_options: dict | None = None,
                  **kwargs: Any) -> Gate:
    """A ``HierarchicalGate`` from level names, e.g. make_gate("hierarchical",
    outer="softmax", inner="laplace", n_groups=2, n_inner=2) (the paper's "SL")."""
    return HierarchicalGate(outer=make_gate(outer, **dict(outer_options or {})),
                            inner=make_gate(inner, **dict(inner_options or {})), **kwargs)


GATES: dict[str, Any] = {
    "softmax": LinearGate,
    "topk": _topk,
    "sigmoid": lambda **kw: LinearGate(normaliser="sigmoid", **kw),
    "cosine": CosineGate,
    "perturbed_cosine": PerturbedCosineGate,
    "quadratic": QuadraticGate,
    "quadratic_monomial": lambda **kw: QuadraticGate(monomial=True, **kw),
    "laplace": LaplaceGate,
    "gaussian": GaussianGate,
    "input_free": InputFreeGate,
    "hierarchical": _hierarchical,
}


# Options that a gate needs before it can be built (listings, demos, examples).
EXAMPLE_OPTIONS: dict[str, dict[str, Any]] = {
    "topk": {"top_k": 2},
    "hierarchical": {"outer": "softmax", "inner": "laplace", "n_groups": 2, "n_inner": 2},
}


def example_gate(name: str) -> Gate:
    """The catalogue gate ``name`` with ``EXAMPLE_OPTIONS`` (routes over 4 experts)."""
    return make_gate(name, **EXAMPLE_OPTIONS.get(name, {}))


def network_form(gate: Gate) -> Gate:
    """The gate as deep layers should compute it: distance gates with ``expanded=True``
    (one matmul, N*E memory, instead of the N*E*D differences that would dominate a step at
    large D); other gates unchanged."""
    if "expanded" in {f.name for f in dataclasses.fields(gate)}:
        return dataclasses.replace(gate, expanded=True)  # type: ignore[call-arg]  # only distance gates
    return gate


def make_gate(gate: str | Gate, **options: Any) -> Gate:
    """Resolve a gate name from ``GATES`` (with its options, e.g. ``top_k=2``,
    ``tau1=0.1``) or return a ``Gate`` instance unchanged."""
    if isinstance(gate, Gate):
        if options:
            return dataclasses.replace(gate, **options)
        return gate
    return build("gate", gate, GATES, options,
                 "Common options: top_k; cosine gates take tau1, tau2.")
