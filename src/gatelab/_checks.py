"""Checks at the public boundary: each error names the argument, what it must be,
what it got, and what to try. Internal code calls the unchecked paths."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, overload

import torch
from torch import Tensor


def broadcast_shapes(*shapes) -> torch.Size:
    """The broadcast of integer shapes (NumPy's rule); RuntimeError, as torch's, when they
    do not broadcast. ``torch.broadcast_shapes`` imports torch's symbolic-shape machinery
    (and sympy, 0.2 s) on its first call, which a command-line fit should not pay."""
    out: list[int] = []
    for shape in shapes:
        shape = tuple(shape)
        if len(shape) > len(out):
            out = [1] * (len(shape) - len(out)) + out
        for i, n in enumerate(shape, start=len(out) - len(shape)):
            if out[i] == 1:
                out[i] = n
            elif n != 1 and n != out[i]:
                raise RuntimeError(f"Shape mismatch: {[tuple(s) for s in shapes]} do not "
                                   f"broadcast to a single shape.")
    return torch.Size(out)

def check_int(name: str, value: Any, low: int, high: int | None = None, fix: str = "") -> int:
    """Return ``value`` if it is an int in [low, high], else raise ``ValueError``/``TypeError``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"The '{name}' parameter must be an int. Got {value!r} of type "
                        f"{type(value).__name__} instead.")
    upper = "inf)" if high is None else f"{high}]"
    if value < low or (high is not None and value > high):
        hint = f" {fix}" if fix else ""
        raise ValueError(f"The '{name}' parameter must be an int in the range [{low}, {upper}. "
                         f"Got {value} instead.{hint}")
    return value


def check_nonnegative(name: str, value: float, fix: str = "") -> float:
    """Return ``value`` as a float if it is finite and >= 0."""
    value = float(value)
    if not (value >= 0 and value < float("inf")):
        hint = f" {fix}" if fix else ""
        raise ValueError(f"The '{name}' parameter must be a finite number >= 0. Got {value}.{hint}")
    return value


def check_positive(name: str, value: float, fix: str = "") -> float:
    """Return ``value`` as a float if it is finite and > 0."""
    value = float(value)
    if not (value > 0 and value < float("inf")):
        hint = f" {fix}" if fix else ""
        raise ValueError(f"The '{name}' parameter must be a finite number > 0. Got {value}.{hint}")
    return value


def choose(kind: str, name: str, registry: Mapping[str, Any]) -> Any:
    """Look ``name`` up in a registry, or raise an error that lists the valid names."""
    if not isinstance(name, str):
        raise TypeError(f"The {kind} must be a name or an instance. Got {type(name).__name__}.")
    try:
        return registry[name]
    except KeyError:
        valid = ", ".join(sorted(registry))
        raise ValueError(f"Unknown {kind} {name!r}. Valid names: {valid}.") from None


def build(kind: str, name: str, registry: Mapping[str, Any], options: Mapping[str, Any],
          hint: str = "") -> Any:
    """Look ``name`` up in a registry and call it with ``options``; bad options get an
    error that names the variant and, via ``hint``, the options it takes."""
    factory = choose(kind, name, registry)
    try:
        return factory(**options)
    except TypeError as err:
        raise TypeError(f"Bad options for {kind} {name!r}: {err}. {hint}".rstrip()) from None


def as_tensor(name: str, value: Any, dtype: torch.dtype | None = None) -> Tensor:
    """Convert array-likes to a floating tensor; keep the dtype of floating tensors."""
    if isinstance(value, Tensor):
        t = value if value.is_floating_point() else value.to(dtype or torch.get_default_dtype())
    else:
        try:
            t = torch.as_tensor(value, dtype=dtype or torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"'{name}' must be a numeric array or tensor: {err}") from None
    return t if dtype is None else t.to(dtype)


def check_finite(name: str, t: Tensor) -> Tensor:
    """Raise ``ValueError`` naming ``name`` if ``t`` holds NaN or inf."""
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"'{name}' contains {bad} NaN or infinite value(s). Remove or impute "
                         f"them before calling gatelab.")
    return t


@overload
def check_inputs(x: Any, dim: int) -> tuple[Tensor, None]: ...


@overload
def check_inputs(x: Any, dim: int, y: None) -> tuple[Tensor, None]: ...


@overload
def check_inputs(x: Any, dim: int, y: Any) -> tuple[Tensor, Tensor]: ...


def check_inputs(x: Any, dim: int, y: Any | None = None) -> tuple[Tensor, Tensor | None]:
    """Validate covariates ``x`` of shape (..., N, D) and, if given, responses (..., N)."""
    x = as_tensor("x", x)
    if x.dim() < 2 or x.shape[-1] != dim:
        raise ValueError(f"'x' must have shape (..., n_samples, {dim}) for a model with dim={dim}. "
                         f"Got shape {tuple(x.shape)}. Reshape 1-D covariates with x[:, None].")
    check_finite("x", x)
    if y is None:
        return x, None
    y = as_tensor("y", y, dtype=x.dtype)
    if y.shape != x.shape[:-1]:
        raise ValueError(f"'y' must have shape {tuple(x.shape[:-1])} (x's shape without its last "
                         f"axis). Got {tuple(y.shape)}.")
    return x, check_finite("y", y)


def check_blocks(params: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, ...]],
                 positive: tuple[str, ...] = (),
                 unit: tuple[str, ...] = ()) -> torch.Size:
    """Check parameter blocks against their event shapes; return the common batch shape.

    Block ``name`` must have shape ``(*batch, *shapes[name])``, with batch shapes that
    broadcast. Blocks in ``positive`` must be > 0, blocks in ``unit`` lie in [0, 1].
    """
    missing = sorted(set(shapes) - set(params))
    extra = sorted(set(params) - set(shapes))
    if missing or extra:
        raise ValueError(f"Parameter blocks do not match the model: missing {missing}, unexpected "
                         f"{extra}. Expected blocks {sorted(shapes)}; model.param_shapes() "
                         f"lists them with their shapes.")
    batches = []
    for name, event in shapes.items():
        t = params[name]
        if not isinstance(t, Tensor):
            raise TypeError(f"Parameter block '{name}' must be a torch.Tensor, got "
                            f"{type(t).__name__}.")
        if tuple(t.shape[t.dim() - len(event):]) != tuple(event) or t.dim() < len(event):
            raise ValueError(f"Parameter block '{name}' must have shape (..., "
                             f"{', '.join(map(str, event))}). Got {tuple(t.shape)}.")
        check_finite(f"params['{name}']", t.detach())
        batches.append(t.shape[: t.dim() - len(event)])
    for name in positive:
        if not bool((params[name] > 0).all()):
            raise ValueError(f"Parameter block '{name}' (a variance) must be > 0 everywhere. Got "
                             f"min {float(params[name].min()):.3g}. Pass variances, not log "
                             f"variances, and floor them away from zero.")
    for name in unit:
        t = params[name]
        if not bool(((t >= 0) & (t <= 1)).all()):
            raise ValueError(f"Parameter block '{name}' (a proportion) must lie in [0, 1].")
    try:
        return broadcast_shapes(*batches)
    except RuntimeError:
        raise ValueError(f"Parameter blocks have batch shapes that do not broadcast: "
                         f"{[tuple(b) for b in batches]}. Give every block the same leading "
                         f"replicate dimensions.") from None
