"""The fused E-step's own exp (``exp4`` in ``fit/_fused.c``: AVX2 intrinsics, inlined)
against glibc's vector exp that gcc called before (the same source compiled with
-DGATELAB_LIBM_EXP), on the E-steps of the softmax-gaussian study.

Work: the study's truth, 40 data sets of n samples x 5 parameter sets each (near-truth,
the protocol's starts), fitted k = 3 and 4: one E-step over all 200 problems (statistics
and log-likelihood), timed as the median of repeats; then a slice of the paper grid
(every K-th of its 200 sizes, all three settings, reading (a)) timed whole. Each arm runs
in its own cold process with its own compiled library (GATELAB_CFLAGS, GATELAB_CACHE),
one after the other; printed: each arm's times, the ratio, and each arm's summed
log-likelihoods (they agree to rounding: the exps agree to 1 ulp). --busy repeats both
arms beside a competing busy process.

Run: .venv/bin/python benchmarks/estep_exp.py [--n 20000] [--every 40] [--busy]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

BASE_FLAGS = "-O3 -march=native -ffast-math -fopenmp -fPIC"

_CHILD = r"""
import json, statistics, sys, tempfile, time, torch
from gatelab.fit.init import near_truth_starts
from gatelab.fit.em import broadcast_problem
from gatelab.fit.em.softmax_linear import SoftmaxLinearKernel
from gatelab.studies import Store, Study, catalogue, reproduce

n, every = int(sys.argv[1]), int(sys.argv[2])
study = catalogue.get("softmax-gaussian")
out = {}
for setting in study.settings[1:]:
    truth_model, truth = study.truth_model(setting), study.truth_params(setting, n)
    model = study.fitted_model(setting)
    g = torch.Generator().manual_seed(0)
    xs, ys, starts = [], [], []
    for _ in range(40):
        x, y = truth_model.sample(truth, n, g)
        xs.append(x); ys.append(y)
        starts.append(near_truth_starts(model, truth, n, 5, g))
    init = {k: torch.stack([s[k] for s in starts], 1) for k in starts[0]}
    x, y, params, _ = broadcast_problem(model, torch.stack(xs), torch.stack(ys), model.normalise(init))
    kernel = SoftmaxLinearKernel.build(model, x, y, 1e-8 * y.var(-1))
    assert kernel.fused
    kernel.e_step(params)
    times = []
    for _ in range(5):
        t = time.perf_counter(); ll, _ = kernel.e_step(params); times.append(time.perf_counter() - t)
    out[f"k={model.n_experts}"] = {"seconds": statistics.median(times), "loglik": float(ll.sum())}
sizes = list(study.sizes[::every])
spec = {**study.to_dict(), "name": "slice", "sizes": sizes, "claims": []}
with tempfile.TemporaryDirectory() as tmp, Store(f"{tmp}/s.db") as store:
    t = time.perf_counter()
    reproduce(Study.from_dict(spec), store, workers=1, progress=False)
    grid = time.perf_counter() - t
    rows = store.rows("slice")
out["grid"] = {"seconds": grid, "loglik": sum(r.loglik for r in rows)}
print(json.dumps(out))
"""


def run_arm(libm: bool, n: int, every: int) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "GATELAB_CACHE": cache,
               "GATELAB_CFLAGS": BASE_FLAGS + (" -DGATELAB_LIBM_EXP" if libm else "")}
        done = subprocess.run([sys.executable, "-c", _CHILD, str(n), str(every)], env=env,
                              check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(n: int, every: int) -> None:
    mine, libm = run_arm(False, n, every), run_arm(True, n, every)
    for key in mine:
        what = "one E-step, 200 problems" if key != "grid" else f"grid slice (every {every}th size)"
        print(f"  {key:5s} {what:34s} inline exp {mine[key]['seconds']:8.3f} s   glibc exp "
              f"{libm[key]['seconds']:8.3f} s   ratio {libm[key]['seconds'] / mine[key]['seconds']:.2f}x   "
              f"loglik {mine[key]['loglik']:.6f} vs {libm[key]['loglik']:.6f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--every", type=int, default=40, help="grid slice: every K-th size")
    parser.add_argument("--busy", action="store_true", help="also measure beside a busy process")
    args = parser.parse_args()
    print(f"fused E-step, n = {args.n}; threads: gatelab's policy in each arm (GATELAB_THREADS sets them)")
    print("idle:")
    measure(args.n, args.every)
    if args.busy:
        busy = subprocess.Popen([sys.executable, "-c", "while True:\n    pass\n"])
        try:
            print("beside a busy process:")
            measure(args.n, args.every)
        finally:
            busy.kill()


if __name__ == "__main__":
    main()
