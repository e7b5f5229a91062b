"""Empirical convergence rates: the least-squares slope of log(mean loss over replicates)
against log(n), with a bootstrap confidence interval (replicates resampled within each n),
compared with the theoretical slope. The same slope of log(median loss) is reported beside
it: over-specified losses are heavy-tailed (a few fits whose split experts wander give
losses many orders of magnitude above the rest), and a mean over 40 replicates then follows
its largest value."""

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


STATISTICS = {"mean": np.mean, "median": np.median}


def rate(ns: Sequence[int], losses: Sequence[np.ndarray], n_boot: int = 1000, level: float = 0.95,
         seed: int = 0, statistic: str = "mean") -> Rate:
    """Slope of log(statistic of the loss) on log(n), the statistic "mean" (default) or
    "median" over replicates, and its percentile bootstrap interval.

    ``losses[m]`` holds the replicates' losses at ``ns[m]``. Each bootstrap draw resamples
    the replicates of every n with replacement and refits the slope.
    """
    if len(ns) < 2:
        raise ValueError("A rate needs at least two sample sizes.")
    if statistic not in STATISTICS:
        raise ValueError(f"Unknown statistic {statistic!r}; valid: {', '.join(STATISTICS)}.")
    stat = STATISTICS[statistic]
    rng = np.random.default_rng(seed)
    point = float(slope(ns, np.array([stat(v) for v in losses])))
    boot = np.empty((n_boot, len(ns)))
    for m, values in enumerate(losses):
        values = np.asarray(values, dtype=float)
        idx = rng.integers(0, len(values), size=(n_boot, len(values)))
        boot[:, m] = stat(values[idx], axis=-1)
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
    theory and verdict, and the slope of log(median loss) with its interval
    (``median_slope``, ``median_ci_low``, ``median_ci_high``). Non-finite losses (diverged fits, flagged degenerate) are left out
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
        # Blocks every row has (a store resumed across versions may mix block sets).
        common = set.intersection(*(set(r.blocks) for n in ns for r in cells[n]))
        blocks = ["total"] + sorted(common)
        for block in blocks:
            raw = [np.array([r.loss if block == "total" else r.blocks[block] for r in cells[n]],
                            dtype=float) for n in ns]
            losses = [v[np.isfinite(v)] for v in raw]
            excluded = int(sum((~np.isfinite(v)).sum() for v in raw))
            keep = [i for i, v in enumerate(losses) if len(v) and np.mean(v) > 0]
            if len(keep) < 2:
                continue
            kept_ns, kept = [ns[i] for i in keep], [losses[i] for i in keep]
            r = rate(kept_ns, kept, n_boot=n_boot)
            med = rate(kept_ns, kept, n_boot=n_boot, statistic="median")
            theory = setting.theory if block == "total" else setting.theory_blocks.get(block)
            table.append({"setting": setting.name, "fitted_k": setting.fitted_k,
                          "loss": setting.loss, "block": block, "slope": r.slope,
                          "ci_low": r.ci_low, "ci_high": r.ci_high, "theory": theory,
                          "verdict": verdict(theory, r), "median_slope": med.slope,
                          "median_ci_low": med.ci_low, "median_ci_high": med.ci_high,
                          "sizes": len(keep), "excluded": excluded,
                          "replicates": int(np.median([len(v) for v in losses]))})
    return table
