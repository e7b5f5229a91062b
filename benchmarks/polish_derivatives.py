"""The certified reading's Newton polish (``fit.polish``) with its derivatives in C
(``gatelab_loglik_derivs`` in ``fit/_fused.c``: value, gradient and Hessian in every
parameter in one pass over the data) against the same polish with the PyTorch closed form
it replaced (``_softmax_linear_derivatives``: per-sample Jacobian products as batched
matmuls), on the same EM fits.

Work: softmax-gaussian-certified's truth (the "lambda shape", k* = 2, d = 1), R data sets
of n samples, over-specified k = 4 fitted by SQUAREM EM (tol 1e-6) from near-truth starts
whose noise does not shrink with n, then polished to the gradient bound 1e-6 (at most 150
steps). Both arms start from the same EM fits, in this one process, one after the other;
the two agree to rounding in every derivative (tests/fit/test_polish.py), so they take
the same steps until rounding decides a step-halving test. Printed: each arm's time, the
ratio, and each arm's certified count, steps and log-likelihood. --busy repeats both arms
beside a competing busy process (a Python busy loop on one of the cores).

Run: .venv/bin/python benchmarks/polish_derivatives.py [--n 16000] [--replicates 8] [--busy]
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import time
from unittest import mock

import torch

from gatelab.fit import fit_em, select_best
from gatelab.fit.init import near_truth_starts
from gatelab.studies import catalogue

polish_module = importlib.import_module("gatelab.fit.polish")  # the module, not the function


def problem(n: int, replicates: int, k: int):
    study = catalogue.get("softmax-gaussian-certified")
    setting = next(s for s in study.settings if s.fitted_k == k)
    truth_model, truth = study.truth_model(setting), study.truth_params(setting, n)
    model = study.fitted_model(setting)
    g = torch.Generator().manual_seed(1)
    xs, ys, starts = [], [], []
    for _ in range(replicates):
        x, y = truth_model.sample(truth, n, g)
        xs.append(x)
        ys.append(y)
        starts.append(near_truth_starts(model, truth, 1, 3, g))
    init = {b: torch.stack([s[b] for s in starts], dim=1) for b in starts[0]}
    x, y = torch.stack(xs), torch.stack(ys)
    fit = select_best(fit_em(model, x, y, init, tol=1e-6, accelerate=True))
    return model, x, y, fit.params


def arm(model, x, y, params, torch_form: bool):
    patch = mock.patch.object(polish_module, "_fused_kernel", lambda *a: None) if torch_form \
        else mock.patch.object(polish_module, "_fused_kernel", polish_module._fused_kernel)
    with patch:
        t = time.perf_counter()
        out = polish_module.polish(model, x, y, params, max_steps=150)
        return out, time.perf_counter() - t


def report(label: str, out, seconds: float) -> None:
    certified = int((out.grad_norm <= 1e-6).sum())
    print(f"  {label:22s} {seconds:8.2f} s  certified {certified}/{len(out.grad_norm)}  "
          f"steps {out.steps.tolist()}  loglik sum {float(out.loglik.sum()):.6f}")


def measure(args) -> None:
    model, x, y, params = problem(args.n, args.replicates, args.experts)
    c_out, c_time = arm(model, x, y, params, torch_form=False)
    t_out, t_time = arm(model, x, y, params, torch_form=True)
    report("C derivatives", c_out, c_time)
    report("PyTorch closed form", t_out, t_time)
    gap = float((c_out.loglik - t_out.loglik).abs().max())
    print(f"  ratio (PyTorch / C): {t_time / c_time:.1f}x; largest log-likelihood difference "
          f"between the arms {gap:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16000)
    parser.add_argument("--replicates", type=int, default=8)
    parser.add_argument("--experts", type=int, default=4, choices=(3, 4))
    parser.add_argument("--busy", action="store_true", help="also measure beside a busy process")
    args = parser.parse_args()
    print(f"polish after EM: n = {args.n}, {args.replicates} data sets, k = {args.experts}, "
          f"threads = {torch.get_num_threads()}")
    print("idle:")
    measure(args)
    if args.busy:
        busy = subprocess.Popen([sys.executable, "-c", "while True:\n    pass\n"])
        try:
            print("beside a busy process:")
            measure(args)
        finally:
            busy.kill()


if __name__ == "__main__":
    main()
