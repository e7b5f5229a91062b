"""The expanded Laplace distance ||x - W_i|| of deep layers, forward and backward: gatelab's
written-out gradient (``gates._ExpandedDistance``) against autograd through the same
formula (sqrt of ||x||^2 - 2 x.W + ||W||^2, clamped), the peer it replaced.

Sizes: a prefix gate of ``benchmarks/prefix_step.py`` (12 heads x 2,048 queries, 10 prefix
rows, head size 32) and a FuseMoE router of ``benchmarks/fusion_layer.py`` (4,096 tokens,
d = 256, 16 experts). Both arms get the same inputs and upstream gradient; their results
are compared before timing. Medians of round-robin repeats; --busy repeats the
measurement beside a Python busy loop.

    .venv/bin/python benchmarks/laplace_distance.py [--repeats 41] [--threads 2] [--busy]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

import gatelab  # noqa: F401  (first, as the CLI does)
from gatelab.gates import _ExpandedDistance, _sq_dist

SIZES = {"prefix gate (12 x 2048 x 10, D 32)": ((12, 2048, 32), (12, 10, 32)),
         "router (4096 x 16, d 256)": ((4096, 256), (16, 256))}


def autograd_distance(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    sq = _sq_dist(x, w, expanded=True)
    return sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt()


def step(fn, x, w, grad) -> float:
    start = time.perf_counter()
    torch.autograd.backward(fn(x, w), grad)
    return time.perf_counter() - start


def measure(repeats: int) -> None:
    for label, (xs, ws) in SIZES.items():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(xs, generator=g).requires_grad_(True)
        w = torch.randn(ws, generator=g).requires_grad_(True)
        out = autograd_distance(x, w)
        grad = torch.randn(out.shape, generator=g)
        got = torch.autograd.grad(_ExpandedDistance.apply(x, w), (x, w), grad)
        want = torch.autograd.grad(out, (x, w), grad)
        err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, want))
        arms = {"gatelab (written-out gradient)": _ExpandedDistance.apply,
                "autograd, same formula": autograd_distance}
        times: dict[str, list[float]] = {k: [] for k in arms}
        for fn in arms.values():
            step(fn, x, w, grad)
        for _ in range(repeats):
            for name, fn in arms.items():
                x.grad = w.grad = None
                times[name].append(step(fn, x, w, grad))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"  {label}: gradients agree to {err:.1e} (relative)")
        for name, s in med.items():
            print(f"    {name:<32} {s * 1e3:8.2f} ms")
        ratio = med["autograd, same formula"] / med["gatelab (written-out gradient)"]
        print(f"    autograd / gatelab = {ratio:.2f}x (target > 1: {'MET' if ratio > 1 else 'NOT MET'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--busy", action="store_true", help="also measure beside a competing busy process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("idle: forward + backward, median")
    measure(args.repeats)
    if args.busy:
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            print("busy (one competing process): forward + backward, median")
            measure(args.repeats)
        finally:
            hog.kill()


if __name__ == "__main__":
    main()
