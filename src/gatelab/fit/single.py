"""One data set, the best of several random starts: the fits behind
``GaussianMoERegressor.fit``, ``gatelab fit`` and ``gatelab fit-lsq``. Kept free of
scikit-learn so that the command line does not import it (0.8 s with SciPy)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor

from ..experts import Expert, PolynomialExpert
from ..gates import Gate
from ..models import GatedExperts, GaussianMoE, MoERegression
from ..params import Params
from .em import FitResult, fit_em, select_best
from .init import random_starts
from .lsq import LSQResult, fit_lsq
from .topk import fit_topk_segments, random_sides, segment_top_k

__all__ = ["fit_best_of_starts", "fit_lsq_best_of_starts", "n_free_parameters", "aic", "bic"]


def n_free_parameters(model: GatedExperts) -> int:
    """Free parameters: every block entry, less the gate entries fixed for identifiability."""
    gate_free = sum(int(m.sum()) for m in model.gate.free_mask(model.n_experts, model.dim).values())
    others = sum(math.prod(s) for k, s in model.param_shapes().items() if k not in model.gate_blocks())
    return gate_free + others


def aic(loglik: float, model: GatedExperts) -> float:
    """Akaike information criterion -2 log L + 2 p (lower is better)."""
    return -2 * loglik + 2 * n_free_parameters(model)


def bic(loglik: float, model: GatedExperts, n_samples: int) -> float:
    """Bayesian information criterion -2 log L + p log n (lower is better)."""
    return -2 * loglik + n_free_parameters(model) * math.log(n_samples)


def fit_best_of_starts(x: Tensor, y: Tensor, n_experts: int, gate: str | Gate = "softmax",
                       expert: str | Expert = "linear", *, n_init: int = 5, tol: float = 1e-6,
                       max_iter: int = 2000, accelerate: bool = True, var_floor: float = 1e-8,
                       gate_ridge: float = 0.0, seed: int = 0) -> tuple[GaussianMoE, FitResult]:
    """EM from ``n_init`` data-driven random starts (``random_starts``, fitted as one
    batch), keeping the highest log-likelihood. x (N, D) and y (N,) float64, checked.
    Polynomial experts also start from the best linear-expert fit (higher coefficients
    zero): the polynomial model contains the linear one, and EM never lowers the
    likelihood, so it never ends below the linear fit. A top-K gate with one covariate and
    linear experts, which EM cannot move, is fitted by ``fit_topk_segments`` from the
    same starts, their experts split between the sides by ``random_sides``. Returns the
    model and the best fit (unbatched). ``gate_ridge`` as in ``fit_em``."""
    model = GaussianMoE(n_experts, x.shape[1], gate, expert)
    _check_samples(model, x)
    options: dict[str, Any] = {"tol": tol, "max_iter": max_iter, "var_floor": var_floor,
                               "accelerate": accelerate}
    generator = torch.Generator().manual_seed(int(seed))
    init = random_starts(model, x, y, n_init, generator)
    if _segments_apply(model):
        if gate_ridge:
            raise ValueError("gate_ridge does not apply to a top-K gate in one covariate, "
                             "which is fitted by its boundary (fit_topk_segments); use 0.")
        sides = random_sides(n_init, n_experts, segment_top_k(model), generator)
        return model, select_best(fit_topk_segments(model, x, y, init, sides=sides, **options))
    options["gate_ridge"] = gate_ridge
    if isinstance(model.expert, PolynomialExpert):
        _, linear = fit_best_of_starts(x, y, n_experts, model.gate, "linear", n_init=n_init,
                                       seed=seed, **options)
        init = {k: torch.cat([v, _as_polynomial(linear.params, k, v).unsqueeze(0)])
                for k, v in init.items()}
    return model, select_best(fit_em(model, x, y, init, **options))


def fit_lsq_best_of_starts(x: Tensor, y: Tensor, n_experts: int, gate: str | Gate = "softmax",
                           expert: str | Expert = "linear", *, n_init: int = 5,
                           tol: float = 1e-8, max_iter: int = 500,
                           seed: int = 0) -> tuple[MoERegression, LSQResult]:
    """Least squares (``fit_lsq``) for an ``MoERegression`` with any gate, sigmoid
    included, from ``n_init`` data-driven random starts, keeping the lowest residual sum
    of squares. The starts are ``random_starts`` of the Gaussian MoE with the same
    experts and the gate's softmax form (same blocks), with nu = Var(y). x (N, D), y (N,)."""
    model = MoERegression(n_experts, x.shape[1], gate, expert)
    _check_samples(model, x)
    twin_gate = model.gate if model.gate.sums_to_one else dataclasses.replace(
        model.gate, normaliser="softmax")
    twin = GaussianMoE(n_experts, x.shape[1], twin_gate, model.expert)
    init = random_starts(twin, x, y, n_init, torch.Generator().manual_seed(int(seed)))
    init.pop("var")
    init["nu"] = y.var().expand(n_init).clone()
    return model, select_best(fit_lsq(model, x, y, init, tol=tol, max_iter=max_iter))


def _check_samples(model: GatedExperts, x: Tensor) -> None:
    n_params = n_free_parameters(model)
    if x.shape[0] <= n_params:
        raise ValueError(f"n_samples={x.shape[0]} must exceed the number of free parameters "
                         f"({n_params} for n_experts={model.n_experts} with {x.shape[1]} "
                         f"feature(s)). Collect more data or fit fewer experts.")


def _segments_apply(model: GaussianMoE) -> bool:
    """Whether ``fit_topk_segments`` fits this model (a sparse top-K gate in one covariate)."""
    if model.gate.top_k is None:
        return False
    try:
        segment_top_k(model)
    except ValueError:
        return False
    return True


def _as_polynomial(linear: Params, name: str, like: Tensor) -> Tensor:
    """Block ``name`` of a polynomial-expert model equal to the linear fit: the degree-1
    monomials come first in ``polynomial_features``, the rest get coefficient 0."""
    if name != "a":
        return linear[name]
    out = torch.zeros_like(like[0])
    out[..., : linear["a"].shape[-1]] = linear["a"]
    return out
