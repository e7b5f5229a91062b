"""Which optimiser for MoE least squares? gatelab's batched Levenberg-Marquardt against
torch.optim's Adam and L-BFGS (strong Wolfe line search) on the same problems and starts.

Each problem: an MoE regression truth (d = 2, k = 2), n = 2000 samples, R = 8 replicates,
starts = truth + N(0, 0.3^2) noise. LM fits all replicates as one batch; the peers fit
each replicate separately (their line searches and moments are per problem). Printed:
mean RSS / n reached (the noise variance is 0.01), its excess over the best method, and
seconds, with the time ratio against LM.

Run: .venv/bin/python benchmarks/lsq_methods.py
"""

from __future__ import annotations

import time

import torch

import gatelab as gl
from gatelab.fit.lsq import _Problem, fit_lsq

PROBLEMS = {
    "sigmoid gate, ReLU FFN experts": ("sigmoid", gl.make_expert("ffn", activation="relu")),
    "softmax gate, linear experts": ("softmax", "linear"),
    "perturbed cosine gate, linear experts": ("perturbed_cosine", "linear"),
}
N, R = 2000, 8


def make(gate, expert, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = gl.MoERegression(2, 2, gate, expert, covariates=gl.GaussianCovariates(dim=2))
    truth = model.random_params(g)
    truth["nu"] = torch.tensor(0.01, dtype=torch.float64)
    x, y = model.sample(truth, N, g, replicates=R)
    init = {k: v + 0.3 * torch.randn((R, *v.shape), generator=g, dtype=v.dtype)
            for k, v in truth.items() if k != "nu"}
    init["nu"] = torch.full((R,), 0.01, dtype=torch.float64)
    return model, x, y, init


def run_lm(model, x, y, init):
    res = fit_lsq(model, x, y, init)
    return res.rss / N, f"iterations mean {res.n_iter.float().mean():.0f}"


def run_peer(model, x, y, init, method: str):
    rss = []
    for r in range(R):
        problem = _Problem(model, x[r:r + 1], y[r:r + 1],
                           model.normalise({k: v[r:r + 1] for k, v in init.items()}))
        theta = problem.theta().clone().requires_grad_(True)
        loss = lambda p=problem, t=theta: p.residuals(t).square().sum() / N  # noqa: E731
        if method == "adam":
            opt = torch.optim.Adam([theta], lr=1e-2)
            for _ in range(5000):
                opt.zero_grad()
                value = loss()
                value.backward()
                opt.step()
        else:
            opt = torch.optim.LBFGS([theta], lr=1, max_iter=500, tolerance_grad=1e-12,
                                    tolerance_change=1e-14, history_size=50,
                                    line_search_fn="strong_wolfe")

            def closure(opt=opt, loss=loss):
                opt.zero_grad()
                value = loss()
                value.backward()
                return value
            opt.step(closure)
        with torch.no_grad():
            rss.append(loss())
    return torch.stack(rss), "5000 steps, lr 1e-2" if method == "adam" else "max_iter 500"


def main() -> None:
    torch.set_num_threads(2)
    print(f"n = {N}, {R} replicates per problem, float64, {torch.get_num_threads()} threads")
    for name, (gate, expert) in PROBLEMS.items():
        model, x, y, init = make(gate, expert)
        rows = []
        for label, fn in [("gatelab LM (batched)", run_lm),
                          ("torch Adam", lambda *a: run_peer(*a, "adam")),
                          ("torch L-BFGS", lambda *a: run_peer(*a, "lbfgs"))]:
            t0 = time.perf_counter()
            rss, note = fn(model, x, y, init)
            rows.append((label, float(rss.mean()), time.perf_counter() - t0, note))
        best = min(r[1] for r in rows)
        print(f"\n{name}")
        lm_time = rows[0][2]
        for label, rss, secs, note in rows:
            print(f"  {label:<22} RSS/n {rss:.8f}  excess {rss - best:9.2e}  {secs:7.2f} s "
                  f"({secs / lm_time:5.1f}x LM's time)  {note}")


if __name__ == "__main__":
    main()
