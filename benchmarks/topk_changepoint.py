"""The top-1 change-point MLE: gatelab's profile over every split at once (cumulative
sums after one sort, batched over replicates) against the obvious script, which refits
least squares on both sides of every candidate split (numpy lstsq, O(n^2) per data set).

Data: the topk-gaussian truth (lambda shape, top-1 gate, boundary t* = 0.32), R = 4
replicates per n. Both sides score the same splits (min_size samples per side) with the
same heteroscedastic profile likelihood, so they must pick the same boundary: printed are
each side's boundaries, the largest log-likelihood difference, seconds, and the ratio.

Run: .venv/bin/python benchmarks/topk_changepoint.py [--sizes 1000 4000 16000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import gatelab as gl
from gatelab.fit import split_profile

# The peer is the test suite's slow reference (one implementation of "the obvious script").
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import split_by_refitting  # noqa: E402

R, MIN_SIZE = 4, 5
TRUTH = {"beta1": [[25.0], [0.0]], "beta0": [-8.0, 0.0], "a": [[-20.0], [20.0]],
         "b": [15.0, -5.0], "var": [0.09, 0.16]}


def data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    model = gl.GaussianMoE(2, 1, gl.make_gate("topk", top_k=1))
    truth = {k: torch.tensor(v, dtype=torch.float64) for k, v in TRUTH.items()}
    pairs = [model.sample(truth, n, torch.Generator().manual_seed(r)) for r in range(R)]
    return torch.stack([p[0][:, 0] for p in pairs]), torch.stack([p[1] for p in pairs])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"{'n':>7} {'gatelab s':>10} {'script s':>10} {'ratio':>8}  max |dloglik|  boundaries "
          f"(gatelab / script)")
    for n in args.sizes:
        x, y = data(n)
        split_profile(x, y, MIN_SIZE)                       # warm-up
        start = time.perf_counter()
        split = split_profile(x, y, MIN_SIZE)
        ours = time.perf_counter() - start
        start = time.perf_counter()
        peer = [split_by_refitting(x[r].numpy(), y[r].numpy(), MIN_SIZE) for r in range(R)]
        theirs = time.perf_counter() - start
        gap = max(abs(float(split.loglik[r].sum()) - peer[r][0]) for r in range(R))
        bounds = " ".join(f"{float(split.boundary[r]):.5f}/{(peer[r][1] + peer[r][2]) / 2:.5f}"
                          for r in range(R))
        print(f"{n:>7} {ours:>10.4f} {theirs:>10.2f} {theirs / ours:>7.0f}x  {gap:.2e}     {bounds}")


if __name__ == "__main__":
    main()
