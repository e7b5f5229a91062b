"""The ``gatelab`` command line."""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Sequence

from .gates import GATES, make_gate


def _first_line(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.split("\n\n")[0].split())


def cmd_gates(args: argparse.Namespace) -> int:
    """Print the gate catalogue, one line each."""
    for name in GATES:
        gate = make_gate(name, **({"top_k": 1} if name == "topk" else {}))
        blocks = ", ".join(f"{k}{list(v)}" for k, v in gate.param_shapes(3, 2).items())
        print(f"{name:<19} normaliser={gate.normaliser:<8} blocks (k=3, d=2): {blocks}")
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


def _gate_options(args: argparse.Namespace) -> dict:
    return {} if args.top_k is None else {"top_k": args.top_k}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gatelab", description=_first_line(sys.modules[__package__]))
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("gates", help="list the gate catalogue")
    p.set_defaults(run=cmd_gates)
    p = sub.add_parser("demo", help="sample every catalogue model and check it against its density")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError) as err:
        print(f"gatelab {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
