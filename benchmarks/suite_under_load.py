"""The test suite's wall time idle and beside one CPU-bound torch process (a loop of
512 x 512 float32 matmuls with torch's default threads, started and stopped here), and
the ten slowest tests of the idle run. Targets (issue 10): idle <= 3 minutes; beside the
torch process <= 2.5x idle. The install is not counted (run `make install` first).

Run: .venv/bin/python benchmarks/suite_under_load.py  [pytest arguments...]
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH = ("import torch\na = torch.randn(512, 512)\nprint('ready', flush=True)\n"
         "while True:\n    a = (a @ a).tanh_()\n")


def suite(extra: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "--durations=10", *extra], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        print(out.stdout[-3000:], out.stderr[-2000:])
        raise SystemExit(f"the suite failed (exit {out.returncode})")
    return seconds, out.stdout


def slowest(report: str) -> list[str]:
    block = report.split("slowest 10 durations", 1)[-1].splitlines()[1:]
    return [line for line in block if re.match(r"^\d+\.\d+s ", line)][:10]


def main() -> int:
    extra = sys.argv[1:]
    idle, report = suite(extra)
    summary = report.strip().splitlines()[-1]
    print(f"idle: {idle:.0f} s ({summary.strip('= ')}); target <= 180 s: "
          f"{'MET' if idle <= 180 else 'NOT MET'}")
    print("ten slowest tests (idle):")
    for line in slowest(report):
        print(f"    {line}")
    load = subprocess.Popen([sys.executable, "-c", TORCH], stdout=subprocess.PIPE, text=True)
    try:
        load.stdout.readline()
        loaded, _ = suite(extra)
    finally:
        load.kill()
        load.wait()
    ratio = loaded / idle
    print(f"beside a torch matmul loop: {loaded:.0f} s, {ratio:.2f}x idle; target <= 2.5x: "
          f"{'MET' if ratio <= 2.5 else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
