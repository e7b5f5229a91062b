"""Expert functions h(x; eta_i) for every expert at once.

Shape legend as in ``gatelab.gates``: covariates (..., N, D), parameter blocks
(..., E, ...), expert means (..., N, E). Experts that are linear in their parameters
(linear, polynomial, constant) also expose ``features(x)`` so that estimators can solve
their M-step by weighted least squares: h_i(x) = b_i + a_i . features(x).
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import broadcast_shapes, build, check_int, choose
from .params import Params, Shapes, random_blocks

__all__ = ["Expert", "LinearExpert", "PolynomialExpert", "FFNExpert", "ConstantExpert",
           "EXPERTS", "ACTIVATIONS", "make_expert", "polynomial_features"]

ACTIVATIONS: dict[str, Any] = {
    "relu": torch.relu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


@dataclass(frozen=True)
class Expert(ABC):
    """An expert family h(x; eta): hyper-parameters only, parameters passed as blocks."""

    name: ClassVar[str] = "expert"
    linear_in_params: ClassVar[bool] = False

    @abstractmethod
    def param_shapes(self, n_experts: int, dim: int) -> Shapes:
        """Event shape of each parameter block."""

    @abstractmethod
    def mean(self, x_ND: Tensor, params: Params) -> Tensor:
        """h(x; eta_i) for every expert: shape (..., N, E)."""

    def features(self, x_ND: Tensor) -> Tensor:
        """phi(x) with h(x) = b + a . phi(x), for experts linear in their parameters."""
        raise NotImplementedError(f"{type(self).__name__} is not linear in its parameters.")

    def random_params(self, n_experts: int, dim: int, generator: torch.Generator | None = None,
                      batch_shape: tuple[int, ...] = (), dtype: torch.dtype = torch.float64) -> Params:
        """Standard-normal draws for every block (tests and random starts)."""
        return random_blocks(self.param_shapes(n_experts, dim), generator, batch_shape, dtype)

    def differentiable(self) -> bool:
        """Whether h is differentiable in its parameters wherever data can put an
        optimum, so that a gradient certificate (``fit.lsq.rss_gradient_norm``,
        ``fit.polish``) means something."""
        return True

    def normalise(self, params: Params) -> Params:
        """The identifiable representative of the experts' blocks (same functions)."""
        return dict(params)


@lru_cache(maxsize=64)
def _monomials(dim: int, degree: int) -> tuple[tuple[int, ...], ...]:
    """Index tuples of all monomials of total degree 1..degree in ``dim`` variables,
    ordered by degree, then lexicographically (x1, x2, x1^2, x1 x2, x2^2, ...)."""
    return tuple(c for p in range(1, degree + 1)
                 for c in itertools.combinations_with_replacement(range(dim), p))


def polynomial_features(x_ND: Tensor, degree: int) -> Tensor:
    """All monomials of total degree 1..``degree`` of x: shape (..., N, M).

    M = C(D + degree, degree) - 1; the constant monomial is left to the intercept.
    """
    cols = [x_ND[..., list(idx)].prod(-1) for idx in _monomials(x_ND.shape[-1], degree)]
    return torch.stack(cols, dim=-1)


def _n_monomials(dim: int, degree: int) -> int:
    return len(_monomials(dim, degree))


@dataclass(frozen=True)
class LinearExpert(Expert):
    """Linear expert h(x) = a . x + b. Blocks: a (E, D), b (E,)."""

    name: ClassVar[str] = "linear"
    linear_in_params: ClassVar[bool] = True

    def param_shapes(self, n_experts: int, dim: int) -> Shapes:
        return {"a": (n_experts, dim), "b": (n_experts,)}

    def features(self, x_ND: Tensor) -> Tensor:
        return x_ND

    def mean(self, x_ND: Tensor, params: Params) -> Tensor:
        return self.features(x_ND) @ params["a"].transpose(-1, -2) + params["b"].unsqueeze(-2)


@dataclass(frozen=True)
class PolynomialExpert(LinearExpert):
    """Polynomial expert of degree p: h(x) = b + sum over monomials m of degree 1..p of
    a_m x^m. Blocks: a (E, M) over ``polynomial_features`` order, b (E,)."""

    degree: int = 2
    name: ClassVar[str] = "polynomial"

    def __post_init__(self) -> None:
        check_int("degree", self.degree, 1, fix="Use degree=1 (or 'linear') for linear experts.")

    def param_shapes(self, n_experts: int, dim: int) -> Shapes:
        return {"a": (n_experts, _n_monomials(dim, self.degree)), "b": (n_experts,)}

    def features(self, x_ND: Tensor) -> Tensor:
        return polynomial_features(x_ND, self.degree)


@dataclass(frozen=True)
class FFNExpert(Expert):
    """One-hidden-unit feed-forward expert h(x) = kappa2 * act(kappa1 . x + kappa0),
    act in {relu, gelu, tanh, sigmoid} (the FFN experts of arXiv 2405.13997, 2405.14131).
    Blocks: kappa1 (E, D), kappa0 (E,), kappa2 (E,)."""

    activation: str = "relu"
    name: ClassVar[str] = "ffn"

    def __post_init__(self) -> None:
        choose("activation", self.activation, ACTIVATIONS)

    def param_shapes(self, n_experts: int, dim: int) -> Shapes:
        return {"kappa1": (n_experts, dim), "kappa0": (n_experts,), "kappa2": (n_experts,)}

    def mean(self, x_ND: Tensor, params: Params) -> Tensor:
        pre = x_ND @ params["kappa1"].transpose(-1, -2) + params["kappa0"].unsqueeze(-2)
        return params["kappa2"].unsqueeze(-2) * ACTIVATIONS[self.activation](pre)

    def differentiable(self) -> bool:
        """ReLU has a hinge at kappa1 . x + kappa0 = 0, so the RSS's gradient jumps each
        time a sample crosses one: over-specified sigmoid-vs-softmax fits stall at
        (2/N) ||J^T r|| of about 0.14 / n (1.3e-4, 3.7e-5, 8.8e-6 at n = 1e3, 4e3, 1.6e4)
        with no lower RSS to be found. Smooth activations are differentiable."""
        return self.activation != "relu"

    def normalise(self, params: Params) -> Params:
        """ReLU is positively homogeneous, kappa2 relu(z) = (c kappa2) relu(z / c) for c > 0,
        so only the direction of (kappa1_i, kappa0_i) is identified: the identifiable form
        puts it on the unit sphere and moves its norm into kappa2_i. Other activations are
        not homogeneous and are returned unchanged."""
        out = dict(params)
        if self.activation != "relu":
            return out
        inner = torch.cat([params["kappa1"], params["kappa0"].unsqueeze(-1)], dim=-1)
        norm = inner.norm(dim=-1).clamp_min(torch.finfo(inner.dtype).tiny)
        out["kappa1"] = params["kappa1"] / norm.unsqueeze(-1)
        out["kappa0"] = params["kappa0"] / norm
        out["kappa2"] = params["kappa2"] * norm
        return out


@dataclass(frozen=True)
class ConstantExpert(Expert):
    """Input-independent expert h(x) = b. Blocks: b (E,)."""

    name: ClassVar[str] = "constant"
    linear_in_params: ClassVar[bool] = True

    def param_shapes(self, n_experts: int, dim: int) -> Shapes:
        return {"b": (n_experts,)}

    def features(self, x_ND: Tensor) -> Tensor:
        return x_ND[..., :0]

    def mean(self, x_ND: Tensor, params: Params) -> Tensor:
        b = params["b"].unsqueeze(-2)
        batch = broadcast_shapes(b.shape[:-2], x_ND.shape[:-2])
        return b.expand(*batch, x_ND.shape[-2], b.shape[-1])


EXPERTS: dict[str, Any] = {
    "linear": LinearExpert,
    "polynomial": PolynomialExpert,
    "ffn": FFNExpert,
    "constant": ConstantExpert,
}


def make_expert(expert: str | Expert, **options: Any) -> Expert:
    """Resolve an expert name from ``EXPERTS`` (with options such as ``degree=3`` or
    ``activation="gelu"``), or return an ``Expert`` instance unchanged."""
    if isinstance(expert, Expert):
        return expert
    return build("expert", expert, EXPERTS, options,
                 "'polynomial' takes degree; 'ffn' takes activation.")
