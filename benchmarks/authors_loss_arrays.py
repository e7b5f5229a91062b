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


#: rbar(m) of arXiv 2305.03288's Lemma 1 for a cell of m fitted atoms (m = 1, 2, 3).
RBAR = {1: 1, 2: 4, 3: 6}


def their_loss(est: dict, truth: dict) -> float:
    """The loss of the authors' simulation code, written from its formula: cells by the
    distance d(i, j) = |beta1_i - beta1*_j| + |b_i - b*_j| + |a_i - a*_j| + |var_i - var*_j|
    (nearest true atom); a cell of one atom adds exp(beta0_i) d(i, j), a cell of m >= 2
    adds exp(beta0_i) (|dbeta1|^r + |db|^r + |da|^(r/2) + |dvar|^(r/2)), r = rbar(m); each
    true atom adds |sum_{i in cell} exp(beta0_i) - exp(beta0*_j)|. The masses are raw
    exp(beta0) with the last expert's intercept fixed at 0: no renormalisation and no
    translation, so where the reference expert shares a split cell its mass term stays
    near the other atom's mass (issue 14, point 7)."""
    b1, b0 = np.asarray(est["beta1"])[:, 0], np.asarray(est["beta0"])
    a, b, var = np.asarray(est["a"])[:, 0], np.asarray(est["b"]), np.asarray(est["var"])
    t1, t0 = np.asarray(truth["beta1"])[:, 0], np.asarray(truth["beta0"])
    ta, tb, tvar = np.asarray(truth["a"])[:, 0], np.asarray(truth["b"]), np.asarray(truth["var"])
    dist = (np.abs(b1[:, None] - t1) + np.abs(b[:, None] - tb) + np.abs(a[:, None] - ta)
            + np.abs(var[:, None] - tvar))
    cell = dist.argmin(axis=1)
    count = np.bincount(cell, minlength=len(t0))
    total = 0.0
    for i, j in enumerate(cell):
        if count[j] == 1:
            total += np.exp(b0[i]) * dist[i, j]
        else:
            r = RBAR[int(count[j])]
            total += np.exp(b0[i]) * (abs(b1[i] - t1[j]) ** r + abs(b[i] - tb[j]) ** r
                                      + abs(a[i] - ta[j]) ** (r / 2) + abs(var[i] - tvar[j]) ** (r / 2))
    for j in range(len(t0)):
        total += abs(np.exp(b0[cell == j]).sum() - np.exp(t0[j]))
    return float(total)


def ours(k: int, sizes: list[int], replicates: int, certified: bool,
         db: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """gatelab's losses (sizes, replicates) for softmax-gaussian's k setting on ``sizes``,
    the same fits scored by ``their_loss``, and gatelab's loss minimised over the gate's
    translation (block "translated", ``gatelab.losses.translated_loss``)."""
    from gatelab.studies import Store, Study, catalogue, reproduce
    name = "softmax-gaussian-certified" if certified else "softmax-gaussian"
    spec = catalogue.get(name).to_dict()
    spec.update(name=f"{name}-authors-grid-k{k}", sizes=sizes, replicates=replicates, claims=[])
    # their fixed design x = linspace(0, 1, n), not uniform draws
    spec["truth"]["covariates"] = {"kind": "grid", "low": 0.0, "high": 1.0}
    spec["settings"] = [s for s in spec["settings"] if s["fitted_k"] == k]
    study = Study.from_dict(spec)
    with Store(db) as store:
        reproduce(study, store, progress=True)
        rows = store.rows(study.name)
    truth = {k: v.tolist() for k, v in study.truth_params(study.settings[0]).items()}
    by_n: dict[int, list[tuple[float, float, float]]] = {}
    for r in rows:
        by_n.setdefault(r.n, []).append((r.loss, their_loss(r.params, truth), r.blocks["translated"]))
    every = np.array([by_n[n] for n in sizes])
    return every[..., 0], every[..., 1], every[..., 2]


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
            mine, scored, translated = ours(k, sizes, args.replicates, certified, args.db)
            what = "certified" if certified else "protocol"
            show(f"gatelab {what}, same sizes", np.array(sizes), mine)
            show("  the same fits, the authors' loss", np.array(sizes), scored)
            show("  the same fits, translated D2", np.array(sizes), translated)
            print(f"    ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
