"""scikit-learn-style estimators over the batched engines.

Conventions (scikit-learn's): ``__init__`` only stores its arguments; ``fit(X, y)``
returns ``self``; fitted attributes end in ``_``; ``predict`` gives E[y | x] and
``score`` the coefficient of determination R^2 (the regressor contract), while
``log_prob`` and ``log_likelihood`` give log-likelihoods. Inputs are NumPy arrays
or tensors, X of shape (n_samples, n_features) and y of shape (n_samples,). When
scikit-learn is installed the classes derive from its ``BaseEstimator`` and
``RegressorMixin`` (cloning, pipelines, grid search); it is not required.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._checks import check_finite, check_int, check_positive
from ..experts import Expert
from ..gates import Gate
from .single import aic, bic, fit_best_of_starts
from .status import status_names

try:  # optional: scikit-learn integration
    from sklearn.base import BaseEstimator as _Base
    from sklearn.base import RegressorMixin as _Regressor
    from sklearn.exceptions import DataConversionWarning, NotFittedError
except ImportError:  # pragma: no cover - exercised where scikit-learn is absent
    class NotFittedError(ValueError, AttributeError):  # type: ignore[no-redef]
        """Raised when a method needs ``fit`` to have run first."""

    class DataConversionWarning(UserWarning):  # type: ignore[no-redef]
        """y was converted (e.g. a column vector raveled)."""

    class _Base:  # type: ignore[no-redef]
        """get_params / set_params from the ``__init__`` signature, as scikit-learn does."""

        def get_params(self, deep: bool = True) -> dict:
            names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
            return {name: getattr(self, name) for name in names}

        def set_params(self, **params: Any):
            for name, value in params.items():
                setattr(self, name, value)
            return self

    class _Regressor:  # type: ignore[no-redef]
        def predict(self, X):
            raise NotImplementedError

        def score(self, X, y) -> float:
            y = np.asarray(y, dtype=float)
            resid = ((y - self.predict(X)) ** 2).sum()
            return float(1 - resid / ((y - y.mean()) ** 2).sum())

__all__ = ["GaussianMoERegressor", "NotFittedError"]


def _as_array(name: str, value: Any, dtype: torch.dtype) -> Tensor:
    if value is None:
        raise ValueError(f"This estimator requires y to be passed, but the target y is None. "
                         f"Pass the responses as '{name}'.")
    if isinstance(value, Tensor):
        if value.is_complex():
            raise ValueError(f"Complex data not supported in '{name}'.")
        return value.detach().to(dtype)
    if hasattr(value, "tocsr") or hasattr(value, "toarray"):
        raise TypeError(f"Sparse input is not supported for '{name}'; pass a dense array "
                        f"(e.g. X.toarray()).")
    arr = np.asarray(value)
    if arr.dtype.kind == "c":
        raise ValueError(f"Complex data not supported in '{name}'.")
    if arr.dtype.kind not in "biuf":
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(f"'{name}' must be numeric: argument must be a string or a number "
                            f"convertible to float ({err}).") from None
    return torch.as_tensor(np.ascontiguousarray(arr), dtype=dtype)


def check_X(X: Any, dtype: torch.dtype, n_features: int | None = None, owner: str = "") -> Tensor:
    """X as a finite (n_samples, n_features) tensor, with scikit-learn's messages."""
    x = _as_array("X", X, dtype)
    if x.dim() != 2:
        raise ValueError(f"Expected a 2D array for X, got {x.dim()}D with shape {tuple(x.shape)}. "
                         f"Reshape your data using X.reshape(-1, 1) if it has a single feature "
                         f"or X.reshape(1, -1) if it contains a single sample.")
    if x.shape[0] < 1:
        raise ValueError(f"Found array with 0 sample(s) (shape={tuple(x.shape)}) while a minimum "
                         f"of 1 is required.")
    if x.shape[1] < 1:
        raise ValueError(f"Found array with 0 feature(s) (shape={tuple(x.shape)}) while a minimum "
                         f"of 1 is required.")
    if n_features is not None and x.shape[1] != n_features:
        raise ValueError(f"X has {x.shape[1]} features, but {owner} is expecting {n_features} "
                         f"features as input.")
    return check_finite("X", x)


def check_y(y: Any, n: int, dtype: torch.dtype) -> Tensor:
    t = _as_array("y", y, dtype)
    if t.dim() == 2 and t.shape[1] == 1:
        warnings.warn("A column-vector y was passed when a 1d array was expected; it is "
                      "raveled to shape (n_samples,).", DataConversionWarning, stacklevel=3)
        t = t[:, 0]
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"y must have shape ({n},) to match X; got {tuple(t.shape)}.")
    return check_finite("y", t)


class GaussianMoERegressor(_Regressor, _Base):
    """Gaussian mixture of experts regression fitted by maximum likelihood (batched EM):

        p(y | x) = sum_i w_i(x) N(y | h(x; eta_i), var_i)   (arXiv 2305.03288 and others).

    Parameters
    ----------
    n_experts : number of experts k >= 1.
    gate : a gate name from ``gatelab.GATES`` (softmax-type) or a ``Gate``.
    expert : 'linear', 'polynomial', 'ffn', 'constant' or an ``Expert``.
    n_init : random starts, fitted together; the best log-likelihood is kept. The
        likelihood of a mixture has many local maxima, so the default is 5 (as on the
        command line); polynomial experts also start from the linear fit.
    tol, max_iter : stop when the relative log-likelihood change is <= tol.
    accelerate : SQUAREM acceleration (monotone); helps most when k is over-specified.
    var_floor : variances are floored at var_floor * Var(y); floored fits set
        ``degenerate_``.
    gate_ridge : penalise linear gates' slopes by (gate_ridge / 2) ||beta1||^2 (0: the
        MLE); for data a gate separates (``status_ == "separated"``).
    random_state : int seed for the starts.

    Fitted attributes: ``params_`` (dict of tensors), ``model_``, ``loglik_`` (total),
    ``lower_bound_`` (mean log-likelihood per sample, as scikit-learn's mixtures report),
    ``status_`` (how the fit ended: converged, max_iter, separated, degenerate or stuck;
    see ``gatelab.fit.status``), ``converged_``, ``n_iter_``, ``degenerate_``,
    ``n_features_in_``.
    """

    def __init__(self, n_experts: int = 2, gate: str | Gate = "softmax",
                 expert: str | Expert = "linear", *, n_init: int = 5, tol: float = 1e-6,
                 max_iter: int = 2000, accelerate: bool = True, var_floor: float = 1e-8,
                 gate_ridge: float = 0.0, random_state: int | None = None) -> None:
        self.n_experts = n_experts
        self.gate = gate
        self.expert = expert
        self.n_init = n_init
        self.tol = tol
        self.max_iter = max_iter
        self.accelerate = accelerate
        self.var_floor = var_floor
        self.gate_ridge = gate_ridge
        self.random_state = random_state

    # -- fitting --------------------------------------------------------------------
    def fit(self, X: Any, y: Any) -> GaussianMoERegressor:
        """Fit by EM from ``n_init`` random starts; returns ``self``."""
        check_int("n_init", self.n_init, 1)
        check_positive("tol", self.tol)
        x = check_X(X, torch.float64)
        t = check_y(y, x.shape[0], torch.float64)
        # Without a random_state, draw a seed from torch's global generator (not torch.seed(),
        # which would reseed the caller's generator as a side effect).
        seed = self.random_state if self.random_state is not None else \
            int(torch.randint(2 ** 31, ()).item())
        model, res = fit_best_of_starts(x, t, self.n_experts, self.gate, self.expert,
                                        n_init=self.n_init, tol=self.tol, max_iter=self.max_iter,
                                        accelerate=self.accelerate, var_floor=self.var_floor,
                                        gate_ridge=self.gate_ridge, seed=seed)
        self.model_, self.params_ = model, res.params
        self.loglik_ = float(res.loglik)
        self.lower_bound_ = self.loglik_ / x.shape[0]
        self.converged_, self.n_iter_ = bool(res.converged), int(res.n_iter)
        self.degenerate_ = bool(res.degenerate)
        self.status_ = status_names(res.status)[0]
        self.n_features_in_ = x.shape[1]
        return self

    # -- prediction -----------------------------------------------------------------
    def _x(self, X: Any) -> Tensor:
        if not hasattr(self, "params_"):
            raise NotFittedError(f"This {type(self).__name__} instance is not fitted yet. Call "
                                 f"'fit' with appropriate arguments before using this estimator.")
        return check_X(X, torch.float64, self.n_features_in_, type(self).__name__)

    def predict(self, X: Any) -> np.ndarray:
        """E[y | x] = sum_i w_i(x) h(x; eta_i): shape (n_samples,)."""
        x = self._x(X)
        return self.model_.predict(x, self.params_).numpy()

    def predict_proba(self, X: Any) -> np.ndarray:
        """Gate weights w_i(x) of each expert: shape (n_samples, n_experts)."""
        x = self._x(X)
        return self.model_.log_gate(x, self.params_).exp().numpy()

    def log_prob(self, X: Any, y: Any) -> np.ndarray:
        """log p(y_n | x_n) for every sample: shape (n_samples,)."""
        x = self._x(X)
        return self.model_.log_prob(x, check_y(y, x.shape[0], x.dtype), self.params_).numpy()

    def log_likelihood(self, X: Any, y: Any) -> float:
        """Total log-likelihood of (X, y) under the fitted model."""
        return float(self.log_prob(X, y).sum())

    def sample(self, X: Any, random_state: int | None = None) -> np.ndarray:
        """Draw y ~ p(y | x) at the given covariates: shape (n_samples,)."""
        x = self._x(X)
        gen = None if random_state is None else torch.Generator().manual_seed(random_state)
        return self.model_._sample_y(x, self.params_, gen).numpy()

    def aic(self, X: Any, y: Any) -> float:
        """Akaike information criterion -2 log L + 2 p (lower is better)."""
        return aic(self.log_likelihood(X, y), self.model_)

    def bic(self, X: Any, y: Any) -> float:
        """Bayesian information criterion -2 log L + p log n (lower is better)."""
        return bic(self.log_likelihood(X, y), self.model_, self._x(X).shape[0])
