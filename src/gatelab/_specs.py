"""Gates and experts as plain data: {"class": ..., "fields": {...}}, for saved models and
for the router entry of a saved Hugging Face config. Every gate and expert is a frozen
dataclass of hyper-parameters, so its fields are the whole of it."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["to_spec", "from_spec"]


def to_spec(obj: Any) -> Any:
    """A gate or expert (nested ones too) as JSON-able data; other values unchanged."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"class": type(obj).__name__,
                "fields": {f.name: to_spec(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    return obj


def from_spec(spec: Any) -> Any:
    """The inverse of ``to_spec``: classes are looked up in ``gatelab.gates`` and
    ``gatelab.experts``."""
    if not (isinstance(spec, dict) and set(spec) == {"class", "fields"}):
        return spec
    from . import experts, gates
    cls = getattr(gates, spec["class"], None) or getattr(experts, spec["class"], None)
    if cls is None:
        raise ValueError(f"Unknown gate or expert class {spec['class']!r} in a saved spec.")
    return cls(**{k: from_spec(v) for k, v in spec["fields"].items()})
