"""``active-attention`` (arXiv 2410.11222): active attention, softmax(Q K^T / sqrt(d)) act(V),
against standard attention, and the quadratic-monomial gate (no query/key biases) against
the polynomial one, in a small transformer trained from scratch.

The paper trains its attention variants from scratch (image classification, language
modelling, forecasting), so this does too: changing act(V) inside a frozen pre-trained
model would measure the damage done to features learned with act = identity, not the
mechanism. The task is supersense classification of WordNet noun glosses; tokens enter
through all-MiniLM-L6-v2's frozen word-embedding table (a few thousand glosses cannot
train a 30k-word table) and a trainable projection; everything above it (2 pre-LN blocks
of width 64, 4 heads) is trained from a random start.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..nn.transformer import SmallTransformer
from .tasks import Task, optimise, predict, trim_padding
from .text import gloss_pool, model_for

__all__ = ["ActiveAttention"]


class ActiveAttention(Task):
    """One SmallTransformer trained on n glosses per class of the 20 large supersenses, tested
    on a fixed set. Arm options: ``value_act`` (identity = standard attention) and
    ``qk_bias`` (False: the quadratic-monomial gate). Metric: ``accuracy`` (points)."""

    name = "active-attention"
    OPTIONS: ClassVar[dict[str, Any]] = {
        "test_per_class": 100, "pool_per_class": 300, "max_length": 24, "data_seed": 0, "width": 64,
        "heads": 4, "depth": 2, "dropout": 0.1, "lr": 1e-3, "weight_decay": 0.01, "batch": 64,
        "epochs": 10, "min_steps": 100, "backbone": "minilm",
    }
    ARM_OPTIONS: ClassVar[dict[str, Any]] = {"value_act": "identity", "qk_bias": True}

    @classmethod
    def build_arm(cls, arm: Mapping[str, Any]) -> Any:
        return SmallTransformer(torch.zeros(3, 4), 2, width=8, heads=2, max_length=4,
                                value_act=arm["value_act"], qk_bias=arm["qk_bias"])

    @staticmethod
    def _pool(options: Mapping[str, Any]):
        return gloss_pool(options["test_per_class"], options["pool_per_class"], options["max_length"],
                          options["data_seed"], options["backbone"])

    def prepare(self, options: Mapping[str, Any]) -> None:
        self._pool({**self.OPTIONS, **options})

    def run(self, options: Mapping[str, Any], arm: Mapping[str, Any], n: int, seed: int) -> dict[str, float]:
        options, arm = self.resolved(options, arm)
        pool = self._pool(options)
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # initial weights and dropout
        rows = pool.draw(n, generator)
        table = model_for(options["backbone"]).embeddings.word_embeddings.weight.detach()
        model = SmallTransformer(table, len(pool.names), width=options["width"], heads=options["heads"],
                                 depth=options["depth"], max_length=options["max_length"],
                                 value_act=arm["value_act"], qk_bias=arm["qk_bias"],
                                 dropout=options["dropout"])
        started = time.perf_counter()

        def logits(batch: torch.Tensor) -> torch.Tensor:
            return model(*trim_padding(pool.ids[batch], pool.mask[batch]))

        model.train()
        optimise([p for p in model.parameters() if p.requires_grad],
                 lambda batch: F.cross_entropy(logits(batch), pool.labels[batch]), rows, options, generator)
        model.eval()
        test = pool.test_rows()
        accuracy = (predict(logits, torch.nn.Identity(), test).argmax(-1) == pool.labels[test]).float().mean()
        return {"accuracy": accuracy.item() * 100, "seconds": time.perf_counter() - started}
