"""The plain cosine router in its raw parameterisation (arXiv 2405.14131): what a loss on
the raw beta1 measures.

With tau1 = 0 the router's score beta1_i . x / (||beta1_i|| ||x||) is homogeneous of degree
0 in beta1_i: the least-squares objective is constant along every ray c beta1_i, c > 0, so
the least-squares estimate in the raw parameterisation is a set, not a point, and its
Jacobian has a zero column along beta1_i. The fitted norm ||beta1_i|| is therefore set by
the optimiser's path (its start, and the drift of steps taken orthogonally to beta1_i),
not by the data. This script fits the cosine-vs-perturbed study's plain setting (its
truth, starts and estimator) and prints, per n, the median raw error ||beta1_i -
beta1*_i|| (max over experts), the median direction error ||beta1_i/||beta1_i|| -
beta1*_i/||beta1*_i|||| (the identifiable part, which the study scores) and the median
norm error | ||beta1_i|| - ||beta1*_i|| |, at the start and at the fit, with each
median's slope against n: what a loss on the raw beta1 would measure.

    python benchmarks/cosine_raw_norm.py [--sizes 1000 4000 16000] [--replicates 8]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def _errors(beta1: torch.Tensor, truth: torch.Tensor) -> tuple[float, float, float]:
    """(raw, direction, norm) errors of one fit's beta1 (E, D), worst expert."""
    raw = (beta1 - truth).norm(dim=-1).max()
    unit = (beta1 / beta1.norm(dim=-1, keepdim=True) - truth / truth.norm(dim=-1, keepdim=True))
    norm = (beta1.norm(dim=-1) - truth.norm(dim=-1)).abs().max()
    return float(raw), float(unit.norm(dim=-1).max()), float(norm)


def main() -> None:
    from gatelab.fit import select_best
    from gatelab.fit.init import near_truth_starts
    from gatelab.studies import catalogue
    from gatelab.studies.runner import _fit, _noise_n

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    ap.add_argument("--replicates", type=int, default=8)
    args = ap.parse_args()
    study = catalogue.get("cosine-vs-perturbed")
    setting = next(s for s in study.settings if s.name == "plain cosine k=2")
    model, truth_model = study.fitted_model(setting), study.truth_model(setting)
    medians: dict[str, list[float]] = {k: [] for k in ("start raw", "raw", "direction", "start norm", "norm")}
    for n in args.sizes:
        truth = study.truth_params(setting, n)
        got = []
        for r in range(args.replicates):
            g = torch.Generator().manual_seed(1000 * n + r)
            x, y = truth_model.sample(truth, n, g)
            init = near_truth_starts(model, truth, _noise_n(study, setting, n), 1, g)
            res = select_best(_fit(study, model, x[None], y[None], {k: v[:, None] for k, v in init.items()}))
            start = _errors(init["beta1"][0], truth["beta1"])
            end = _errors(res.params["beta1"][0], truth["beta1"])
            got.append((start[0], *end, start[2]))
        start_raw, raw, direction, norm, start_norm = np.median(np.array(got), axis=0)
        for key, value in zip(medians, (start_raw, raw, direction, start_norm, norm)):
            medians[key].append(value)
        print(f"n = {n:6d}: raw beta1 error {raw:.4f} (start {start_raw:.4f}); direction error "
              f"{direction:.4f}; norm error {norm:.4f} (start {start_norm:.4f})  [medians of "
              f"{args.replicates}]")
    logn = np.log(args.sizes)
    for key, values in medians.items():
        print(f"  median {key:<11} slope against n: {np.polyfit(logn, np.log(values), 1)[0]:+.3f}")


if __name__ == "__main__":
    main()
