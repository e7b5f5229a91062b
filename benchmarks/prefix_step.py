"""A training step of prefix-tuned all-MiniLM-L6-v2: gatelab's attention against the
host's own (sdpa) and against the obvious eager prefix implementation (issue 13).

Work: batch 32 x 64 tokens, prefixes of 10 rows (no-share tables) in all 6 layers; one
step = forward, a loss on the mean-pooled output, backward. Gradients flow back to the
layer-0 inputs (``inputs_embeds.requires_grad``) in every arm, so all arms do the same
backward. Arms:
  host-sdpa        transformers' own sdpa attention, no prefix;
  gatelab-empty    gatelab's hook in every layer with zero-length prefixes;
  gatelab-GATE     gatelab with a GATE-scored prefix (linear, norga-tanh, laplace);
  eager-GATE       the peer: concatenate prefix keys and values, compute softmax(Q K^T)
                   in full, apply the gate to the prefix columns (written here, apart).
The peer's output is checked against gatelab's before timing.

Targets, printed as MET / NOT MET: gatelab-empty <= 1.3x host-sdpa; gatelab-GATE faster
than eager-GATE for every gate. Medians of round-robin repeats; --busy repeats the
whole measurement beside a Python busy loop (a second process competing for the cores).

    .venv/bin/python benchmarks/prefix_step.py [--repeats 7] [--batch 32] [--seq 64] [--busy]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

import gatelab  # noqa: F401  (first, as the CLI does)
from gatelab.nn.attention import additive_mask
from gatelab.nn.backbone import PrefixTuned, load_backbone, mean_pool
from gatelab.nn.prefix import PrefixLayer

GATES = {"linear": ("linear", "tanh"), "norga-tanh": ("norga", "tanh"), "laplace": ("laplace", "tanh")}
LENGTH = 10


def eager_gate(layer: PrefixLayer, s_p, q, k_p, scale):
    """The prefix gate applied to the prefix columns of the full score matrix."""
    kind = layer.score.kind
    if kind == "linear":
        return s_p
    if kind == "norga":
        return s_p + layer.score.alpha * torch.tanh(layer.score.tau * s_p)
    # Laplace, -c ||q - k||, from the columns' dot products.
    sq = q.square().sum(-1, keepdim=True) - 2 * s_p / scale + k_p.square().sum(-1).unsqueeze(-2)
    return -sq.clamp_min(1e-30).sqrt() * scale


def eager_prefix_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                           gatelab_layers=None, **kwargs):
    layer = gatelab_layers[str(module.layer_idx)]
    k_p, v_p = layer.keys_values(module, query.shape[1])
    B, H, T, D = query.shape
    P = k_p.shape[-2]
    keys = torch.cat([k_p.expand(B, H, P, D), key], -2)
    values = torch.cat([v_p.expand(B, H, P, D), value], -2)
    scores = query @ keys.transpose(-1, -2) * scaling
    scores = torch.cat([eager_gate(layer, scores[..., :P], query, k_p, scaling), scores[..., P:]], -1)
    mask = additive_mask(attention_mask, query.dtype)
    if mask is not None:
        scores = scores + torch.cat([torch.zeros_like(mask[..., :1]).expand(*mask.shape[:-1], P), mask], -1)
    return (scores.softmax(-1) @ values).transpose(1, 2).contiguous(), None


def register_peer() -> str:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask
    AttentionInterface.register("eager-prefix", eager_prefix_attention)
    AttentionMaskInterface.register("eager-prefix", sdpa_mask)
    return "eager-prefix"


def inputs(model, tokenizer, batch: int, seq: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, tokenizer.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[batch // 2:, seq * 3 // 4:] = 0  # some padding, as real batches have
    with torch.no_grad():
        embeds = model.embeddings.word_embeddings(ids)
    return embeds, mask


def step(run, embeds, mask) -> float:
    start = time.perf_counter()
    x = embeds.detach().requires_grad_(True)
    pooled = mean_pool(run(x, mask), mask)
    pooled.sum().backward()
    return time.perf_counter() - start


def arms(model, peer: str):
    torch.manual_seed(0)
    empty = PrefixTuned(model, {i: PrefixLayer.build(384, length=0) for i in range(6)})
    out = {"host-sdpa": lambda x, m: (model.set_attn_implementation("sdpa"),
                                      model(inputs_embeds=x, attention_mask=m).last_hidden_state)[1],
           "gatelab-empty": lambda x, m: run_gatelab(empty, x, m)}
    for name, (gate, act) in GATES.items():
        tuned = PrefixTuned(model, {i: PrefixLayer.build(384, kind="no-share", length=LENGTH, gate=gate,
                                                         activation=act) for i in range(6)})
        out[f"gatelab-{name}"] = lambda x, m, t=tuned: run_gatelab(t, x, m)
        out[f"eager-{name}"] = lambda x, m, t=tuned: run_peer(t, peer, x, m)
    return out


def run_gatelab(tuned: PrefixTuned, x, m):
    tuned.backbone.set_attn_implementation("gatelab")
    return tuned(inputs_embeds=x, attention_mask=m)


def run_peer(tuned: PrefixTuned, peer: str, x, m):
    tuned.backbone.set_attn_implementation(peer)
    out = tuned.backbone(inputs_embeds=x, attention_mask=m, gatelab_layers=tuned.layers)
    return out.last_hidden_state


def check(runs, embeds, mask) -> None:
    with torch.no_grad():
        for name in GATES:
            a, b = runs[f"gatelab-{name}"](embeds, mask), runs[f"eager-{name}"](embeds, mask)
            err = (a - b).abs().max().item()
            assert err < 1e-4, f"gatelab and the eager peer differ by {err} with the {name} gate"
        err = (runs["gatelab-empty"](embeds, mask) - runs["host-sdpa"](embeds, mask)).abs().max().item()
        assert err < 1e-4, f"zero-length prefixes differ from the host by {err}"


def measure(runs, embeds, mask, repeats: int) -> dict[str, float]:
    for run in runs.values():
        step(run, embeds, mask)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(step(run, embeds, mask))
    return {name: statistics.median(t) for name, t in times.items()}


def report(seconds: dict[str, float], label: str) -> list[tuple[bool, str]]:
    print(f"\n== {label}: seconds per training step (median)")
    for name, s in seconds.items():
        print(f"  {name:18s} {s * 1e3:9.1f} ms")
    verdicts = []
    ratio = seconds["gatelab-empty"] / seconds["host-sdpa"]
    verdicts.append((ratio <= 1.3, f"{label}: gatelab hook, zero-length prefixes / host sdpa = {ratio:.2f}x "
                                   "(<= 1.3x)"))
    for name in GATES:
        speedup = seconds[f"eager-{name}"] / seconds[f"gatelab-{name}"]
        verdicts.append((speedup > 1.0, f"{label}: {name}: eager peer / gatelab = {speedup:.2f}x (> 1x)"))
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--busy", action="store_true", help="also measure beside a Python busy loop")
    args = parser.parse_args()
    model, tokenizer = load_backbone()
    print(f"all-MiniLM-L6-v2, batch {args.batch} x {args.seq} tokens, prefixes of {LENGTH} rows in all "
          f"6 layers, float32, {torch.get_num_threads()} threads")
    runs = arms(model, register_peer())
    embeds, mask = inputs(model, tokenizer, args.batch, args.seq)
    check(runs, embeds, mask)
    verdicts = report(measure(runs, embeds, mask, args.repeats), "idle")
    if args.busy:
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            verdicts += report(measure(runs, embeds, mask, args.repeats), "beside a busy loop")
        finally:
            busy.kill()
    print("\nTargets:")
    for ok, text in verdicts:
        print(f"  [{'MET' if ok else 'NOT MET'}] {text}")


if __name__ == "__main__":
    main()
