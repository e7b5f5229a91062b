"""Estimators: batched EM (maximum likelihood) and least squares."""

from .em import FitResult, e_step, fit_em, m_step, select_best

__all__ = ["FitResult", "e_step", "fit_em", "m_step", "select_best"]
