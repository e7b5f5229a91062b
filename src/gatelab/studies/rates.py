"""Empirical convergence rates: the least-squares slope of log(mean loss over replicates)
against log(n), with a bootstrap confidence interval (replicates resampled within each n),
compared with the theoretical slope."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from .spec import Study
from .store import FitRow

__all__ = ["Rate", "slope", "rate", "verdict", "rate_table"]


class Rate(NamedTuple):
    slope: float
    ci_low: float
    ci_high: float


def slope(ns: Sequence[float], means: np.ndarray) -> np.ndarray:
    """OLS slope of log(means) on log(ns); ``means`` may carry leading (bootstrap) axes."""
    x = np.log(np.asarray(ns, dtype=float))
    y = np.log(means)
    xc = x - x.mean()
    return ((y - y.mean(-1, keepdims=True)) * xc).sum(-1) / (xc ** 2).sum()


def rate(ns: Sequence[int], losses: Sequence[np.ndarray], n_boot: int = 1000, level: float = 0.95,
         seed: int = 0) -> Rate:
    """Slope of log(mean loss) on log(n) and its percentile bootstrap interval.

    ``losses[m]`` holds the replicates' losses at ``ns[m]``. Each bootstrap draw resamples
    the replicates of every n with replacement and refits the slope.
    """
    if len(ns) < 2:
        raise ValueError("A rate needs at least two sample sizes.")
    rng = np.random.default_rng(seed)
    point = float(slope(ns, np.array([np.mean(v) for v in losses])))
    boot = np.empty((n_boot, len(ns)))
    for m, values in enumerate(losses):
        values = np.asarray(values, dtype=float)
        idx = rng.integers(0, len(values), size=(n_boot, len(values)))
        boot[:, m] = values[idx].mean(-1)
    draws = slope(ns, boot)
    tail = (1 - level) / 2
    return Rate(point, float(np.quantile(draws, tail)), float(np.quantile(draws, 1 - tail)))


def verdict(theory: float | None, r: Rate) -> str:
    """'within CI', 'faster' (the whole interval below the theoretical slope) or 'slower'."""
    if theory is None:
        return "n/a"
    if r.ci_high < theory:
        return "faster"
    if r.ci_low > theory:
        return "slower"
    return "within CI"


def rate_table(study: Study, rows: Sequence[FitRow], n_boot: int = 1000) -> list[dict]:
    """One entry per setting and block ('total' for the whole loss) with slope, interval,
    theory and verdict. Non-finite losses (diverged fits, flagged degenerate) are left out
    and counted in ``excluded``; sizes with a non-positive mean loss are left out too."""
    by_setting: dict[str, dict[int, list[FitRow]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        by_setting[row.setting][row.n].append(row)
    table = []
    for setting in study.settings:
        cells = by_setting.get(setting.name, {})
        ns = sorted(cells)
        if len(ns) < 2:
            continue
        blocks = ["total"] + sorted(cells[ns[0]][0].blocks)
        for block in blocks:
            raw = [np.array([r.loss if block == "total" else r.blocks[block] for r in cells[n]],
                            dtype=float) for n in ns]
            losses = [v[np.isfinite(v)] for v in raw]
            excluded = int(sum((~np.isfinite(v)).sum() for v in raw))
            keep = [i for i, v in enumerate(losses) if len(v) and np.mean(v) > 0]
            if len(keep) < 2:
                continue
            r = rate([ns[i] for i in keep], [losses[i] for i in keep], n_boot=n_boot)
            theory = setting.theory if block == "total" else setting.theory_blocks.get(block)
            table.append({"setting": setting.name, "fitted_k": setting.fitted_k,
                          "loss": setting.loss, "block": block, "slope": r.slope,
                          "ci_low": r.ci_low, "ci_high": r.ci_high, "theory": theory,
                          "verdict": verdict(theory, r), "sizes": len(keep), "excluded": excluded,
                          "replicates": int(np.median([len(v) for v in losses]))})
    return table
