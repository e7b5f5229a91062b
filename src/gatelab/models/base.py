"""What every model shares: parameter blocks, checks, sampling, and Gaussian helpers.

Shape legend: N samples, D features, E experts; ``...`` are batch (replicate) dims.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from .._checks import broadcast_shapes, check_blocks, check_inputs, check_int
from ..covariates import Covariates, UniformBox, make_covariates
from ..params import Params, Shapes, random_blocks

__all__ = ["Sample", "Model", "DensityModel", "ConditionalDensity", "FrozenDensity",
           "MixingMeasure", "normal_log_prob", "normal_cdf", "sample_categorical"]


class MixingMeasure(NamedTuple):
    """A model's parameters as a discrete measure G = sum_i m_i delta_(omega_i), the object
    Voronoi losses compare (arXiv 2305.03288): the masses as logs (..., K), the names of
    the blocks whose rows make up each atom omega_i, and whether the masses are
    ``relative`` (defined up to a common factor, as softmax intercepts are: a loss then
    puts them on the truth's scale)."""

    log_masses: Tensor
    atoms: tuple[str, ...]
    relative: bool

    @property
    def masses(self) -> Tensor:
        return self.log_masses.exp()

_LOG_2PI = math.log(2 * math.pi)


def normal_log_prob(y: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """log N(y | mean, var), broadcasting."""
    return -0.5 * (_LOG_2PI + torch.log(var) + (y - mean).square() / var)


def normal_cdf(y: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """P(Y <= y) for Y ~ N(mean, var), broadcasting."""
    return 0.5 * torch.erfc(-(y - mean) / torch.sqrt(2 * var))


def sample_categorical(log_w_NE: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One category per row of log weights (..., N, E), by inverse CDF: (..., N) int64.
    Weights need not be normalised; rows with a -inf entry (top-K dropped) never pick it."""
    w = torch.softmax(log_w_NE, dim=-1)
    cum = w.cumsum(-1)
    u = torch.rand(w.shape[:-1] + (1,), generator=generator, dtype=w.dtype, device=w.device)
    # Scaling by the last cumulative value guards against its rounding below 1.
    z = (cum < u * cum[..., -1:]).sum(-1)
    return z.clamp_max(w.shape[-1] - 1)


class Sample(NamedTuple):
    """A simulated data set: covariates x (..., N, D) and responses y (..., N)."""

    x: Tensor
    y: Tensor


class Model(ABC):
    """A parametric conditional model of y given x in R^dim, with named parameter blocks.

    Parameters are a dict of tensors (see ``gatelab.params``): block ``name`` has shape
    (*batch, *param_shapes()[name]); any leading batch shape (replicates, restarts)
    broadcasts against covariates (*batch, N, D).
    """

    #: blocks that must be > 0 (variances) and in [0, 1] (proportions)
    positive_blocks: tuple[str, ...] = ()
    unit_blocks: tuple[str, ...] = ()

    def __init__(self, dim: int, covariates: Covariates | str | None = None) -> None:
        self.dim = check_int("dim", dim, 1)
        self.covariates = UniformBox(dim=dim) if covariates is None else make_covariates(covariates)
        if self.covariates.dim != dim:
            raise ValueError(f"The covariate distribution has dim={self.covariates.dim} but the "
                             f"model has dim={dim}. Build it with dim={dim}.")

    @abstractmethod
    def param_shapes(self) -> Shapes:
        """Event shape of every parameter block, by name."""

    @abstractmethod
    def _sample_y(self, x_ND: Tensor, params: Params, generator: torch.Generator | None) -> Tensor:
        """Draw y (..., N) given covariates, without checks."""

    def check_params(self, params: Params) -> torch.Size:
        """Validate blocks (names, shapes, finiteness, ranges); return the batch shape."""
        return check_blocks(params, self.param_shapes(), self.positive_blocks, self.unit_blocks)

    def normalise(self, params: Params) -> Params:
        """The identifiable representative of ``params`` (same distribution)."""
        return dict(params)

    def random_params(self, generator: torch.Generator | None = None,
                      batch_shape: tuple[int, ...] = (), dtype: torch.dtype = torch.float64) -> Params:
        """Random valid parameters: N(0, 1) blocks, variances exp(N(0, 0.25)),
        proportions sigmoid(N(0, 1)). For tests and random starts."""
        params = random_blocks(self.param_shapes(), generator, batch_shape, dtype)
        for name in self.positive_blocks:
            params[name] = torch.exp(0.5 * params[name])
        for name in self.unit_blocks:
            params[name] = torch.sigmoid(params[name])
        return params

    def sample(self, params: Params, n: int, generator: torch.Generator | None = None,
               replicates: int | None = None) -> Sample:
        """Draw n covariates from ``self.covariates`` and responses from the model.

        Returns x (*lead, n, D) and y (*lead, n), where lead is ``(replicates, *batch)``
        (``replicates`` omitted when None) and batch is the parameters' batch shape.
        """
        batch = self.check_params(params)
        check_int("n", n, 1)
        lead = tuple(batch) if replicates is None else (check_int("replicates", replicates, 1),
                                                         *batch)
        dtype = next(iter(params.values())).dtype
        x = self.covariates.sample(n, generator, lead, dtype)
        return Sample(x, self._sample_y(x, params, generator))

    def _prepare(self, x: Any, params: Params, y: Any = None) -> tuple[Tensor, Tensor | None]:
        """Check inputs and parameters at the public boundary."""
        batch = self.check_params(params)
        x, y = check_inputs(x, self.dim, y)
        try:
            broadcast_shapes(x.shape[:-2], batch)
        except RuntimeError:
            raise ValueError(f"x has batch shape {tuple(x.shape[:-2])} but the parameters have "
                             f"{tuple(batch)}; they must broadcast (one replicate axis each, "
                             f"or unbatched x).") from None
        return x, y


class DensityModel(Model):
    """A model with a conditional density p(y | x): log_prob, cdf, log_likelihood."""

    @abstractmethod
    def _log_prob(self, x_ND: Tensor, y_N: Tensor, params: Params) -> Tensor:
        """log p(y | x) per sample, (..., N), without checks."""

    @abstractmethod
    def _cdf(self, x_ND: Tensor, y_N: Tensor, params: Params) -> Tensor:
        """P(Y <= y | x) per sample, (..., N), without checks."""

    def log_prob(self, x: Any, y: Any, params: Params) -> Tensor:
        """log p(y_n | x_n) for every sample: shape (..., N)."""
        x, y = self._prepare(x, params, y)
        return self._log_prob(x, y, params)

    def log_likelihood(self, x: Any, y: Any, params: Params) -> Tensor:
        """sum_n log p(y_n | x_n): shape (...,), one value per replicate."""
        return self.log_prob(x, y, params).sum(-1)

    def cdf(self, x: Any, y: Any, params: Params) -> Tensor:
        """Conditional CDF P(Y <= y_n | x_n): shape (..., N). Its values at samples drawn
        from the model are Uniform(0, 1) (probability integral transform)."""
        x, y = self._prepare(x, params, y)
        return self._cdf(x, y, params)

    def freeze(self, params: Params) -> FrozenDensity:
        """This model at fixed parameters, as a known density (for g0 or f0)."""
        return FrozenDensity(self, params)


class ConditionalDensity(Protocol):
    """A known conditional density of y given x (the g0 / f0 of deviated and
    contaminated models). ``FrozenDensity`` implements it; so can user code."""

    dim: int

    def log_prob(self, x: Tensor, y: Tensor) -> Tensor: ...

    def cdf(self, x: Tensor, y: Tensor) -> Tensor: ...

    def sample_y(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor: ...


class FrozenDensity:
    """A density model at fixed, validated parameters."""

    def __init__(self, model: DensityModel, params: Params) -> None:
        model.check_params(params)
        self.model, self.params, self.dim = model, {k: v.detach() for k, v in params.items()}, model.dim

    def log_prob(self, x: Tensor, y: Tensor) -> Tensor:
        return self.model._log_prob(x, y, self._cast(x))

    def cdf(self, x: Tensor, y: Tensor) -> Tensor:
        return self.model._cdf(x, y, self._cast(x))

    def sample_y(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.model._sample_y(x, self._cast(x), generator)

    def _cast(self, x: Tensor) -> Params:
        return {k: v.to(x.dtype) for k, v in self.params.items()}

    def __repr__(self) -> str:
        return f"FrozenDensity({self.model!r})"
