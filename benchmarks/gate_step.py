"""The EM gate step for hierarchical and Laplace gates: gatelab's ``gate_update`` (one
Newton system per level and group, closed-form derivatives for Laplace levels) against
the generic step it replaced, autograd Newton over every gate block at once (``newton_ascent``
on the gate's Q, as the test suite's reference does).

Work: the hierarchical-over study's problem shape, 2 groups x 3 experts, responsibilities
from a random smooth assignment, B problems of n samples, 20 Newton steps from the same
start. Printed: seconds, the ratio, and the final Q of each side. With softmax levels Q
is concave, so both must reach the same maximum; a Laplace level's Q is not concave (W
enters through |x - W|, with kinks at the data), so the two paths may stop at different
points: the mean and largest difference of Q (gatelab minus autograd) are printed.

Run: .venv/bin/python benchmarks/gate_step.py [--n 4000] [--problems 16]
"""

from __future__ import annotations

import argparse
import time

import torch

import gatelab as gl
from gatelab.fit.em import gate_q, gate_update
from gatelab.fit.newton import newton_ascent
from gatelab.params import pack, unpack

STEPS = 20


def problem(outer: str, inner: str, n: int, b: int):
    gate = gl.make_gate("hierarchical", outer=outer, inner=inner, n_groups=2, n_inner=3)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(b, n, 1, generator=g, dtype=torch.float64)
    resp = torch.softmax(x * 4 * torch.randn(b, 1, 6, generator=g, dtype=torch.float64)
                         + torch.randn(b, 1, 6, generator=g, dtype=torch.float64)
                         + 0.3 * torch.randn(b, n, 6, generator=g, dtype=torch.float64), -1)
    shapes = gate.param_shapes(6, 1)
    start = gate.normalise({k: 0.3 * torch.randn(b, *v, generator=g, dtype=torch.float64)
                            for k, v in shapes.items()})
    return gate, x, resp, start


def joint_autograd(gate, x, resp, start):
    shapes = gate.param_shapes(6, 1)
    free = pack({k: m.expand(x.shape[0], *m.shape) for k, m in gate.free_mask(6, 1).items()},
                shapes)
    theta, _ = newton_ascent(lambda t: gate_q(gate, x, resp, unpack(t, shapes)),
                             pack(start, shapes), free, STEPS)
    return unpack(theta, shapes)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--problems", type=int, default=16)
    args = parser.parse_args()
    print(f"{STEPS} gate Newton steps, {args.problems} problems x n = {args.n}, 2 groups x 3 experts")
    print(f"{'levels':<8} {'gatelab s':>10} {'autograd s':>11} {'ratio':>7}  {'mean Q diff':>12}  "
          f"{'max |Q diff|':>12}  mean Q (gatelab)")
    for outer, inner in (("softmax", "softmax"), ("softmax", "laplace"), ("laplace", "laplace")):
        gate, x, resp, start = problem(outer, inner, args.n, args.problems)
        mine, t_mine = timed(lambda g=gate, x=x, r=resp, s=start: gate_update(g, 6, x, r, s, STEPS))
        peer, t_peer = timed(lambda g=gate, x=x, r=resp, s=start: joint_autograd(g, x, r, s))
        q_mine, q_peer = gate_q(gate, x, resp, mine), gate_q(gate, x, resp, peer)
        label = outer[0].upper() + inner[0].upper()
        diff = q_mine - q_peer
        print(f"{label:<8} {t_mine:>10.3f} {t_peer:>11.3f} {t_peer / t_mine:>6.1f}x  "
              f"{float(diff.mean()):>12.2e}  {float(diff.abs().max()):>12.2e}  {float(q_mine.mean()):.3f}")


if __name__ == "__main__":
    main()
