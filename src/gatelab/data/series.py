"""JapaneseVowels: 640 utterances of /ae/ by 9 speakers, each a series of 7-29 frames of 12
LPC cepstrum coefficients (the UCR/UEA archive's split: 270 train, 370 test), from the
``.ts`` files in the ``aeon==1.6.0`` wheel (read, never imported).

A ``.ts`` file (sktime/aeon's format) holds ``@key value`` header lines, then after
``@data`` one case per line: each channel's comma-separated values, channels separated by
``:``, and last the class label.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .files import wheel_file

__all__ = ["Series", "read_ts", "japanese_vowels"]

AEON = "aeon==1.6.0"


class Series(NamedTuple):
    """Variable-length multivariate series: ``values[i]`` is (T_i, channels); labels (N,)
    index ``classes``."""

    values: tuple[np.ndarray, ...]
    labels: np.ndarray
    classes: tuple[str, ...]


def _case(line: str, where: str, channels: int | None) -> tuple[np.ndarray, str]:
    *fields, label = line.split(":")
    try:
        rows = [np.array([float(v) for v in f.split(",")]) for f in fields]
    except ValueError:
        raise ValueError(f"{where}: a channel holds a value that is not a number: {line[:60]!r}") from None
    if not rows or len({len(r) for r in rows}) != 1 or (channels is not None and len(rows) != channels):
        raise ValueError(f"{where}: expected {channels or 'some'} channels of one common length, got "
                         f"lengths {[len(r) for r in rows]}.")
    return np.stack(rows, axis=1), label.strip()


def read_ts(path: str | Path) -> Series:
    """Every case of a ``.ts`` file, in file order; labels numbered in the order of the
    header's ``@classLabel true ...`` list (else of first appearance)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found.")
    channels, classes, cases, in_data = None, [], [], False
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if not in_data:
                key, _, value = line.partition(" ")
                if key.lower() == "@dimensions":
                    channels = int(value)
                elif key.lower() == "@classlabel" and value.split()[:1] == ["true"]:
                    classes = value.split()[1:]
                in_data = key.lower() == "@data"
                continue
            cases.append(_case(line, f"{path}, line {number}", channels))
    if not cases:
        raise ValueError(f"{path}: no cases after an @data line; is it a .ts file?")
    names = list(classes) + [c for c in dict.fromkeys(lab for _, lab in cases) if c not in classes]
    index = {c: i for i, c in enumerate(names)}
    return Series(tuple(v for v, _ in cases), np.array([index[lab] for _, lab in cases]), tuple(names))


def japanese_vowels(split: str = "train", folder: str | Path | None = None) -> Series:
    """The ``split`` ("train" or "test") of JapaneseVowels, from ``folder`` (default:
    ``GATELAB_JAPANESE_VOWELS``, else the installed aeon wheel's data folder)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    name = f"JapaneseVowels_{split.upper()}.ts"
    folder = folder or os.environ.get("GATELAB_JAPANESE_VOWELS")
    if folder:
        return read_ts(Path(folder) / name)
    return read_ts(wheel_file("aeon", AEON, f"datasets/data/JapaneseVowels/{name}",
                              "set GATELAB_JAPANESE_VOWELS to a folder holding it"))
