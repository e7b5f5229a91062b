"""Built-in studies: one TOML file each, reproducing a paper's simulation."""

from __future__ import annotations

from pathlib import Path

from ..spec import Study, load_study

HERE = Path(__file__).resolve().parent


def names() -> list[str]:
    """The built-in study names."""
    return sorted(p.stem for p in HERE.glob("*.toml"))


def get(name: str) -> Study:
    """A built-in study by name, or a study file by path."""
    path = HERE / f"{name}.toml"
    if path.exists():
        return load_study(path)
    if Path(name).suffix == ".toml" and Path(name).exists():
        return load_study(name)
    raise ValueError(f"Unknown study {name!r}. Built-in studies: {', '.join(names())}; or pass "
                     f"the path of a .toml study file.")
