"""An experiment's results: per (arm, n) the mean of each metric over seeds with its 95% t
interval, a plot of the main metric against n with those intervals per arm, and the HTML
report (claims first, as for the studies)."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..studies.claims import paired_interval
from ..studies.report import _claims_html, finish_report, slug
from ..studies.store import FitRow
from .spec import Experiment

__all__ = ["summary_table", "summary_text", "plot_metric", "write_experiment_report"]


def _metrics(rows: Sequence[FitRow]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r.blocks if k != "seconds"))


def summary_table(exp: Experiment, rows: Sequence[FitRow]) -> list[dict[str, Any]]:
    """One entry per (arm, n, metric): mean over seeds, its 95% t interval, seeds."""
    out = []
    for arm in exp.arms:
        for n in sorted({r.n for r in rows if r.setting == arm.name}):
            mine = [r for r in rows if r.setting == arm.name and r.n == n]
            for metric in _metrics(mine):
                values = [r.blocks[metric] for r in mine if metric in r.blocks]
                entry = {"arm": arm.name, "n": n, "metric": metric, "seeds": len(values),
                         "mean": sum(values) / len(values), "ci_low": None, "ci_high": None}
                if len(values) >= 2:
                    interval = paired_interval(values)  # a one-sample t interval
                    entry["ci_low"], entry["ci_high"] = interval.ci_low, interval.ci_high
                out.append(entry)
    return out


def _ci(e: dict[str, Any]) -> str:
    return "" if e["ci_low"] is None else f"[{e['ci_low']:.2f}, {e['ci_high']:.2f}]"


def summary_text(table: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'arm':<18} {'n':>5} {'metric':<16} {'mean':>8}  {'95% CI':<18} seeds"]
    lines += [f"{e['arm']:<18} {e['n']:>5} {e['metric']:<16} {e['mean']:8.2f}  {_ci(e):<18} {e['seeds']}"
              for e in table]
    return "\n".join(lines)


def plot_metric(exp: Experiment, table: Sequence[dict[str, Any]], metric: str, path: Path) -> Path:
    """``metric`` against n (log axis), one line per arm with its 95% intervals."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, arm in enumerate(exp.arms):
        mine = [e for e in table if e["arm"] == arm.name and e["metric"] == metric]
        if not mine:
            continue
        ns = [e["n"] for e in mine]
        means = [e["mean"] for e in mine]
        low = [e["mean"] - (e["ci_low"] if e["ci_low"] is not None else e["mean"]) for e in mine]
        high = [(e["ci_high"] if e["ci_high"] is not None else e["mean"]) - e["mean"] for e in mine]
        shift = [n * (1 + 0.03 * (i - len(exp.arms) / 2)) for n in ns]  # keep the bars apart
        ax.errorbar(shift, means, yerr=[low, high], marker="o", capsize=3, label=arm.name)
    if len({e["n"] for e in table}) > 1:
        ax.set_xscale("log")
    ax.set_xlabel("n (training size)")
    ax.set_ylabel(metric)
    ax.set_title(f"{exp.name}: {metric}, mean and 95% CI over seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _table_html(table: Sequence[dict[str, Any]]) -> str:
    head = "<tr><th>arm</th><th>n</th><th>metric</th><th>mean</th><th>95% CI</th><th>seeds</th></tr>"
    body = "".join(f"<tr><td>{html.escape(e['arm'])}</td><td>{e['n']}</td><td>{e['metric']}</td>"
                   f"<td>{e['mean']:.2f}</td><td>{_ci(e)}</td><td>{e['seeds']}</td></tr>" for e in table)
    return f"<table>{head}{body}</table>"


def write_experiment_report(exp: Experiment, rows: Sequence[FitRow], table: Sequence[dict[str, Any]],
                            out: Path, stats: Any = None, claims: Sequence[dict] = ()) -> Path:
    """``report.html`` (plots inlined): claims, results, plots, run, specification."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for metric in _metrics(rows):
        png = plot_metric(exp, table, metric, out / f"{slug(metric)}.png")
        images.append((metric, base64.b64encode(png.read_bytes()).decode()))
    run = "" if stats is None else (f"<li>this run: {stats.fits} runs in {stats.seconds:.1f} s "
                                    f"({stats.skipped} already in the store)</li>")
    body = io.StringIO()
    body.write(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(exp.name)}</title>"
               "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
               "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}"
               ".holds-yes{color:#080}.holds-NO{color:#c00;font-weight:bold}"
               "pre{background:#f6f6f6;padding:1em;overflow:auto}</style></head><body>")
    body.write(f"<h1>{html.escape(exp.name)}</h1><p>{html.escape(exp.description)} "
               f"(arXiv {html.escape(exp.paper)})</p>")
    body.write("<h2>Claims</h2><p>Each claim compares two arms seed by seed (the same training "
               "data and minibatch order for both); the interval is the paired 95% t interval. "
               "Rules are written in the experiment's spec before the runs.</p>")
    body.write(_claims_html(claims))
    body.write(f"<pre>{html.escape(exp.notes.strip())}</pre>" if exp.notes else "")
    body.write("<h2>Results</h2><p>Mean over seeds with its 95% t interval.</p>")
    body.write(_table_html(table))
    body.write(f"<h2>Run</h2><ul><li>{len(rows)} runs, {sum(r.seconds for r in rows):.0f} s of "
               f"training and evaluation in all</li>{run}</ul><h2>Plots</h2>")
    return finish_report(body, images, exp.to_dict(), out)
