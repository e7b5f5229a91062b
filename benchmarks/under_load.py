"""gatelab beside other work: the slowdown of EM fits when another process competes for
the cores, against the same fits on the idle machine.

Workloads (the data and starts of em_vs_flexmix.py: the "lambda shape" truth, k = 2,
n = 10,000, starts from random hard labels, tol 1e-6):
  single:  one fit in a warm process (median of repeats);
  batched: 40 replicates as one batched fit (median of repeats; fits per second);
  cold:    `gatelab fit data.csv ...` as a new process, from start to printed result.

Competitors, each started and stopped by this script, one at a time:
  busy loop:        a Python `while True: pass`;
  torch matmul:     a loop of 512 x 512 float32 matmuls with torch's default threads;
  gatelab fit loop: a second process running the single fit in a loop.

Targets (issue 10): <= 2x beside the busy loop; <= 2.5x beside torch or a second gatelab
process. Two processes sharing the cores fairly cost about 2x on a 2-core machine.

Run: .venv/bin/python benchmarks/under_load.py  [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import gatelab  # noqa: F401  (first, as the CLI does: it sets GOMP_SPINCOUNT before torch loads)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from em_vs_flexmix import gatelab_fit, simulate  # noqa: E402

BUSY = "while True:\n    pass\n"
TORCH = ("import torch\na = torch.randn(512, 512)\nprint('ready', flush=True)\n"
         "while True:\n    a = (a @ a).tanh_()\n")
LOADS = {"busy loop": (["-c", BUSY], 2.0), "torch matmul": (["-c", TORCH], 2.5),
         "gatelab fit loop": ([str(Path(__file__).resolve()), "--competitor"], 2.5)}


def competitor_loop() -> None:
    """The second gatelab process: the single fit, forever."""
    x, y, labels = simulate(10_000, 1, seed=0)
    gatelab_fit(x[0], y[0], labels[0], 1e-6)
    print("ready", flush=True)
    while True:
        gatelab_fit(x[0], y[0], labels[0], 1e-6)


def start(args: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, text=True)
    if args[0] != "-c" or "ready" in args[1]:
        proc.stdout.readline()  # wait until its imports are done and it is computing
    time.sleep(0.5)
    return proc


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def write_csv(x, y) -> str:
    f = tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False)
    f.write("x,y\n")
    np.savetxt(f, np.column_stack([x[0, :, 0].numpy(), y[0].numpy()]), delimiter=",", fmt="%.17g")
    f.close()
    return f.name


def measure(data, repeats: int) -> dict[str, float]:
    x, y, labels, csv = data
    cli = [str(Path(sys.executable).with_name("gatelab")), "fit", csv, "--x", "x", "--y", "y",
           "--experts", "2", "--json"]
    return {
        "single": median_time(lambda: gatelab_fit(x[0], y[0], labels[0], 1e-6), 5 * repeats),
        "batched": median_time(lambda: gatelab_fit(x, y, labels, 1e-6), repeats),
        "cold": median_time(lambda: subprocess.run(cli, check=True, capture_output=True),
                            max(3, repeats // 2)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--competitor", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.competitor:
        competitor_loop()
        return 0
    import torch
    print(f"torch {torch.__version__}; {os.cpu_count()} cores; GATELAB_THREADS="
          f"{os.environ.get('GATELAB_THREADS', '(auto)')}; GOMP_SPINCOUNT="
          f"{os.environ.get('GOMP_SPINCOUNT', '(default)')}")
    x, y, labels = simulate(10_000, 40, seed=0)
    data = (x, y, labels, write_csv(x, y))
    gatelab_fit(x, y, labels, 1e-6)  # warm-up
    idle = measure(data, args.repeats)
    print(f"idle: single fit {idle['single'] * 1e3:.1f} ms; 40 replicates batched "
          f"{idle['batched'] * 1e3:.0f} ms ({40 / idle['batched']:.0f} fits/s); "
          f"cold CLI fit {idle['cold']:.2f} s")
    print(f"{'competitor':<18} {'single':>12} {'batched':>12} {'cold CLI':>12}  target")
    all_met = True
    for name, (code, target) in LOADS.items():
        proc = start(code)
        try:
            loaded = measure(data, args.repeats)
        finally:
            proc.kill()
            proc.wait()
        ratios = {k: loaded[k] / idle[k] for k in idle}
        met = max(ratios.values()) <= target
        all_met &= met
        cells = "".join(f" {ratios[k]:>11.2f}x" for k in ("single", "batched", "cold"))
        print(f"{name:<18}{cells}  <= {target}x: {'MET' if met else 'NOT MET'} "
              f"(single {loaded['single'] * 1e3:.1f} ms, batched {loaded['batched'] * 1e3:.0f} ms, "
              f"cold {loaded['cold']:.2f} s)")
    Path(data[3]).unlink()
    print(f"all targets: {'MET' if all_met else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
