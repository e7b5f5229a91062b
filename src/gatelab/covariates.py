"""Covariate distributions: where the x of a simulated data set come from."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._checks import build, check_int, check_positive

__all__ = ["Covariates", "UniformBox", "GaussianCovariates", "Grid", "COVARIATES", "make_covariates"]


@dataclass(frozen=True)
class Covariates(ABC):
    """A distribution of covariates x in R^dim."""

    dim: int = 1

    def __post_init__(self) -> None:
        check_int("dim", self.dim, 1)

    @abstractmethod
    def sample(self, n: int, generator: torch.Generator | None = None,
               batch_shape: tuple[int, ...] = (), dtype: torch.dtype = torch.float64) -> Tensor:
        """Draw x of shape (*batch_shape, n, dim)."""

    def quantile(self, u: Tensor) -> Tensor:
        """Each coordinate's inverse CDF at u in [0, 1] (the coordinates are independent);
        used to integrate over the covariate law (e.g. expected gate weights)."""
        raise NotImplementedError(f"{type(self).__name__} has no quantile function; use "
                                  f"'uniform' or 'gaussian' covariates.")

    def cdf(self, x: Tensor) -> Tensor:
        """Each coordinate's CDF at x."""
        raise NotImplementedError(f"{type(self).__name__} has no CDF; use 'uniform' or "
                                  f"'gaussian' covariates.")


@dataclass(frozen=True)
class UniformBox(Covariates):
    """x uniform on the box [low, high]^dim (the reference protocol uses [0, 1])."""

    low: float = 0.0
    high: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.high > self.low:
            raise ValueError(f"UniformBox needs high > low. Got low={self.low}, high={self.high}.")

    def sample(self, n: int, generator: torch.Generator | None = None,
               batch_shape: tuple[int, ...] = (), dtype: torch.dtype = torch.float64) -> Tensor:
        check_int("n", n, 1)
        u = torch.rand(*batch_shape, n, self.dim, generator=generator, dtype=dtype)
        return self.quantile(u)

    def quantile(self, u: Tensor) -> Tensor:
        return self.low + (self.high - self.low) * u

    def cdf(self, x: Tensor) -> Tensor:
        return ((x - self.low) / (self.high - self.low)).clamp(0.0, 1.0)


@dataclass(frozen=True)
class GaussianCovariates(Covariates):
    """x ~ N(mean, std^2 I_dim)."""

    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("std", self.std)

    def sample(self, n: int, generator: torch.Generator | None = None,
               batch_shape: tuple[int, ...] = (), dtype: torch.dtype = torch.float64) -> Tensor:
        check_int("n", n, 1)
        z = torch.randn(*batch_shape, n, self.dim, generator=generator, dtype=dtype)
        return self.mean + self.std * z

    def quantile(self, u: Tensor) -> Tensor:
        return self.mean + self.std * torch.special.ndtri(u)

    def cdf(self, x: Tensor) -> Tensor:
        return torch.special.ndtr((x - self.mean) / self.std)


@dataclass(frozen=True)
class Grid(Covariates):
    """A fixed design: n equally spaced points on [low, high] for dim = 1, or the product
    grid of m points per axis for dim > 1 (then n must equal m^dim). The generator is
    ignored; every replicate sees the same design."""

    low: float = 0.0
    high: float = 1.0

    def sample(self, n: int, generator: torch.Generator | None = None,
               batch_shape: tuple[int, ...] = (), dtype: torch.dtype = torch.float64) -> Tensor:
        check_int("n", n, 1)
        m = round(n ** (1.0 / self.dim))
        if m ** self.dim != n:
            raise ValueError(f"A {self.dim}-D grid needs n = m^{self.dim} points. Got n={n}; try "
                             f"n={m ** self.dim} or n={(m + 1) ** self.dim}.")
        axis = torch.linspace(self.low, self.high, m, dtype=dtype)
        x = torch.cartesian_prod(*[axis] * self.dim).reshape(n, self.dim)
        return x.expand(*batch_shape, n, self.dim)


COVARIATES: dict[str, Any] = {"uniform": UniformBox, "gaussian": GaussianCovariates, "grid": Grid}


def make_covariates(spec: str | Covariates, **options: Any) -> Covariates:
    """Resolve a covariate distribution by name ('uniform', 'gaussian', 'grid') or return
    an instance unchanged."""
    if isinstance(spec, Covariates):
        return spec
    return build("covariate distribution", spec, COVARIATES, options,
                 "All take dim; 'uniform' and 'grid' take low, high; 'gaussian' mean, std.")
