"""Study outputs: log-log plots (PNG) and one self-contained HTML report per study."""

from __future__ import annotations

import base64
import html
import io
import json
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from .claims import measured, verdict_word
from .rates import (
    MIN_VERDICT_REPLICATES,
    certificates,
    fit_summary,
    left_out,
    runoff_fractions,
    slope,
)
from .spec import Study
from .store import FitRow

__all__ = ["plot_setting", "write_report", "slug"]


def _series(rows: Sequence[FitRow], block: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, mean, standard error) of one block's losses by n, over the fits the slopes use
    (``rates.left_out``)."""
    by_n: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        if not left_out(r):
            by_n[r.n].append(r.loss if block == "total" else r.blocks[block])
    ns = np.array(sorted(n for n, v in by_n.items() if np.mean(v) > 0))
    means = np.array([np.mean(by_n[n]) for n in ns])
    ses = np.array([np.std(by_n[n]) / np.sqrt(len(by_n[n])) for n in ns])
    return ns, means, ses


#: Panels per row of a setting's figure: three fit the report's page width.
PANELS_PER_ROW = 3


def plot_setting(study: Study, setting_name: str, rows: Sequence[FitRow], path: Path) -> Path:
    """One PNG: the total loss and each block's error against n, log-log, with the fitted
    line (solid) and the theoretical slope (dashed) through the first point; panels wrap
    in rows of ``PANELS_PER_ROW``; the bars are one standard error over replicates."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    setting = next(s for s in study.settings if s.name == setting_name)
    blocks = ["total"] + sorted(rows[0].blocks) if rows else ["total"]
    ncols = min(PANELS_PER_ROW, len(blocks))
    nrows = -(-len(blocks) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.9 * nrows), squeeze=False)
    for ax in axes.flat[len(blocks):]:
        ax.set_visible(False)
    for ax, block in zip(axes.flat, blocks):
        ns, means, ses = _series(rows, block)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{setting.loss if block == 'total' else block}", fontsize=10)
        ax.set_xlabel("n", fontsize=8)
        ax.set_ylabel("mean loss" if block == "total" else "mean error", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on log axes
        if len(ns) < 2:
            continue
        lower = np.minimum(ses, means * 0.999)
        ax.errorbar(ns, means, yerr=[lower, ses], fmt="o", ms=3, capsize=2, color="C0")
        fitted = float(slope(ns, means))
        logn = np.log(ns)
        intercept = np.log(means).mean() - fitted * logn.mean()
        ax.plot(ns, np.exp(intercept + fitted * logn), "-", color="C0", label=f"fit {fitted:+.2f}")
        theory = setting.theory if block == "total" else setting.theory_blocks.get(block)
        if theory is not None:
            ax.plot(ns, means[0] * (ns / ns[0]) ** theory, "--", color="C3",
                    label=f"theory {theory:+.2f}")
        ax.legend(fontsize=8)
    fig.suptitle(f"{study.name}: {setting_name} (bars: 1 standard error over replicates)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _table_html(table: list[dict]) -> str:
    head = ("<tr><th>setting</th><th>k</th><th>loss</th><th>block</th><th>slope</th>"
            "<th>95% CI</th><th>theory</th><th>verdict</th><th>median slope</th>"
            "<th>median 95% CI</th><th>10% trimmed slope</th><th>trimmed 95% CI</th><th>left out</th></tr>")
    rows = []
    for r in table:
        theory = "" if r["theory"] is None else f"{r['theory']:+.3f}"
        rows.append(f"<tr><td>{html.escape(r['setting'])}</td><td>{r['fitted_k']}</td>"
                    f"<td>{r['loss']}</td><td>{r['block']}</td><td>{r['slope']:+.3f}</td>"
                    f"<td>[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]</td><td>{theory}</td>"
                    f"<td class='{r['verdict'].replace(' ', '-')}'>{r['verdict']}</td>"
                    f"<td>{r['median_slope']:+.3f}</td>"
                    f"<td>[{r['median_ci_low']:+.3f}, {r['median_ci_high']:+.3f}]</td>"
                    f"<td>{r['trimmed_slope']:+.3f}</td>"
                    f"<td>[{r['trimmed_ci_low']:+.3f}, {r['trimmed_ci_high']:+.3f}]</td>"
                    f"<td>{r['excluded']}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _losses_html(study: Study) -> str:
    """Each setting's loss and where its exponents come from (``Study.loss_source``)."""
    items = "".join(f"<li>{html.escape(s.name)}: {html.escape(study.loss_source(s))}</li>"
                    for s in study.settings)
    return f"<h3>Losses</h3><ul>{items}</ul>"


def _runoff_html(fractions: dict[str, dict[int, float]]) -> str:
    """Per setting, the fraction of fits whose gate ran off (status separated) at each n."""
    ns = sorted({n for by_n in fractions.values() for n in by_n})
    head = "<tr><th>run-off fraction</th>" + "".join(f"<th>n={n}</th>" for n in ns) + "</tr>"
    rows = "".join(f"<tr><td>{html.escape(s)}</td>"
                   + "".join(f"<td>{by_n[n]:.2f}</td>" if n in by_n else "<td></td>" for n in ns) + "</tr>"
                   for s, by_n in fractions.items())
    return f"<h3>Fits whose gate parameters ran off</h3><table>{head}{rows}</table>"


def _reading(study: Study) -> str:
    if study.reading == "certified":
        bound = study.estimator.get("grad_bound", 1e-6)
        return (f"certified (fits polished until the per-sample gradient norm is at most "
                f"{bound:g}).")
    return "protocol (the estimator's own stopping rule)."


def _certificates_html(rows: Sequence[FitRow]) -> str:
    """The certified reading's certificates per setting and n (empty for the protocol)."""
    table = certificates(rows)
    if not table:
        return ""
    head = ("<tr><th>setting</th><th>n</th><th>certified</th><th>median gradient norm</th>"
            "<th>median log-likelihood gain over EM's stop</th></tr>")
    body = "".join(f"<tr><td>{html.escape(s)}</td><td>{n}</td><td>{c.certified:.2f}</td>"
                   f"<td>{c.grad_norm:.2e}</td><td>{c.gain:.3g}</td></tr>"
                   for s, by_n in table.items() for n, c in by_n.items())
    return ("<h3>Certificates (reading: certified)</h3><p>Each fit was polished by Newton steps "
            "on every parameter until the gradient norm of the per-sample log-likelihood was at "
            "most the study's grad_bound; fits still above it are 'not certified' and left out "
            f"of the slopes.</p><table>{head}{body}</table>")


def _claims_html(claims: Sequence[dict]) -> str:
    """The claims table: whether each holds (plainly NO where it does not), its numbers
    and the rule that decided it."""
    if not claims:
        return "<p>This study states no claims.</p>"
    head = "<tr><th>holds</th><th>claim</th><th>arXiv</th><th>measured</th><th>rule</th></tr>"
    rows = []
    for c in claims:
        word = verdict_word(c)
        rows.append(f"<tr><td class='holds-{word}'>{word}</td><td>{html.escape(c['claim'])}</td>"
                    f"<td>{html.escape(c['arxiv'])}</td><td>{measured(c['numbers'])}</td>"
                    f"<td>{html.escape(c['rule'])}{_borrowed_words(c)}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _borrowed_words(claim: dict) -> str:
    loss = claim.get("borrowed_loss")
    return f"; loss borrowed: {html.escape(loss)}" if loss else ""


def write_report(study: Study, rows: Sequence[FitRow], table: list[dict], out: Path,
                 stats=None, claims: Sequence[dict] = ()) -> Path:
    """Write the plots and ``report.html`` (plots inlined, so the file stands alone): the
    claims table first, then rates, run statistics, plots and the specification."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for setting in study.settings:
        mine = [r for r in rows if r.setting == setting.name]
        if not mine:
            continue
        png = plot_setting(study, setting.name, mine, out / f"{slug(setting.name)}.png")
        images.append((setting.name, base64.b64encode(png.read_bytes()).decode()))
    fit_seconds = sum(r.seconds for r in rows)
    run = "" if stats is None else (f"<li>this run: {stats.fits} fits in {stats.seconds:.1f} s "
                                    f"({stats.skipped} already in the store)</li>")
    body = io.StringIO()
    body.write(f"<!doctype html><html><head><meta charset='utf-8'><title>{study.name}</title>"
               "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
               "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}"
               ".faster{color:#06c}.slower{color:#c60}.within-CI{color:#080}"
               ".holds-yes{color:#080}.holds-NO{color:#c00;font-weight:bold}.holds-inconclusive{color:#b60}.holds-pre-asymptotic{color:#b60}"
               "pre{background:#f6f6f6;padding:1em;overflow:auto}</style></head><body>")
    body.write(f"<h1>{html.escape(study.name)}</h1><p>{html.escape(study.description)} "
               f"(arXiv {html.escape(study.paper)})</p><p>Reading: {_reading(study)}</p>")
    body.write("<h2>Claims</h2><p>Each claim is decided by its rule, written in the study's "
               "spec before the runs; the 95% intervals are bootstrap intervals over "
               "replicates. A claim is 'pre-asymptotic' where its number still moves with n: "
               "over the larger half of the sizes it differs from the smaller half's by 0.1 "
               "or more (95% interval of the difference excluding 0).</p>")
    body.write(_claims_html(claims))
    body.write(f"<pre>{html.escape(study.notes.strip())}</pre>" if study.notes else "")
    body.write("<h2>Rates</h2><p>Slope of log(mean loss over replicates) against log(n), "
               "95% bootstrap interval over replicates; the verdict compares it with the "
               "theoretical slope. The median slope fits log(median loss) instead, and the trimmed "
               "slope log(10% trimmed mean loss): they are the robust readings where a few "
               "replicates have huge losses (over-specified fits), and the run-off table below says "
               "how often fits' gate parameters ran off at each n. A verdict is 'inconclusive' where "
               "the interval covers the theory but is wider than 0.3 or also covers 0. "
               "Fits whose gate separated the data (no finite maximum likelihood estimate "
               "exists) or whose loss is not finite are left out of every slope of their "
               "setting and counted (column 'left out'). A verdict needs at least "
               f"{MIN_VERDICT_REPLICATES} replicates per size.</p>")
    body.write(_table_html(table))
    body.write(_losses_html(study))
    body.write(_runoff_html(runoff_fractions(rows)))
    body.write(_certificates_html(rows))
    body.write("<h2>Run</h2><ul>"
               f"<li>{html.escape(fit_summary(rows))} (statuses: see gatelab.fit.status)</li>"
               f"<li>{fit_seconds:.1f} s of fitting in all</li>{run}</ul>")
    body.write("<h2>Plots</h2>")
    return finish_report(body, images, study.to_dict(), out)


def finish_report(body: io.StringIO, images: Sequence[tuple[str, str]], spec: dict, out: Path) -> Path:
    """Append the inlined plots (name, base64 PNG) and the specification, and write
    ``out/report.html``; shared by the study and experiment reports."""
    for name, data in images:
        body.write(f"<h3>{html.escape(name)}</h3><img src='data:image/png;base64,{data}'>")
    body.write(f"<h2>Specification</h2><pre>{html.escape(json.dumps(spec, indent=2))}"
               "</pre></body></html>")
    path = out / "report.html"
    path.write_text(body.getvalue())
    return path


def slug(text: str) -> str:
    """A file-name-safe, lower-case form of ``text`` (other characters become "-")."""
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower()
