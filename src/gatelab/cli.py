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
