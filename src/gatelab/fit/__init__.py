"""Estimators: batched EM (maximum likelihood), least squares, the top-K segment fit and
the smoothed top-K continuation, starts, and a scikit-learn-style estimator."""

from .em import FitResult, e_step, fit_em, m_step, select_best, trainable_part
from .init import from_responsibilities, near_truth, random_starts
from .lsq import LSQResult, fit_lsq
from .status import STATUS_MEANING, FitStatus, status_names
from .topk import fit_topk_segments, split_profile
from .topk_continuation import fit_topk_continuation

__all__ = ["FitResult", "e_step", "fit_em", "trainable_part", "m_step", "select_best", "GaussianMoERegressor",
           "NotFittedError", "from_responsibilities", "near_truth", "random_starts", "LSQResult",
           "fit_lsq", "fit_topk_segments", "fit_topk_continuation", "split_profile", "FitStatus",
           "STATUS_MEANING", "status_names"]


def __getattr__(name: str):
    # The estimator imports scikit-learn (0.8 s, with SciPy) for its base classes: load it
    # on first use, so that the command line and the studies do not pay for it.
    if name in ("GaussianMoERegressor", "NotFittedError"):
        from . import estimator
        return getattr(estimator, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
