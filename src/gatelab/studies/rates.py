"""Empirical convergence rates: the least-squares slope of log(mean loss over replicates)
against log(n), with a bootstrap confidence interval (replicates resampled within each n),
compared with the theoretical slope. The same slope of log(median loss) is reported beside
it: over-specified losses are heavy-tailed (a few fits whose split experts wander give
losses many orders of magnitude above the rest), and a mean over 40 replicates then follows
its largest value."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from .spec import DEFAULT_MAX_WIDTH, Study
from .store import FitRow

__all__ = ["Rate", "slope", "rate", "rate_draws", "interval", "verdict", "rate_table",
           "left_out", "by_setting", "series", "fit_summary", "trimmed_mean", "runoff_fractions",
           "MIN_VERDICT_REPLICATES"]

#: A bootstrap over fewer replicates than this has (next to) no spread: its interval says
#: nothing, so no verdict is given.
MIN_VERDICT_REPLICATES = 3


def left_out(row: FitRow) -> str | None:
    """Why a fit is left out of every slope of its setting, or None if it is used: its gate
    separated the data ("separated", see ``gatelab.fit.status``: the MLE does not exist,
    and the estimate is where the optimiser stopped), or a loss of it is not finite
    ("infinite loss", e.g. a mass that diverged), or, in a certified reading, its gradient
    norm stayed above the bound ("not certified": status max_iter of ``fit.polish``)."""
    if row.status == "separated":
        return "separated"
    if row.reading == "certified" and row.status == "max_iter":
        return "not certified"
    if not (np.isfinite(row.loss) and all(np.isfinite(v) for v in row.blocks.values())):
        return "infinite loss"
    return None


class Rate(NamedTuple):
    slope: float
    ci_low: float
    ci_high: float


def slope(ns: Sequence[float] | np.ndarray, means: np.ndarray) -> np.ndarray:
    """OLS slope of log(means) on log(ns); ``means`` may carry leading (bootstrap) axes."""
    x = np.log(np.asarray(ns, dtype=float))
    y = np.log(means)
    xc = x - x.mean()
    return ((y - y.mean(-1, keepdims=True)) * xc).sum(-1) / (xc ** 2).sum()


def trimmed_mean(values: np.ndarray, axis: int = -1, cut: float = 0.1) -> np.ndarray:
    """The mean after dropping the floor(cut * m) smallest and largest of the m values
    along ``axis`` (a 10% trimmed mean by default: robust to the few fits that wander)."""
    ordered = np.sort(np.asarray(values, dtype=float), axis=axis)
    m = ordered.shape[axis]
    k = int(cut * m)
    return np.take(ordered, np.arange(k, m - k), axis=axis).mean(axis=axis)


STATISTICS: dict[str, Callable[..., Any]] = {"mean": np.mean, "median": np.median, "trimmed": trimmed_mean}


def rate(ns: Sequence[int], losses: Sequence[np.ndarray], n_boot: int = 1000, level: float = 0.95,
         seed: int = 0, statistic: str = "mean") -> Rate:
    """Slope of log(statistic of the loss) on log(n), the statistic "mean" (default),
    "median" or "trimmed" (``trimmed_mean``) over replicates, and its percentile bootstrap
    interval.

    ``losses[m]`` holds the replicates' losses at ``ns[m]``. Each bootstrap draw resamples
    the replicates of every n with replacement and refits the slope.
    """
    point, draws = rate_draws(ns, losses, n_boot, seed, statistic)
    return interval(point, draws, level)


def interval(point: float, draws: np.ndarray, level: float = 0.95) -> Rate:
    """``point`` with the percentile interval of its bootstrap ``draws``."""
    tail = (1 - level) / 2
    return Rate(point, float(np.quantile(draws, tail)), float(np.quantile(draws, 1 - tail)))


def rate_draws(ns: Sequence[int], losses: Sequence[np.ndarray], n_boot: int = 1000,
               seed: int = 0, statistic: str = "mean") -> tuple[float, np.ndarray]:
    """The slope of ``rate`` and its ``n_boot`` bootstrap draws (for intervals of
    functions of slopes, e.g. the difference of two settings')."""
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
    return point, slope(ns, boot)


def runoff_fractions(rows: Sequence[FitRow]) -> dict[str, dict[int, float]]:
    """Per setting and n, the fraction of fits whose gate parameters ran off (fit status
    "separated": the likelihood rises without bound along a direction of the gate
    parameters, so no MLE exists). A heavy-tailed mean slope is read beside this curve."""
    cells: dict[str, dict[int, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        cells[r.setting][r.n].append(r.status == "separated")
    return {s: {n: sum(v) / len(v) for n, v in sorted(by_n.items())} for s, by_n in cells.items()}


class Certificates(NamedTuple):
    """Of a certified reading's fits at one (setting, n): the share at or below the
    gradient bound, the median gradient norm and the median log-likelihood gain of the
    polish over EM's stopping point."""

    certified: float
    grad_norm: float
    gain: float


def certificates(rows: Sequence[FitRow]) -> dict[str, dict[int, Certificates]]:
    """Per setting and n, ``Certificates`` of the rows of the certified reading (none for
    protocol rows). A row counts as certified unless it is "not certified" (``left_out``)."""
    cells: dict[str, dict[int, list[FitRow]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.reading == "certified":
            cells[r.setting][r.n].append(r)
    return {s: {n: Certificates(float(np.mean([left_out(r) != "not certified" for r in v])),
                                _median([r.grad_norm for r in v]), _median([r.gain for r in v]))
                for n, v in sorted(by_n.items())} for s, by_n in cells.items()}


def _median(values: Sequence[float | None]) -> float:
    known = [v for v in values if v is not None]
    return float(np.median(known)) if known else float("nan")


def fit_summary(rows: Sequence[FitRow]) -> str:
    """One line on how the fits ended and which were left out of the slopes, e.g.
    "40 fits: 37 converged, 2 max_iter, 1 separated; left out of the slopes: 1
    (1 separated)". Rows from stores older than fit statuses count as "unknown"."""
    status = Counter(r.status or "unknown" for r in rows)
    reasons = Counter(reason for reason in map(left_out, rows) if reason)
    ended = ", ".join(f"{count} {name}" for name, count in sorted(status.items()))
    out = f"{len(rows)} fits: {ended or 'none'}"
    if reasons:
        why = ", ".join(f"{count} {name}" for name, count in sorted(reasons.items()))
        out += f"; left out of the slopes: {sum(reasons.values())} ({why})"
    return out


def verdict(theory: float | None, r: Rate, replicates: int = MIN_VERDICT_REPLICATES,
            max_width: float = DEFAULT_MAX_WIDTH) -> str:
    """'faster' (the whole interval below the theoretical slope), 'slower' (above it),
    'within CI' (it covers the theory, is at most ``max_width`` wide and excludes 0), or
    'inconclusive' (it covers the theory but is wider, or also covers 0: such an
    interval would cover any theory, or cannot tell that the loss falls at all);
    'n/a' without a theory, 'too few' with fewer than ``MIN_VERDICT_REPLICATES``
    replicates per size."""
    if theory is None:
        return "n/a"
    if replicates < MIN_VERDICT_REPLICATES:
        return "too few"
    if r.ci_high < theory:
        return "faster"
    if r.ci_low > theory:
        return "slower"
    if r.ci_high - r.ci_low > max_width or r.ci_low <= 0 <= r.ci_high:
        return "inconclusive"
    return "within CI"


def by_setting(rows: Sequence[FitRow]) -> tuple[dict[str, dict[int, list[FitRow]]], dict[str, int]]:
    """Rows used for slopes by setting and n, and per setting the count ``left_out``
    rejects."""
    cells: dict[str, dict[int, list[FitRow]]] = defaultdict(lambda: defaultdict(list))
    excluded: dict[str, int] = defaultdict(int)
    for row in rows:
        if left_out(row):
            excluded[row.setting] += 1
        else:
            cells[row.setting][row.n].append(row)
    return cells, excluded


def series(cells: dict[int, list[FitRow]], block: str) -> tuple[list[int], list[np.ndarray]]:
    """One setting's sizes and, per size, its replicates' loss ('total') or block error,
    keeping the sizes whose mean is positive (a log needs it)."""
    ns = sorted(cells)
    losses = [np.array([r.loss if block == "total" else r.blocks[block] for r in cells[n]],
                       dtype=float) for n in ns]
    keep = [i for i, v in enumerate(losses) if np.mean(v) > 0]
    return [ns[i] for i in keep], [losses[i] for i in keep]


def rate_table(study: Study, rows: Sequence[FitRow], n_boot: int = 1000) -> list[dict]:
    """One entry per setting and block ('total' for the whole loss) with slope, interval,
    theory and verdict, and the slopes of log(median loss) and log(10% trimmed mean loss)
    with their intervals (``median_slope``, ``median_ci_low``, ``median_ci_high``;
    ``trimmed_slope`` ...). Fits that ``left_out``
    rejects are left out of every block's slope of their setting, and counted in
    ``excluded``; sizes with a non-positive mean loss are left out too."""
    grouped, excluded = by_setting(rows)
    table = []
    for setting in study.settings:
        cells = grouped.get(setting.name, {})
        ns = sorted(cells)
        if len(ns) < 2:
            continue
        # Blocks every row has (a store resumed across versions may mix block sets).
        common = set.intersection(*(set(r.blocks) for n in ns for r in cells[n]))
        for block in ["total"] + sorted(common):
            kept_ns, kept = series(cells, block)
            if len(kept_ns) < 2:
                continue
            r = rate(kept_ns, kept, n_boot=n_boot)
            med = rate(kept_ns, kept, n_boot=n_boot, statistic="median")
            trim = rate(kept_ns, kept, n_boot=n_boot, statistic="trimmed")
            theory = setting.theory if block == "total" else setting.theory_blocks.get(block)
            replicates = int(np.median([len(v) for v in kept]))
            table.append({"setting": setting.name, "fitted_k": setting.fitted_k,
                          "loss": setting.loss, "block": block, "slope": r.slope,
                          "ci_low": r.ci_low, "ci_high": r.ci_high, "theory": theory,
                          "verdict": verdict(theory, r, min(len(v) for v in kept)),
                          "median_slope": med.slope, "median_ci_low": med.ci_low,
                          "median_ci_high": med.ci_high, "trimmed_slope": trim.slope,
                          "trimmed_ci_low": trim.ci_low, "trimmed_ci_high": trim.ci_high,
                          "sizes": len(kept_ns),
                          "excluded": excluded[setting.name], "replicates": replicates})
    return table
