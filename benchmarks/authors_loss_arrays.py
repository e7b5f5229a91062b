"""The authors' saved loss arrays of arXiv 2305.03288 beside gatelab's slopes on their grid.

The CRPE-SGaME repository (Trung-TinNGUYEN/CRPE-SGaME) keeps the losses behind the paper's
figure in results_SGaME/*_loss.npy: (200 sizes, 40 replicates) per k. Their grid is a
linear one, not log-spaced: k = 2 takes linspace(100, 900, 5) then linspace(1000, 1e5,
195); k = 3, 4 take linspace(1e4, 1e5, 200) (their plotting script, MODELS.md section 6).
Their slope is OLS of log(mean loss over replicates) on log(n), all sizes (n0 = 0).

This script prints, per k: the authors' slope (their formula, on their array), the same
array's mean / median / 10% trimmed slopes with gatelab's bootstrap intervals, and, with
--run, gatelab's protocol fits of softmax-gaussian on the same grid (every --thin-th size,
same replicates, their fixed design x = linspace(0, 1, n)), and with --certified the
certified reading as well.

Get the arrays (they are not committed here) with ``git -C MIRROR show HEAD:results_SGaME/
FILE > FILE`` for each of FILES into a folder (--folder), or pass --mirror with the path
of a fetched snapshot (a bare git directory), as below.

    python benchmarks/authors_loss_arrays.py --mirror /work/.mirror/Trung-TinNGUYEN+CRPE-SGaME/repo
    python benchmarks/authors_loss_arrays.py --mirror ... --run --thin 10
"""

from __future__ import annotations

import argparse
import io
import subprocess
import time
from pathlib import Path

import numpy as np

FILES = {2: "result_model1_K2_ns_min100_ns_max100000_n_num200_rep40_ntries1_loss.npy",
         3: "result_model1_K3_ns_min10000_ns_max100000_n_num200_rep40_ntries5_loss.npy",
         4: "result_model1_K4_ns_min10000_ns_max100000_n_num200_rep40_ntries5_loss.npy"}


def authors_grid(k: int) -> np.ndarray:
    """The sizes of the authors' arrays (their plotting script's ns)."""
    if k == 2:
        return np.concatenate([np.linspace(100, 900, 5), np.linspace(1000, 100000, 195)])
    return np.linspace(10000, 100000, 200)


def load(k: int, folder: Path | None, mirror: Path | None) -> np.ndarray:
    if folder is not None:
        return np.load(folder / FILES[k])
    assert mirror is not None
    blob = subprocess.run(["git", "-C", str(mirror), "show", f"HEAD:results_SGaME/{FILES[k]}"],
                          capture_output=True, check=True).stdout
    return np.load(io.BytesIO(blob))


def slopes(ns: np.ndarray, losses: np.ndarray) -> dict[str, tuple[float, float, float]]:
    """Mean, median and trimmed slopes with 95% bootstrap intervals (gatelab.studies.rates)."""
    from gatelab.studies.rates import rate
    return {stat: tuple(rate(list(ns), list(losses), n_boot=500, statistic=stat))
            for stat in ("mean", "median", "trimmed")}


def authors_slope(ns: np.ndarray, losses: np.ndarray) -> float:
    """Their formula: OLS of log(mean over replicates) on log(n), with an intercept."""
    x = np.column_stack([np.ones(len(ns)), np.log(ns)])
    y = np.log(losses.mean(axis=1))
    return float(np.linalg.lstsq(x, y, rcond=None)[0][1])


def ours(k: int, sizes: list[int], replicates: int, certified: bool, db: Path) -> np.ndarray:
    """gatelab's losses (sizes, replicates) for softmax-gaussian's k setting on ``sizes``."""
    from gatelab.studies import Store, Study, catalogue, reproduce
    name = "softmax-gaussian-certified" if certified else "softmax-gaussian"
    spec = catalogue.get(name).to_dict()
    spec.update(name=f"{name}-authors-grid", sizes=sizes, replicates=replicates, claims=[])
    # their fixed design x = linspace(0, 1, n), not uniform draws
    spec["truth"]["covariates"] = {"kind": "grid", "low": 0.0, "high": 1.0}
    spec["settings"] = [s for s in spec["settings"] if s["fitted_k"] == k]
    study = Study.from_dict(spec)
    with Store(db) as store:
        reproduce(study, store, progress=True)
        rows = store.rows(study.name)
    by_n: dict[int, list[float]] = {}
    for r in rows:
        by_n.setdefault(r.n, []).append(r.loss)
    return np.array([by_n[n] for n in sizes])


def show(label: str, ns, losses) -> None:
    parts = [f"{stat} {s:+.3f} [{lo:+.3f}, {hi:+.3f}]" for stat, (s, lo, hi) in slopes(ns, losses).items()]
    print(f"  {label:<34} " + "   ".join(parts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--folder", type=Path, help="a folder holding the three *_loss.npy files")
    src.add_argument("--mirror", type=Path, help="a fetched CRPE-SGaME snapshot (git directory)")
    ap.add_argument("--run", action="store_true", help="also fit gatelab on the authors' grid")
    ap.add_argument("--certified", action="store_true", help="with --run: the certified reading too")
    ap.add_argument("--thin", type=int, default=10, help="with --run: every THIN-th size (default 10)")
    ap.add_argument("--replicates", type=int, default=40)
    ap.add_argument("--k", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--db", type=Path, default=Path("runs/authors-grid.sqlite"))
    args = ap.parse_args()
    for k in args.k:
        ns, theirs = authors_grid(k), load(k, args.folder, args.mirror)
        print(f"k = {k}: the authors' array, {theirs.shape[0]} sizes {int(ns[0])}..{int(ns[-1])} "
              f"(linear), {theirs.shape[1]} replicates; their slope (OLS of log mean) "
              f"{authors_slope(ns, theirs):+.3f}")
        show("authors' array, all sizes", ns, theirs)
        pick = slice(None, None, args.thin)
        show(f"authors' array, every {args.thin}th size", ns[pick], theirs[pick])
        if not args.run:
            continue
        sizes = [int(round(n)) for n in ns[pick]]
        readings = [False, True] if args.certified else [False]
        for certified in readings:
            start = time.perf_counter()
            mine = ours(k, sizes, args.replicates, certified, args.db)
            what = "certified" if certified else "protocol"
            show(f"gatelab {what}, same sizes", np.array(sizes), mine)
            print(f"    ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
