"""Estimators: batched EM (maximum likelihood) and least squares."""

from .em import FitResult, e_step, fit_em, m_step, select_best

__all__ = ["FitResult", "e_step", "fit_em", "m_step", "select_best"]
from .estimator import GaussianMoERegressor, NotFittedError  # noqa: E402
from .init import from_responsibilities, near_truth, random_starts  # noqa: E402

__all__ += ["GaussianMoERegressor", "NotFittedError", "from_responsibilities", "near_truth",
            "random_starts"]
from .lsq import LSQResult, fit_lsq  # noqa: E402

__all__ += ["LSQResult", "fit_lsq"]
