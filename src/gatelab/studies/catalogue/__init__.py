"""Built-in studies and experiments: one TOML file each, reproducing a paper's simulation
or experiment. A file with ``kind = "experiment"`` is a deep-learning experiment
(``gatelab.experiments``); any other, a convergence-rate study."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..spec import Study, read_toml

HERE = Path(__file__).resolve().parent


def names() -> list[str]:
    """The built-in study and experiment names."""
    return sorted(p.stem for p in HERE.glob("*.toml"))


def from_dict(data: Mapping[str, Any]) -> Any:
    """A study or, for ``kind = "experiment"``, an experiment from its spec data."""
    if data.get("kind") == "experiment":
        from ...experiments.spec import Experiment
        return Experiment.from_dict(data)
    return Study.from_dict(data)


def get(name: str) -> Any:
    """A built-in study or experiment by name, or a spec file by path."""
    path = HERE / f"{name}.toml"
    if path.exists():
        return from_dict(read_toml(path))
    if Path(name).suffix == ".toml" and Path(name).exists():
        return from_dict(read_toml(name))
    raise ValueError(f"Unknown study {name!r}. Built-in studies and experiments: {', '.join(names())}; "
                     f"or pass the path of a .toml study file.")
