"""A training step of FuseMoE's fusion (issue 15): gatelab against the authors' style and
against gatelab's own MoELayer at the same top-2 compute.

Work: 4 modalities x 1,024 tokens (4,096 tokens: 256 samples with 4 tokens per modality),
d = 256, 16 GELU experts of hidden size 512, top-2, Laplace gate, per-modality routers
over shared experts, 20% of the modalities missing. One step = forward through the fusion
(type / missing embeddings, routing, experts, residual, mean pool, head), the loss, and
backward. Arms, on the same weights:
  gatelab-fusion   FuseMoE.embed + FuseMoE.fuse;
  authors-loop     the authors' style: every expert on every token, each output multiplied
                   by its (mostly zero) gate weight and summed (written here, apart);
  moe-layer        one gatelab MoELayer (one Laplace router) on 4,096 tokens that require
                   grad, as the fused tokens do (the encoders and embeddings below them
                   train), so that both arms compute the experts' input gradients.
The authors-style output is checked against gatelab's before timing.

Targets, printed as MET / NOT MET: authors-loop / gatelab-fusion >= 3; gatelab-fusion /
moe-layer <= 1.2. Medians of round-robin repeats; --busy repeats the measurement beside a
Python busy loop (a second process competing for the cores).

    .venv/bin/python benchmarks/fusion_layer.py [--repeats 7] [--threads 2] [--busy]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

import gatelab  # noqa: F401  (first, as the CLI does)
from gatelab.nn.fusion import FuseMoE, Modality
from gatelab.nn.layer import MoELayer

M, PER, D, FFN, E, K, B = 4, 4, 256, 512, 16, 2, 256


def build():
    torch.manual_seed(0)
    model = FuseMoE([Modality(f"m{i}", "vector", 8) for i in range(M)], 10, width=D, n_experts=E, top_k=K,
                    gate="laplace", router="per-modality", ffn_dim=FFN, aux={"load_balance": 0.01})
    with torch.no_grad():
        for p in model.routers.parameters():
            p.normal_()
        experts = model.moe[0].experts  # unit-scale experts, so that the check below has teeth
        experts.up.normal_(0, D ** -0.5)
        experts.down_proj.normal_(0, FFN ** -0.5)
    encoded = [torch.randn(B, PER, D) for _ in range(M)]
    present = torch.rand(B, M) > 0.2
    return model, encoded, present


def gatelab_step(model, encoded, present):
    out = model.fuse(model.embed(encoded, present))
    return out.logits.square().mean() + out.aux_loss


def authors_logits(model, encoded, present):
    """Dense top-2 gate weights per modality, then every expert on every token."""
    experts = model.moe[0].experts
    tokens = model.embed(encoded, present)
    fused = []
    for i, t in enumerate(tokens):
        x = t.reshape(-1, D)
        routing = model.routers[i](x)
        gates = torch.zeros(x.shape[0], E).index_put((routing.token_index, routing.expert_index),
                                                     routing.weight, accumulate=True)
        y = torch.zeros_like(x)
        for e in range(E):
            y = y + gates[:, e:e + 1] * experts.expert(e, x)
        fused.append(t + y.view(t.shape))
    return model.head(torch.cat(fused, 1).mean(1))


def authors_step(model, encoded, present):
    return authors_logits(model, encoded, present).square().mean()


def layer_step(layer, tokens):
    out = layer(tokens)
    return out.output.square().mean() + out.aux_loss


def timed(fn) -> float:
    start = time.perf_counter()
    fn().backward()
    return time.perf_counter() - start


def measure(repeats: int) -> dict[str, float]:
    model, encoded, present = build()
    with torch.no_grad():
        want = model.fuse(model.embed(encoded, present)).logits
        got = authors_logits(model, encoded, present)
    err = (want - got).abs().max().item()
    assert err < 1e-3, f"the authors-style peer disagrees with gatelab by {err:.2e}"
    layer = MoELayer(D, FFN, E, K, "laplace", expert="gelu", aux={"load_balance": 0.01})
    tokens = torch.randn(M * B * PER, D, requires_grad=True)
    arms = {"gatelab-fusion": lambda: gatelab_step(model, encoded, present),
            "authors-loop": lambda: authors_step(model, encoded, present),
            "moe-layer": lambda: layer_step(layer, tokens)}
    for fn in arms.values():
        timed(fn)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(repeats):  # round robin: a slow spell of the machine hits all arms alike
        for name, fn in arms.items():
            times[name].append(timed(fn))
    print(f"  check: authors-loop logits == gatelab's to {err:.1e} (the experts move them by "
          f"{(want - model.head(torch.cat(model.embed(encoded, present), 1).mean(1))).abs().max():.2f})")
    return {k: statistics.median(v) for k, v in times.items()}


def report(label: str, t: dict[str, float]) -> None:
    print(f"{label}: medians per step (forward + backward), {M * B * PER} tokens, d={D}, {E} experts, "
          f"top-{K}")
    for name, s in t.items():
        print(f"  {name:<15} {s * 1e3:8.1f} ms")
    speedup = t["authors-loop"] / t["gatelab-fusion"]
    overhead = t["gatelab-fusion"] / t["moe-layer"]
    met = "MET" if speedup >= 3 else "NOT MET"
    print(f"  authors-loop / gatelab-fusion = {speedup:.2f}x (target >= 3: {met})")
    print(f"  gatelab-fusion / moe-layer    = {overhead:.2f}x (target <= 1.2: "
          f"{'MET' if overhead <= 1.2 else 'NOT MET'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--busy", action="store_true", help="also measure beside a competing busy process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report("idle", measure(args.repeats))
    if args.busy:
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            report("busy (one competing process)", measure(args.repeats))
        finally:
            hog.kill()


if __name__ == "__main__":
    main()
