"""The ``gatelab`` command line."""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Sequence

from .gates import GATES, example_gate, make_gate


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


def _read_csv(path: str, x_cols: list[str], y_col: str):
    """Columns of a CSV file as float arrays, with errors that name the file and column."""
    import csv

    import numpy as np
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror}") from None
    if not rows:
        raise UsageError(f"{path} is empty; it needs a header row and data rows.")
    header, body = [h.strip() for h in rows[0]], rows[1:]
    missing = [c for c in [*x_cols, y_col] if c not in header]
    if missing:
        raise UsageError(f"{path} has no column(s) {missing}; its columns are {header}.")
    if not body:
        raise UsageError(f"{path} has a header but no data rows.")
    out = {}
    for col in [*x_cols, y_col]:
        j = header.index(col)
        values = []
        for line, row in enumerate(body, start=2):
            cell = row[j].strip() if j < len(row) else ""
            try:
                v = float(cell)
            except ValueError:
                raise UsageError(f"{path}, line {line}, column {col!r}: {cell!r} is not a "
                                 f"number.") from None
            if not np.isfinite(v):
                raise UsageError(f"{path}, line {line}, column {col!r}: {cell!r} is not finite; "
                                 f"remove or impute missing values first.")
            values.append(v)
        out[col] = np.asarray(values)
    return np.column_stack([out[c] for c in x_cols]), out[y_col]


def cmd_fit(args: argparse.Namespace) -> int:
    """Fit a Gaussian MoE to a CSV file and print the estimate."""
    import json
    import time

    from .fit import GaussianMoERegressor
    X, y = _read_csv(args.data, args.x, args.y)
    est = GaussianMoERegressor(args.experts, make_gate(args.gate, **_gate_options(args)),
                               args.expert, n_init=args.n_init, tol=args.tol,
                               max_iter=args.max_iter, random_state=args.seed)
    start = time.perf_counter()
    est.fit(X, y)
    seconds = time.perf_counter() - start
    result = {"loglik": est.loglik_, "n_iter": est.n_iter_, "converged": est.converged_,
              "degenerate": est.degenerate_, "seconds": seconds, "n_samples": len(y),
              "aic": est.aic(X, y), "bic": est.bic(X, y),
              "params": {k: v.tolist() for k, v in est.params_.items()}}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"Gaussian MoE, {args.experts} experts, gate {args.gate}, expert {args.expert}; "
          f"n = {len(y)}")
    print(f"log-likelihood {est.loglik_:.6f}  iterations {est.n_iter_}  converged "
          f"{est.converged_}  {seconds:.3f} s  AIC {result['aic']:.3f}  BIC {result['bic']:.3f}")
    for name, value in est.params_.items():
        print(f"  {name:<6} {value.numpy().round(6).tolist()}")
    return 0


def cmd_studies(args: argparse.Namespace) -> int:
    """List the built-in studies, one line each."""
    from .studies import catalogue
    for name in catalogue.names():
        study = catalogue.get(name)
        print(f"{name:<20} arXiv {study.paper:<11} {study.description}")
    return 0


def _print_rates(table: list[dict]) -> None:
    print(f"{'setting':<22} {'loss':<11} {'block':<7} {'slope':>7}  {'95% CI':<18} "
          f"{'theory':>7}  {'verdict':<10} {'median slope':>12}")
    for r in table:
        theory = "" if r["theory"] is None else f"{r['theory']:+.3f}"
        ci = f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
        note = f" ({r['excluded']} diverged fits left out)" if r["excluded"] else ""
        print(f"{r['setting']:<22} {r['loss']:<11} {r['block']:<7} {r['slope']:+7.3f}  {ci:<18} "
              f"{theory:>7}  {r['verdict']:<10} {r['median_slope']:+12.3f}{note}")


def cmd_reproduce(args: argparse.Namespace) -> int:
    """Run (or resume) a study, then print its rates and where the report is."""
    import json
    from pathlib import Path

    from .studies import Store, catalogue, rate_table, reproduce
    from .studies.report import write_report
    study = catalogue.get(args.name)
    db = Path(args.db or f"runs/{study.name}.sqlite")
    out = Path(args.out or f"runs/{study.name}")
    with Store(db) as store:
        stats = reproduce(study, store, quick=args.quick, workers=args.workers,
                          progress=not args.json, backend=args.backend, address=args.address)
        sizes, reps = study.grid(args.quick)
        rows = [r for r in store.rows(study.name) if r.n in set(sizes) and r.replicate < reps]
        table = rate_table(study, rows)
        report = write_report(study, rows, table, out, stats)
    if args.json:
        print(json.dumps({"study": study.name, "seconds": stats.seconds, "fits": stats.fits,
                          "skipped": stats.skipped, "db": str(db), "report": str(report),
                          "rates": table}))
        return 0
    print(f"{study.name}: {stats.fits} fits run, {stats.skipped} already in {db}, "
          f"{stats.seconds:.1f} s")
    _print_rates(table)
    print(f"report: {report}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Rates and report of every study in a results store."""
    from pathlib import Path

    from .studies import Store, Study, rate_table
    from .studies.report import write_report
    if not Path(args.db).exists():
        raise UsageError(f"{args.db} does not exist; run 'gatelab reproduce NAME --db {args.db}' "
                         f"first.")
    with Store(args.db) as store:
        names = store.studies()
        if not names:
            raise UsageError(f"{args.db} holds no study.")
        for name in names:
            study = Study.from_dict(store.study_spec(name))
            rows = store.rows(name)
            table = rate_table(study, rows)
            out = Path(args.out or Path(args.db).with_suffix("")) / name
            report = write_report(study, rows, table, out, None)
            print(f"{name}: {len(rows)} fits")
            _print_rates(table)
            print(f"report: {report}")
    return 0


def _gate_options(args: argparse.Namespace) -> dict:
    return {} if args.top_k is None else {"top_k": args.top_k}


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
    p = sub.add_parser("fit", help="fit a Gaussian MoE to a CSV file by EM")
    p.add_argument("data", help="CSV file with a header row")
    p.add_argument("--x", action="append", required=True, metavar="COL",
                   help="covariate column (repeat for several)")
    p.add_argument("--y", required=True, metavar="COL", help="response column")
    p.add_argument("--experts", type=int, required=True, help="number of experts k")
    p.add_argument("--gate", default="softmax", help=f"one of: {', '.join(GATES)}")
    p.add_argument("--top-k", type=int, default=None, help="top-K selection for the gate")
    p.add_argument("--expert", default="linear", help="linear, polynomial, ffn or constant")
    p.add_argument("--n-init", type=int, default=5, help="random starts (best kept)")
    p.add_argument("--tol", type=float, default=1e-6, help="relative log-likelihood tolerance")
    p.add_argument("--max-iter", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=cmd_fit)
    p = sub.add_parser("studies", help="list the built-in convergence-rate studies")
    p.set_defaults(run=cmd_studies)
    p = sub.add_parser("reproduce", help="run or resume a study; print rates; write a report")
    p.add_argument("name", help="a built-in study (see 'gatelab studies') or a .toml file")
    p.add_argument("--quick", action="store_true", help="the reduced grid (minutes)")
    p.add_argument("--workers", type=int, default=1, help="local worker processes")
    p.add_argument("--backend", default="local", choices=["local", "ray"],
                   help="local processes, or Ray tasks (pip install 'gatelab[ray]')")
    p.add_argument("--address", help="Ray cluster address (default: a local Ray instance)")
    p.add_argument("--db", help="results store (default runs/NAME.sqlite)")
    p.add_argument("--out", help="report folder (default runs/NAME)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=cmd_reproduce)
    p = sub.add_parser("report", help="rates and reports of the studies in a results store")
    p.add_argument("db", help="a results store written by 'gatelab reproduce'")
    p.add_argument("--out", help="report folder (default: next to the store)")
    p.set_defaults(run=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError) as err:
        print(f"gatelab {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = (" Finished fits are saved in the results store; run the same command again "
                "to resume." if args.command == "reproduce" else "")
        print(f"\ngatelab {args.command}: interrupted.{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
