"""One data set, the best of several random starts: the fit behind
``GaussianMoERegressor.fit`` and ``gatelab fit``. Kept free of scikit-learn so that the
command line does not import it (0.8 s with SciPy)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..experts import Expert
from ..gates import Gate
from ..models import GaussianMoE
from .em import FitResult, fit_em, select_best
from .init import random_starts

__all__ = ["fit_best_of_starts", "n_free_parameters", "aic", "bic"]


def n_free_parameters(model: GaussianMoE) -> int:
    """Free parameters: every block entry, less the gate entries fixed for identifiability."""
    gate_free = sum(int(m.sum()) for m in model.gate.free_mask(model.n_experts, model.dim).values())
    others = sum(math.prod(s) for k, s in model.param_shapes().items() if k not in model._gate_shapes())
    return gate_free + others


def aic(loglik: float, model: GaussianMoE) -> float:
    """Akaike information criterion -2 log L + 2 p (lower is better)."""
    return -2 * loglik + 2 * n_free_parameters(model)


def bic(loglik: float, model: GaussianMoE, n_samples: int) -> float:
    """Bayesian information criterion -2 log L + p log n (lower is better)."""
    return -2 * loglik + n_free_parameters(model) * math.log(n_samples)


def fit_best_of_starts(x: Tensor, y: Tensor, n_experts: int, gate: str | Gate = "softmax",
                       expert: str | Expert = "linear", *, n_init: int = 1, tol: float = 1e-6,
                       max_iter: int = 2000, accelerate: bool = True, var_floor: float = 1e-8,
                       seed: int = 0) -> tuple[GaussianMoE, FitResult]:
    """EM from ``n_init`` data-driven random starts (``random_starts``, fitted as one
    batch), keeping the highest log-likelihood. x (N, D) and y (N,) float64, checked.
    Returns the model and the best fit (unbatched)."""
    model = GaussianMoE(n_experts, x.shape[1], gate, expert)
    n_params = n_free_parameters(model)
    if x.shape[0] <= n_params:
        raise ValueError(f"n_samples={x.shape[0]} must exceed the number of free parameters "
                         f"({n_params} for n_experts={n_experts} with {x.shape[1]} "
                         f"feature(s)). Collect more data or fit fewer experts.")
    generator = torch.Generator().manual_seed(int(seed))
    init = random_starts(model, x, y, n_init, generator)
    res = select_best(fit_em(model, x, y, init, tol=tol, max_iter=max_iter,
                             var_floor=var_floor, accelerate=accelerate))
    return model, res
