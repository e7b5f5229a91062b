"""The least-squares Jacobian of MoE regression: gatelab's structured forward mode
(``MoERegression.mean_jacobian``: one pass per entry of an expert's row, shared by all
experts, and the normaliser's closed-form df/ds) against PyTorch's own batched Jacobian,
``torch.func.vmap(torch.func.jacfwd(...))`` over the replicates, and against gatelab's
previous per-column forward mode (one pass of the whole model per free parameter, still
the fallback for hierarchical gates).

Problems: the least-squares studies' shapes, d = 2, k = 3, R = 8 replicates, n = 16,000
(``--n``). All arms get the same parameters; their Jacobians are compared before timing.
Then whole fits (``fit_lsq`` from the same starts, structured vs per-column): seconds and
the RSS each reached. Medians of round-robin repeats; --busy repeats everything beside a
Python busy loop.

    .venv/bin/python benchmarks/lsq_jacobian.py [--n 16000] [--repeats 7] [--busy]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

import gatelab as gl
from gatelab.fit.lsq import _Problem, fit_lsq

PROBLEMS = {
    "sigmoid gate, ReLU FFN experts": ("sigmoid", "ffn"),
    "softmax gate, ReLU FFN experts": ("softmax", "ffn"),
    "quadratic gate, linear experts": ("quadratic", "linear"),
    "perturbed cosine gate, linear experts": ("perturbed_cosine", "linear"),
}
K, R = 3, 8


class PerColumn(gl.MoERegression):
    """The same model with the structured Jacobian declined: one pass per column."""

    def mean_jacobian(self, x_ND, params):  # type: ignore[override]
        return None


def make(gate: str, expert: str, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    covariates = gl.GaussianCovariates(dim=2)
    model = gl.MoERegression(K, 2, gate, expert, covariates=covariates)
    truth = model.random_params(g)
    truth["nu"] = torch.tensor(0.01, dtype=torch.float64)
    x, y = model.sample(truth, n, g, replicates=R)
    init = {k: v + 0.2 * torch.randn((R, *v.shape), generator=g, dtype=v.dtype)
            for k, v in truth.items() if k != "nu"}
    init["nu"] = torch.full((R,), 0.01, dtype=torch.float64)
    return model, PerColumn(K, 2, gate, expert, covariates=covariates), x, y, init


def func_jacobian(problem: _Problem):
    """PyTorch's batched Jacobian of the residuals, vmap over replicates of jacfwd."""
    def one(theta_P, x_ND, y_N, full_P):
        full = full_P.index_put((problem.free.nonzero().squeeze(-1),), theta_P)
        params = gl.params.unpack(full, problem.shapes)
        return y_N - problem.model._regression(x_ND, params)
    jac = torch.func.vmap(torch.func.jacfwd(one))
    return lambda theta: jac(theta, problem.x, problem.y, problem.full)


def timed(fn, theta) -> float:
    start = time.perf_counter()
    fn(theta)
    return time.perf_counter() - start


def measure(n: int, repeats: int) -> None:
    for label, (gate, expert) in PROBLEMS.items():
        model, slow_model, x, y, init = make(gate, expert, n)
        fast, slow = _Problem(model, x, y, init), _Problem(slow_model, x, y, init)
        theta = fast.theta()
        peer = func_jacobian(fast)
        ref = slow.jacobian(theta)[1]
        err = max(float((fast.jacobian(theta)[1] - ref).abs().max()),
                  float((peer(theta) - ref).abs().max())) / float(ref.abs().max())
        arms = {"gatelab structured": (fast.jacobian, theta),
                "torch.func vmap(jacfwd)": (peer, theta),
                "gatelab per-column (previous)": (slow.jacobian, theta)}
        times: dict[str, list[float]] = {k: [] for k in arms}
        for _ in range(repeats):
            for name, (fn, at) in arms.items():
                times[name].append(timed(fn, at))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"  {label} (P = {theta.shape[-1]}): Jacobians agree to {err:.1e} (relative)")
        for name, s in med.items():
            print(f"    {name:<32} {s * 1e3:8.1f} ms   {s / med['gatelab structured']:5.2f}x gatelab's")
        peer_ratio = med["torch.func vmap(jacfwd)"] / med["gatelab structured"]
        print(f"    torch.func / gatelab = {peer_ratio:.2f}x")
        fits = {"structured": model, "per-column": slow_model}
        fit_times, rss = {}, {}
        for name, m in fits.items():
            start = time.perf_counter()
            res = fit_lsq(m, x, y, init, tol=1e-10, max_iter=60)
            fit_times[name], rss[name] = time.perf_counter() - start, res.rss / n
        gap = float((rss["structured"] - rss["per-column"]).abs().max())
        print(f"    whole fit (60 LM iterations at most): structured {fit_times['structured']:.2f} s, "
              f"per-column {fit_times['per-column']:.2f} s "
              f"({fit_times['per-column'] / fit_times['structured']:.2f}x); mean RSS/n "
              f"{float(rss['structured'].mean()):.6f} vs {float(rss['per-column'].mean()):.6f} "
              f"(largest gap {gap:.1e})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--busy", action="store_true", help="also measure beside a competing busy process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"idle: one Jacobian of R = {R} replicates, n = {args.n}, median of {args.repeats}")
    measure(args.n, args.repeats)
    if args.busy:
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            print("busy (one competing process)")
            measure(args.n, args.repeats)
        finally:
            hog.kill()


if __name__ == "__main__":
    main()
