"""A self-check of the model catalogue (``gatelab demo``; the main job, ``make demo``, is
``gatelab reproduce softmax-gaussian --quick``): sample the reference truth and every
gate in the catalogue, in batches of replicates, and check that the samples follow each
model's own density (probability integral transform + Kolmogorov-Smirnov statistic)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .gates import GATES, example_gate
from .models import GaussianMoE, MoERegression
from .models.base import DensityModel
from .params import Params


def reference_truth() -> tuple[GaussianMoE, Params]:
    """The "lambda shape" truth of the reference protocol (MODELS.md section 6, from the
    public code of arXiv 2305.03288): d = 1, k* = 2, gate scores -8 + 25x and 0, expert
    means 15 - 20x and -5 + 20x, standard deviations 0.3 and 0.4, x uniform on [0, 1]."""
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    params = {"beta1": t([[25.0], [0.0]]), "beta0": t([-8.0, 0.0]), "a": t([[-20.0], [20.0]]),
              "b": t([15.0, -5.0]), "var": t([0.3 ** 2, 0.4 ** 2])}
    return GaussianMoE(2, dim=1), params


@dataclass
class DemoRow:
    model: str
    draws: int
    mean_loglik: float
    ks: float
    seconds: float


def ks_uniform(u: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance of the sample ``u`` from Uniform(0, 1)."""
    u, _ = u.reshape(-1).sort()
    n = u.numel()
    i = torch.arange(1, n + 1, dtype=u.dtype)
    return float(torch.maximum(i / n - u, u - (i - 1) / n).max())


def check_model(label: str, model: DensityModel, params: Params, n: int, replicates: int,
                seed: int) -> DemoRow:
    start = time.perf_counter()
    x, y = model.sample(params, n, torch.Generator().manual_seed(seed), replicates=replicates)
    loglik = model.log_prob(x, y, params).mean()
    ks = ks_uniform(model.cdf(x, y, params))
    return DemoRow(label, n * replicates, float(loglik), ks, time.perf_counter() - start)


def catalogue_models(dim: int = 2, n_experts: int = 4) -> list[tuple[str, DensityModel]]:
    """One model per gate in the catalogue (sigmoid as MoE regression)."""
    out: list[tuple[str, DensityModel]] = []
    for name in GATES:
        gate = example_gate(name)
        cls = MoERegression if not gate.sums_to_one else GaussianMoE
        out.append((f"{cls.__name__}[{name}]", cls(n_experts, dim, gate, "linear")))
    return out


def run_demo(n: int = 10_000, replicates: int = 40, seed: int = 0) -> list[DemoRow]:
    """Sample and score the reference truth and every catalogue gate; print a table."""
    model, params = reference_truth()
    rows = [check_model("reference truth (softmax, k*=2)", model, params, n, replicates, seed)]
    for i, (label, m) in enumerate(catalogue_models()):
        p = m.random_params(torch.Generator().manual_seed(seed + i + 1))
        rows.append(check_model(label, m, p, n, replicates, seed + i + 1))
    # Critical value of the KS statistic at level 0.001 for this many draws.
    crit = 1.95 / (n * replicates) ** 0.5
    print(f"Sampling {replicates} replicates x n={n} per model, batched; PIT KS distance should "
          f"stay below {crit:.4f}.")
    print(f"{'model':<34} {'draws':>9} {'mean loglik':>12} {'KS':>8} {'ok':>3} {'seconds':>8}")
    for r in rows:
        ok = "yes" if r.ks < crit else "NO"
        print(f"{r.model:<34} {r.draws:>9} {r.mean_loglik:>12.4f} {r.ks:>8.4f} {ok:>3} "
              f"{r.seconds:>8.3f}")
    return rows
