"""The ``gatelab`` command line."""

from __future__ import annotations

import argparse
import gc
import inspect
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from .experts import EXPERTS
from .gates import GATES, example_gate


def _first_line(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.split("\n\n")[0].split())


def cmd_gates(args: argparse.Namespace) -> int:
    """Print the gate catalogue, one line each."""
    for name in GATES:
        gate = example_gate(name)
        blocks = ", ".join(f"{k}{list(v)}" for k, v in gate.param_shapes(4, 2).items())
        print(f"{name:<19} normaliser={gate.normaliser:<8} blocks (k=4, d=2): {blocks}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    run_demo(n=args.n, replicates=args.replicates, seed=args.seed)
    return 0


class UsageError(ValueError):
    """A bad command line or input file: exit code 2 with a message."""


def _read_csv(path: str, x_cols: list[str], y_col: str | None):
    """Columns of a CSV file as float arrays (X, y), with errors that name the file and
    column; y is None without ``y_col``."""
    import csv

    import numpy as np
    try:
        # utf-8-sig: a byte-order mark (Excel writes one) is not part of the first column name
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror}") from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise UsageError(f"{path} is not a CSV text file ({err}); save it as CSV (UTF-8) with "
                         f"a header row.") from None
    if not rows:
        raise UsageError(f"{path} is empty; it needs a header row and data rows.")
    header, body = [h.strip() for h in rows[0]], rows[1:]
    wanted = [*x_cols, y_col] if y_col is not None else list(x_cols)
    missing = [c for c in wanted if c not in header]
    if missing:
        raise UsageError(f"{path} has no column(s) {missing}; its columns are {header}.")
    if not body:
        raise UsageError(f"{path} has a header but no data rows.")
    out = {}
    for col in wanted:
        j = header.index(col)
        try:  # the fast path; _blame_cell finds the cell to blame
            out[col] = np.array([float(row[j]) for row in body])
        except (ValueError, IndexError):
            _blame_cell(path, body, j, col)
        if not np.isfinite(out[col]).all():
            _blame_cell(path, body, j, col)
    return np.column_stack([out[c] for c in x_cols]), None if y_col is None else out[y_col]


def _blame_cell(path: str, body: list[list[str]], j: int, col: str) -> NoReturn:
    """Raise a UsageError naming the first cell of column ``col`` that is not a finite
    number (line numbers count the header as line 1)."""
    for line, row in enumerate(body, start=2):
        cell = row[j].strip() if j < len(row) else ""
        try:
            v = float(cell)
        except ValueError:
            raise UsageError(f"{path}, line {line}, column {col!r}: {cell!r} is not a "
                             f"number.") from None
        if not math.isfinite(v):
            raise UsageError(f"{path}, line {line}, column {col!r}: {cell!r} is not finite; "
                             f"remove or impute missing values first.")
    raise UsageError(f"{path}: column {col!r} could not be read as numbers.")


def _seconds_since_process_start() -> float | None:
    """Wall time since this process started (10 ms resolution), from /proc; None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def cmd_fit(args: argparse.Namespace) -> int:
    """Fit a Gaussian MoE to a CSV file by EM and print the estimate (see ``cli_fit``)."""
    from .cli_fit import run_fit
    return run_fit(args, lsq=False)


def cmd_fit_lsq(args: argparse.Namespace) -> int:
    """Fit an MoE regression (any gate, sigmoid included) by least squares; as ``fit``."""
    from .cli_fit import run_fit
    return run_fit(args, lsq=True)


def cmd_predict(args: argparse.Namespace) -> int:
    """Predictions of a saved model on new covariates (see ``cli_fit``)."""
    from .cli_fit import run_predict
    return run_predict(args)


def cmd_plot(args: argparse.Namespace) -> int:
    """A PNG of a saved model over data (see ``cli_fit``)."""
    from .cli_fit import run_plot
    return run_plot(args)


def cmd_schema(args: argparse.Namespace) -> int:
    """Print every key of a study file (TOML) with its type, default and meaning."""
    from .studies.spec import schema
    print(schema())
    return 0


def cmd_studies(args: argparse.Namespace) -> int:
    """List the built-in studies and experiments, one line each: name, kind, paper, what."""
    from .studies import catalogue
    for name in catalogue.names():
        study = catalogue.get(name)
        kind = "experiment" if _is_experiment(study) else "study"
        print(f"{name:<20} {kind:<10} arXiv {study.paper:<11} {study.description}")
    return 0


def _print_rates(table: list[dict]) -> None:
    print(f"{'setting':<22} {'loss':<11} {'block':<7} {'slope':>7}  {'95% CI':<18} "
          f"{'theory':>7}  {'verdict':<12} {'median slope':>12} {'trimmed':>8}")
    for r in table:
        theory = "" if r["theory"] is None else f"{r['theory']:+.3f}"
        ci = f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
        note = f" ({r['excluded']} left out)" if r["excluded"] else ""
        print(f"{r['setting']:<22} {r['loss']:<11} {r['block']:<7} {r['slope']:+7.3f}  {ci:<18} "
              f"{theory:>7}  {r['verdict']:<12} {r['median_slope']:+12.3f} {r['trimmed_slope']:+8.3f}{note}")


def _print_claims(claims: list[dict]) -> None:
    if claims:
        from .studies.claims import claims_text
        print("claims (holds, measured x [95% CI], claim and rule):")
        print(claims_text(claims))


def report_dir(db: Path, study: str, out: str | None = None) -> Path:
    """Where a study's report goes: ``out`` or the store's own folder, then a folder named
    after the study (``runs/NAME.sqlite`` -> ``runs/NAME/``). ``reproduce`` and ``report``
    both use it, so the report of a store is found beside it."""
    return Path(out or Path(db).parent) / study


def cmd_reproduce(args: argparse.Namespace) -> int:
    """Run (or resume) a study, then print its rates and where the report is. Progress
    goes to stderr (also with --json, whose object is the only thing on stdout)."""
    import json

    # Everything the end of the run needs is imported now: a long run whose source is edited
    # meanwhile must not reach its claims table with a mix of old and new code.
    from .studies import Store, catalogue, claims, report, reproduce  # noqa: F401
    study = catalogue.get(args.name)
    if _is_experiment(study):
        from .experiments import report as experiment_report  # noqa: F401
    db = Path(args.db or f"runs/{study.name}.sqlite")
    if args.backbone is not None:
        study = _with_backbone(study, args.backbone)
        from .studies.report import slug  # the last part of the backbone's path or hub id
        db = Path(args.db or f"runs/{study.name}@{slug(Path(args.backbone.rstrip('/')).name)}.sqlite")
    new_store = not db.exists()
    try:
        with Store(db) as store:
            stats = reproduce(study, store, quick=args.quick, workers=args.workers,
                              backend=args.backend, address=args.address,
                              overwrite=args.overwrite)
            sizes, reps = study.grid(args.quick)
            rows = [r for r in store.rows(study.name) if r.n in set(sizes) and r.replicate < reps]
            result = _results(study, rows, report_dir(db, study.name, args.out), stats)
    except BaseException:
        if new_store:
            _remove_if_empty(db)
        raise
    if args.json:
        print(json.dumps({"study": study.name, "seconds": stats.seconds, "fits": stats.fits,
                          "skipped": stats.skipped, "db": str(db), **result}))
        return 0
    what = "runs" if _is_experiment(study) else "fits"
    print(f"{study.name}: {stats.fits} {what} run, {stats.skipped} already in {db}, "
          f"{stats.seconds:.1f} s")
    _print_results(result)
    return 0


def _with_backbone(study, backbone: str):
    """The experiment run on another backbone (a folder, a cached hub id, or "minilm")."""
    if not _is_experiment(study):
        raise ValueError(f"--backbone applies to the deep-learning experiments; {study.name!r} is a "
                         "statistics study. Drop --backbone.")
    from .nn.backbone import backbone_path
    backbone_path(backbone)  # a missing or unsupported backbone fails here, with the fix
    return type(study).from_dict({**study.to_dict(), "options": {**study.options, "backbone": backbone}})


def _is_experiment(study) -> bool:
    return getattr(study, "kind", "") == "experiment"


def _results(study, rows: list, out: Path, stats) -> dict:
    """Rates (a study) or per-arm results (an experiment), claims and the HTML report."""
    from .studies.claims import evaluate_claims
    claims = evaluate_claims(study, rows)
    if _is_experiment(study):
        from .experiments.report import summary_table, write_experiment_report
        table = summary_table(study, rows)
        report = write_experiment_report(study, rows, table, out, stats, claims)
        return {"report": str(report), "results": table, "claims": claims}
    from .studies import rate_table
    from .studies.rates import fit_summary
    from .studies.report import write_report
    rates = rate_table(study, rows)
    report = write_report(study, rows, rates, out, stats, claims)
    return {"report": str(report), "summary": fit_summary(rows), "rates": rates, "claims": claims}


def _print_results(result: dict) -> None:
    if "results" in result:
        from .experiments.report import summary_text
        print(summary_text(result["results"]))
    else:
        print(result["summary"])
        _print_rates(result["rates"])
    _print_claims(result["claims"])
    print(f"report: {result['report']}")


def _write_csv(db: str, path: str) -> int:
    """Every fit of the store as one CSV row (``studies.records``), "-" for stdout."""
    import csv

    from .studies import results
    recs = results(db, frame=False)
    columns = list(dict.fromkeys(k for rec in recs for k in rec))
    out = sys.stdout if path == "-" else open(path, "w", newline="")
    try:
        writer = csv.DictWriter(out, columns)
        writer.writeheader()
        writer.writerows(recs)
    finally:
        if out is not sys.stdout:
            out.close()
    if path != "-":
        print(f"{len(recs)} fits written to {path}")
    return 0


def _remove_if_empty(db: Path) -> None:
    """Delete a store this command created if no fit reached it (a run that failed at
    once should not leave an empty store behind)."""
    import sqlite3
    try:
        with sqlite3.connect(db) as conn:
            count = conn.execute("SELECT COUNT(*) FROM fits").fetchone()[0]
    except sqlite3.Error:
        return
    if count == 0:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)


def cmd_report(args: argparse.Namespace) -> int:
    """Rates and report of every study in a results store."""
    from .studies import Store, catalogue
    if not Path(args.db).exists():
        raise UsageError(f"{args.db} does not exist; run 'gatelab reproduce NAME --db {args.db}' "
                         f"first.")
    if args.csv:
        return _write_csv(args.db, args.csv)
    with Store(args.db) as store:
        names = store.studies()
        if not names:
            raise UsageError(f"{args.db} holds no study.")
        for name in names:
            study = catalogue.from_dict(store.study_spec(name) or {})
            rows = store.rows(name)
            print(f"{name}:")
            _print_results(_results(study, rows, report_dir(args.db, name, args.out), None))
    return 0


def _gate_options(args: argparse.Namespace) -> dict:
    """Gate options from the command line, with CLI words for what a gate needs."""
    options = {} if args.top_k is None else {"top_k": args.top_k}
    if args.gate == "topk" and args.top_k is None:
        raise UsageError("--gate topk needs --top-k K (how many experts each sample keeps).")
    if args.gate == "hierarchical":
        if args.n_groups is None or args.n_inner is None:
            raise UsageError("--gate hierarchical needs --n-groups G and --n-inner J "
                             "(G groups of J experts; --experts is then G * J).")
        options |= {"n_groups": args.n_groups, "n_inner": args.n_inner,
                    "outer": args.outer, "inner": args.inner}
    elif args.n_groups is not None or args.n_inner is not None:
        raise UsageError("--n-groups and --n-inner belong to --gate hierarchical.")
    return options


def _experts_arg(text: str) -> list[int]:
    """An argparse type: K, a range K1-K2 or a list K1,K2,... of whole numbers >= 1."""
    try:
        if "-" in text:
            low, high = (int(v) for v in text.split("-"))
            ks = list(range(low, high + 1))
        else:
            ks = [int(v) for v in text.split(",")]
    except ValueError:
        ks = []
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"must be K, K1-K2 or K1,K2,... (whole numbers >= 1); "
                                         f"got {text!r}")
    return sorted(set(ks))


def _add_fit_arguments(p: argparse.ArgumentParser, gates: list[str], tol: float,
                       max_iter: int) -> None:
    p.add_argument("data", help="CSV file with a header row")
    p.add_argument("--x", action="append", required=True, metavar="COL",
                   help="covariate column (repeat for several)")
    p.add_argument("--y", required=True, metavar="COL", help="response column")
    p.add_argument("--experts", type=_experts_arg, metavar="K",
                   help="number of experts; a range 1-5 (or a list 1,2,4) fits each and keeps "
                        "the --select choice (with --gate hierarchical: G * J, the default)")
    p.add_argument("--select", choices=["bic", "aic"], default="bic",
                   help="criterion that chooses among several --experts (default bic)")
    p.add_argument("--gate", default="softmax", choices=gates, metavar="GATE",
                   help=f"one of: {', '.join(gates)}")
    p.add_argument("--top-k", type=_positive_int, default=None, metavar="K",
                   help="experts kept per sample (needed by --gate topk)")
    p.add_argument("--n-groups", type=_positive_int, metavar="G",
                   help="--gate hierarchical: number of groups")
    p.add_argument("--n-inner", type=_positive_int, metavar="J",
                   help="--gate hierarchical: experts per group")
    level_gates = [g for g in gates if g not in ("hierarchical", "topk", "sigmoid")]
    for level in ("outer", "inner"):
        p.add_argument(f"--{level}", default="softmax", choices=level_gates, metavar="GATE",
                       help=f"--gate hierarchical: the {level} level's gate (default softmax)")
    p.add_argument("--expert", default="linear", choices=list(EXPERTS),
                   help="expert family (default linear)")
    p.add_argument("--n-init", type=_positive_int, default=5, help="random starts (best kept)")
    p.add_argument("--tol", type=float, default=tol, help="relative tolerance")
    p.add_argument("--max-iter", type=_positive_int, default=max_iter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--se", action="store_true",
                   help="standard errors and 95%% Wald intervals from the observed information "
                        "(exact-specified fits only: refused where BIC prefers fewer experts)")
    p.add_argument("--save", metavar="FILE", help="write the fitted model as JSON (for "
                                                 "'gatelab predict' and 'gatelab plot')")
    p.add_argument("--plot", metavar="PNG", help="draw the data, expert means and gate weights")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1; got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gatelab", description=_first_line(sys.modules[__package__]))
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("gates", help="list the gate catalogue")
    p.set_defaults(run=cmd_gates)
    p = sub.add_parser("demo", help="self-check: sample every catalogue model and test it "
                                    "against its own density")
    p.add_argument("--n", type=int, default=10_000, help="samples per replicate")
    p.add_argument("--replicates", type=int, default=40, help="replicates, drawn as one batch")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_demo)
    p = sub.add_parser("fit", help="fit a Gaussian MoE to a CSV file by EM (maximum likelihood)",
                       description="Fit a Gaussian MoE by EM. Its gate weights must sum to one; "
                                   "for sigmoid gating use 'gatelab fit-lsq'.")
    _add_fit_arguments(p, [g for g in GATES if g != "sigmoid"], 1e-6, 2000)
    p.add_argument("--gate-ridge", type=float, default=0.0, metavar="LAMBDA",
                   help="penalise linear gate slopes by LAMBDA/2 ||beta1||^2 (default 0: the "
                        "MLE); for data the gate separates")
    p.set_defaults(run=cmd_fit)
    p = sub.add_parser("fit-lsq", help="fit an MoE regression to a CSV file by least squares "
                                       "(any gate, sigmoid included)")
    _add_fit_arguments(p, list(GATES), 1e-8, 500)
    p.set_defaults(run=cmd_fit_lsq)
    p = sub.add_parser("predict", help="predictions of a saved model (--save) on a CSV file")
    p.add_argument("model", help="a model file written by 'gatelab fit ... --save'")
    p.add_argument("data", help="CSV file with the model's covariate columns")
    p.add_argument("--level", type=float, default=0.95, help="predictive interval level")
    p.add_argument("--out", metavar="FILE", help="write the predictions there (default stdout)")
    p.set_defaults(run=cmd_predict)
    p = sub.add_parser("plot", help="draw a saved model over data: expert means, interval, "
                                    "gate weights (PNG)")
    p.add_argument("model", help="a model file written by 'gatelab fit ... --save'")
    p.add_argument("data", help="CSV file with the model's covariate and response columns")
    p.add_argument("--out", metavar="PNG", default="fit.png", help="the picture (default fit.png)")
    p.set_defaults(run=cmd_plot)
    p = sub.add_parser("studies", help="list the built-in convergence-rate studies and deep-learning "
                                       "experiments")
    p.set_defaults(run=cmd_studies)
    p = sub.add_parser("schema", help="every key of a study file, with type, default and meaning")
    p.set_defaults(run=cmd_schema)
    p = sub.add_parser("reproduce", help="run or resume a study; print rates; write a report")
    p.add_argument("name", help="a built-in study (see 'gatelab studies') or a .toml file")
    p.add_argument("--quick", action="store_true", help="the reduced grid (minutes)")
    p.add_argument("--workers", type=_positive_int, default=1,
                   help="local worker processes (at most one per core is used)")
    p.add_argument("--backend", default="local", choices=["local", "ray"],
                   help="local processes, or Ray tasks (pip install 'gatelab[ray]')")
    p.add_argument("--address", help="Ray cluster address (default: a local Ray instance)")
    p.add_argument("--db", help="results store (default runs/NAME.sqlite)")
    p.add_argument("--out", help="folder for the report (default: the store's folder); it "
                                 "goes in OUT/NAME/")
    p.add_argument("--overwrite", action="store_true",
                   help="recompute the fits of settings whose spec changed since they were "
                        "stored (without it such a store is refused)")
    p.add_argument("--backbone", help="experiments only: the pre-trained model, a saved folder or a hub id "
                                      "in the local Hugging Face cache (default: the bundled MiniLM); "
                                      "its rows go to runs/NAME@BACKBONE.sqlite unless --db is given")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=cmd_reproduce)
    p = sub.add_parser("report", help="rates and reports of the studies in a results store")
    p.add_argument("db", help="a results store written by 'gatelab reproduce'")
    p.add_argument("--csv", metavar="FILE", help="write every fit (losses, block errors, "
                                                "estimates) as one CSV row instead; - for stdout")
    p.add_argument("--out", help="folder for the reports (default: the store's folder); each "
                                 "study's goes in OUT/NAME/")
    p.set_defaults(run=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"gatelab {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = (" Finished fits are saved in the results store; run the same command again "
                "to resume." if args.command == "reproduce" else "")
        print(f"\ngatelab {args.command}: interrupted.{hint}", file=sys.stderr)
        return 130


# Commands that leave nothing open behind them (no store, no pool, no Ray): they may end
# the process at once. Tearing torch down at a normal exit takes about 0.3 s, a quarter
# of a command-line fit from start to finish.
_FAST_EXIT = ("fit", "fit-lsq", "predict", "plot", "gates", "studies", "schema")


def run() -> None:
    """The ``gatelab`` console script: ``main`` and exit with its code."""
    argv = sys.argv[1:]
    # torch's import leaves about a million objects for the garbage collector to walk
    # again at every full collection (parsing a 10,000-row CSV took 57 ms instead of 5).
    # In this process they live to the end, so take them out of its view; ``main``
    # itself leaves the collector alone, for callers that go on running.
    gc.freeze()
    try:
        code = main(argv)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader left (e.g. `| head`): not worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    if argv and argv[0] in _FAST_EXIT:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
