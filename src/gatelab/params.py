"""Parameter blocks: a model's parameters are a plain ``dict`` of named tensors.

Block ``name`` has shape ``(*batch, *event)``; the event shape is fixed by the model
(``model.param_shapes()``) and the leading batch dimensions (replicates, restarts)
broadcast against the covariates' leading dimensions. Plain dicts work directly with
``torch.func`` and autograd; these helpers are the few operations shared by gates,
experts and models.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

Params = dict[str, Tensor]
Shapes = dict[str, tuple[int, ...]]


def random_blocks(shapes: Mapping[str, tuple[int, ...]], generator: torch.Generator | None = None,
                  batch_shape: tuple[int, ...] = (), dtype: torch.dtype = torch.float64,
                  scale: float = 1.0) -> Params:
    """Independent N(0, scale^2) draws for each block, with leading ``batch_shape``."""
    return {name: scale * torch.randn((*batch_shape, *event), generator=generator, dtype=dtype)
            for name, event in shapes.items()}


def with_prefix(prefix: str, blocks: Mapping[str, object]) -> dict:
    """Rename every key ``k`` to ``prefix + k`` (namespacing sub-model blocks)."""
    return {prefix + name: value for name, value in blocks.items()}


def take_prefix(prefix: str, blocks: Mapping[str, object]) -> dict:
    """The blocks whose key starts with ``prefix``, with the prefix removed."""
    return {name[len(prefix):]: value for name, value in blocks.items() if name.startswith(prefix)}


def pick(params: Mapping[str, Tensor], names) -> Params:
    """The sub-dict of ``params`` holding ``names`` (keys a sub-model knows)."""
    return {name: params[name] for name in names}


def pack(params: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, ...]]) -> Tensor:
    """Flatten the blocks named in ``shapes`` (each (B, *event)) into one (B, P) matrix."""
    first = params[next(iter(shapes))]
    batch = first.shape[: first.dim() - len(shapes[next(iter(shapes))])]
    return torch.cat([params[k].reshape(*batch, -1) for k in shapes], dim=-1)


def unpack(theta: Tensor, shapes: Mapping[str, tuple[int, ...]]) -> Params:
    """Inverse of ``pack``: split (..., P) into blocks of shape (..., *event)."""
    sizes = [_numel(event) for event in shapes.values()]
    parts = theta.split(sizes, dim=-1)
    return {k: p.reshape(*theta.shape[:-1], *event) for (k, event), p in zip(shapes.items(), parts)}


def _numel(event: tuple[int, ...]) -> int:
    out = 1
    for s in event:
        out *= s
    return out
