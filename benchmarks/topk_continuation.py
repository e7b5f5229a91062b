"""The smoothed top-K continuation's gate step: gatelab's closed-form Newton step
(``SmoothedTopK.q_derivatives``, the derivatives in the scores chained through z = (1, x))
against the step it replaced, autograd Newton on the same gate (reverse-over-reverse, one
backward pass per free gate entry), inside the whole fit.

Work: the topk-cells-mixing study's problem (a top-2 truth of three linear experts in
d = 2, x uniform on [-1, 1]^2), fitted with k = 4 and K = 2 from 2 near-truth starts, one
data set of n samples, the default schedule. Both sides take the same Newton rule on the
same Q (their derivatives agree to 1e-12, tests/fit/test_topk_continuation.py), so the
paths agree until a rounding difference changes a step-halving decision on this
non-concave Q; then they may end at nearby stationary points. Printed: the time of each,
the ratio, and each side's hard log-likelihood minus the truth's on the same data.

Run: .venv/bin/python benchmarks/topk_continuation.py [--n 16000] [--experts 4] [--top-k 2]
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import torch

from gatelab.fit.init import near_truth_starts
from gatelab.fit.topk_continuation import SmoothedTopK, fit_topk_continuation
from gatelab.studies import catalogue


def problem(n: int, n_experts: int, top_k: int):
    study = catalogue.get("topk-cells-mixing")
    setting = study.settings[0]
    truth_model, truth = study.truth_model(setting), study.truth_params(setting, n)
    model = study.fitted_model(setting)
    model = type(model)(n_experts, model.dim, type(model.gate)(top_k=top_k), model.expert,
                        model.covariates)
    g = torch.Generator().manual_seed(0)
    x, y = truth_model.sample(truth, n, g)
    starts = near_truth_starts(model, truth, n, 2, g)                    # (S, k, ...)
    init = {k: v.unsqueeze(1) for k, v in starts.items()}                # (S, R = 1, ...)
    return model, x[None], y[None], init, float(truth_model.log_likelihood(x, y, truth))


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16000)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    args = parser.parse_args()
    model, x, y, init, truth_ll = problem(args.n, args.experts, args.top_k)
    print(f"fit_topk_continuation, n = {args.n}, k = {args.experts}, K = {args.top_k}, 2 starts, "
          f"threads = {torch.get_num_threads()}")
    mine, t_mine = timed(lambda: fit_topk_continuation(model, x, y, init))
    with mock.patch.object(SmoothedTopK, "q_derivatives", lambda self, *a: None):
        peer, t_peer = timed(lambda: fit_topk_continuation(model, x, y, init))
    gain = lambda res: [round(float(v) - truth_ll, 4) for v in res.loglik.flatten()]  # noqa: E731
    print(f"{'side':<22} {'seconds':>8}  log-likelihood minus the truth's, per start")
    print(f"{'gatelab closed form':<22} {t_mine:>8.2f}  {gain(mine)}")
    print(f"{'autograd Newton':<22} {t_peer:>8.2f}  {gain(peer)}")
    gap = float((mine.loglik - peer.loglik).abs().max())
    print(f"ratio {t_peer / t_mine:.2f}x; largest |log-likelihood difference| {gap:.2e}")


if __name__ == "__main__":
    main()
