"""Least-squares fits as gatelab runs them now (the normal equations summed over 32 MB
sample chunks, ``fit.lsq._Problem.normal_equations``, with glibc told to keep freed
blocks, ``_runtime.keep_freed_memory``) against the previous way, the peer: the whole
Jacobian (B, N, P) formed every Levenberg-Marquardt iteration, the allocator left alone
(GATELAB_MALLOPT=0).

A whole-batch Jacobian at a study's largest size is tens to hundreds of MB; allocated
afresh each iteration, the kernel maps and zeroes new pages: 25% of the CPU time of the
cosine-vs-perturbed full grid was in system mode (397 of 1561 s, 203 million page faults).

Each arm fits the same problems (``lsq_jacobian.make``: d = 2, k = 3, R = 8 replicates,
the least-squares studies' gates) from the same starts, in a fresh process (cold: the
allocator has nothing cached), alternating arms; the medians of wall, user and system
seconds are printed with the ratio and the mean RSS / n each arm reached. --busy repeats
everything beside a competing busy process.

    .venv/bin/python benchmarks/lsq_chunks.py [--n 32000] [--repeats 3] [--busy]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from lsq_jacobian import PROBLEMS, make

ARMS = ("chunked, freed memory kept", "whole Jacobian (previous)")


def run_arm(arm: str, problem: str, n: int, threads: int) -> None:
    """One fit in this process; prints wall, user, sys seconds and the mean RSS / n."""
    import torch

    from gatelab.fit import lsq
    torch.set_num_threads(threads)
    if arm == ARMS[1]:
        lsq._CHUNK_ELEMENTS = 1 << 62
    model, _, x, y, init = make(*PROBLEMS[problem], n)
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    res = lsq.fit_lsq(model, x, y, init, tol=1e-10, max_iter=40)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"wall": wall, "user": after.ru_utime - before.ru_utime,
                      "sys": after.ru_stime - before.ru_stime,
                      "rss": float((res.rss / n).mean()), "iters": int(res.n_iter.max())}))


def measure(n: int, repeats: int, threads: int) -> None:
    for problem in PROBLEMS:
        got: dict[str, list[dict]] = {arm: [] for arm in ARMS}
        for _ in range(repeats):
            for arm in ARMS:
                env = {**os.environ, "GATELAB_MALLOPT": "0" if arm == ARMS[1] else "1"}
                out = subprocess.run([sys.executable, __file__, "--arm", arm, "--problem", problem,
                                      "--n", str(n), "--threads", str(threads)],
                                     check=True, capture_output=True, text=True, env=env).stdout
                got[arm].append(json.loads(out.strip().splitlines()[-1]))
        med = {arm: {k: statistics.median(r[k] for r in rows) for k in ("wall", "user", "sys")}
               for arm, rows in got.items()}
        print(f"  {problem} (n = {n}, {got[ARMS[0]][0]['iters']} LM iterations at most):")
        for arm in ARMS:
            m = med[arm]
            print(f"    {arm:<28} wall {m['wall']:6.2f} s  user {m['user']:6.2f} s  "
                  f"sys {m['sys']:6.2f} s  mean RSS/n {got[arm][0]['rss']:.8f}")
        ratio = med[ARMS[1]]["wall"] / med[ARMS[0]]["wall"]
        print(f"    previous / gatelab wall time = {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--busy", action="store_true", help="also measure beside a competing busy process")
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--problem", choices=list(PROBLEMS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        run_arm(args.arm, args.problem, args.n, args.threads)
        return
    print(f"idle, cold processes: medians of {args.repeats}")
    measure(args.n, args.repeats, args.threads)
    if args.busy:
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            print("busy (one competing process)")
            measure(args.n, args.repeats, args.threads)
        finally:
            hog.kill()


if __name__ == "__main__":
    main()
