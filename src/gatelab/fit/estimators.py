"""The estimators a study can name (``estimator.method``), behind one interface: each
checks the model it is given and returns a ``FitResult``, whatever it computes inside."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..models import GaussianMoE, Regression
from ..params import Params
from .em import FitResult, fit_em
from .lsq import fit_lsq, profile_loglik
from .topk import fit_topk_segments, segment_top_k
from .topk_continuation import check_continuation, fit_topk_continuation

__all__ = ["Estimator", "ESTIMATORS", "estimator"]


class Estimator(NamedTuple):
    """``fitter(model, x, y, init, **options)`` behind ``fit``, which checks the model
    (``check`` raises ValueError for one it cannot fit), passes only the options the
    fitter takes, and returns a ``FitResult`` (``as_fit_result`` converts)."""

    name: str
    fitter: Callable[..., Any]
    check: Callable[[Any], None]
    as_fit_result: Callable[[Any, Tensor], FitResult] = lambda res, x: res

    def options(self) -> dict[str, Any]:
        """The fitter's options and their defaults."""
        params = list(inspect.signature(self.fitter).parameters.values())[4:]
        return {p.name: p.default for p in params}

    def fit(self, model, x: Tensor, y: Tensor, init: Params, **options: Any) -> FitResult:
        self.check(model)
        taken = {k: v for k, v in options.items() if k in self.options()}
        return self.as_fit_result(self.fitter(model, x, y, init, **taken), x)


def _check_density(model) -> None:
    if isinstance(model, Regression):
        raise ValueError(f"EM fits densities; {model!r} is a regression: use method 'lsq'.")


def _check_regression(model) -> None:
    if not isinstance(model, Regression):
        raise ValueError(f"Least squares fits regressions (MoERegression, PrefixMoERegression); "
                         f"got {model!r}: use method 'em'.")


def _check_segments(model) -> None:
    if not isinstance(model, GaussianMoE):
        raise ValueError(f"The segment fit is for Gaussian MoEs; got {model!r}.")
    segment_top_k(model)


def _lsq_as_fit_result(res, x: Tensor) -> FitResult:
    """Least squares reports the profile log-likelihood of its RSS,
    -n/2 (log(2 pi RSS / n) + 1); no variance is floored, so nothing is degenerate."""
    return FitResult(res.params, profile_loglik(res.rss, x.shape[-2]), res.n_iter, res.converged,
                     torch.zeros_like(res.converged), res.status)


ESTIMATORS: dict[str, Estimator] = {
    "em": Estimator("em", fit_em, _check_density),
    "segments": Estimator("segments", fit_topk_segments, _check_segments),
    "lsq": Estimator("lsq", fit_lsq, _check_regression, _lsq_as_fit_result),
    "continuation": Estimator("continuation", fit_topk_continuation, check_continuation),
}


def estimator(name: str) -> Estimator:
    """The estimator registered as ``name``, or a ValueError listing them."""
    if name not in ESTIMATORS:
        raise ValueError(f"Unknown estimator {name!r}; valid: {', '.join(ESTIMATORS)}.")
    return ESTIMATORS[name]
