"""What the C kernel (``fit/_fused.c``) buys over the same steps in PyTorch, on the work
the studies do: a slice of the softmax-gaussian full grid (every K-th of its 200 sizes,
1e2 to 1e5, 40 replicates, exact k = 2 and over-specified k = 3, 4 with 5 near-truth
starts and SQUAREM), and the single fits of ``em_vs_flexmix.py`` part (a) (one data set,
n = 1e4, k = 2, plain EM) and a 40-replicate batch. Each engine runs in its own cold
process (``GATELAB_FUSED=1`` or ``0``; the choice is read when the kernel first loads),
idle, one after the other, and the rows of the two runs are compared.

The decision rule of issue 12: keep the C path only if it buys at least 1.5x on the grid.

Run: .venv/bin/python benchmarks/fused_vs_tensor.py [--every 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

THRESHOLD = 1.5

_CHILD = r"""
import json, sys, time, torch
from gatelab.studies import Store, Study, catalogue, reproduce
from gatelab.fit import fit_em, near_truth, select_best
from gatelab.demo import reference_truth
every, db = int(sys.argv[1]), sys.argv[2]
study = catalogue.get("softmax-gaussian")
sizes = list(study.sizes[::every])
if sizes[-1] != study.sizes[-1]:
    sizes.append(study.sizes[-1])
sliced = Study.from_dict({**study.to_dict(), "name": "grid-slice", "sizes": sizes})
with Store(db) as store:
    start = time.perf_counter()
    reproduce(sliced, store, progress=False)
    grid = time.perf_counter() - start
model, truth = reference_truth()
x, y = model.sample(truth, n=10_000, generator=torch.Generator().manual_seed(0))
init = near_truth(model, truth, 10_000, 1, generator=torch.Generator().manual_seed(1))
fit_em(model, x, y, init)                      # warm (compiles or loads the kernel once)
single = []
for _ in range(20):
    t = time.perf_counter(); fit_em(model, x, y, init); single.append(time.perf_counter() - t)
xb, yb = model.sample(truth, n=10_000, generator=torch.Generator().manual_seed(2), replicates=40)
initb = near_truth(model, truth, 10_000, 1, 40, generator=torch.Generator().manual_seed(3))
batch = []
for _ in range(5):
    t = time.perf_counter(); fit_em(model, xb, yb, initb); batch.append(time.perf_counter() - t)
from gatelab.fit import _fused
print(json.dumps({"grid": grid, "single": sorted(single)[len(single) // 2],
                  "batch": sorted(batch)[len(batch) // 2], "fused": _fused.load() is not None}))
"""


def _run(engine: str, every: int, db: Path) -> dict:
    env = {**os.environ, "GATELAB_FUSED": engine}
    out = subprocess.run([sys.executable, "-c", _CHILD, str(every), str(db)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _differences(db_a: Path, db_b: Path) -> dict[str, tuple[int, int, float]]:
    """Per setting: (rows, rows whose loss differs by more than 1e-6 relative, the largest
    relative difference) between the two engines' stores."""
    from gatelab.studies import Store
    with Store(db_a) as a, Store(db_b) as b:
        ra = {(r.setting, r.n, r.replicate): r.loss for r in a.rows("grid-slice")}
        rb = {(r.setting, r.n, r.replicate): r.loss for r in b.rows("grid-slice")}
    out: dict[str, tuple[int, int, float]] = {}
    for key, loss in ra.items():
        rel = 0.0 if loss == rb[key] else abs(loss - rb[key]) / max(abs(loss), abs(rb[key]), 1e-300)
        rows, apart, worst = out.get(key[0], (0, 0, 0.0))
        out[key[0]] = (rows + 1, apart + (rel > 1e-6), max(worst, rel))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--every", type=int, default=20, help="run every K-th grid size")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dbs = {e: Path(tmp) / f"{e}.sqlite" for e in ("1", "0")}
        c, t = _run("1", args.every, dbs["1"]), _run("0", args.every, dbs["0"])
        if not c["fused"]:
            print("The C kernel did not load (no compiler?): nothing to compare.")
            return
        diffs = _differences(dbs["1"], dbs["0"])
    print(f"softmax-gaussian grid slice (every {args.every}th size), idle, cold processes:")
    for key, what in (("grid", "grid slice"), ("single", "single fit n=1e4 k=2 (median of 20)"),
                      ("batch", "40 replicates batched (median of 5)")):
        print(f"  {what:<40} C {c[key]:8.3f} s   PyTorch {t[key]:8.3f} s   "
              f"ratio {t[key] / c[key]:5.2f}x")
    for setting, (rows, apart, worst) in diffs.items():
        print(f"  {setting:<20} {apart}/{rows} rows whose loss differs between the engines by "
              f"more than 1e-6 (largest relative difference {worst:.1e})")
    ratio = t["grid"] / c["grid"]
    verdict = "MET: keep the C path" if ratio >= THRESHOLD else "NOT MET: delete the C path"
    print(f"grid ratio {ratio:.2f}x against the {THRESHOLD}x rule: {verdict}")


if __name__ == "__main__":
    main()
