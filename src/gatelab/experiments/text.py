"""Text data for the prefix experiments: WordNet noun glosses by supersense, tokenised for
the backbone, and the frozen backbone's hidden states below the first prompted layer,
computed once and kept on disk (``GATELAB_CACHE``, default ``runs/cache``).

A pool holds, per class, a fixed test set and a fixed training pool; each seed draws its n
training glosses per class from the pool, so every arm and size is tested on the same
glosses.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from ..data import supersense_dataset
from ..nn.backbone import PrefixTuned, backbone_path, load_backbone

__all__ = ["GlossPool", "gloss_pool", "frozen_states", "cached_tensor", "cache_dir"]


@dataclass(frozen=True)
class GlossPool:
    """Tokenised glosses: ids and mask (N, T), labels (N,), and per class the row indices
    of its test glosses and of its training pool."""

    ids: Tensor
    mask: Tensor
    labels: Tensor
    test: tuple[tuple[int, ...], ...]
    train: tuple[tuple[int, ...], ...]
    names: tuple[str, ...]
    key: str

    def draw(self, n: int, generator: torch.Generator, classes: tuple[int, ...] | None = None) -> Tensor:
        """n training rows per class (of ``classes``, default all), without replacement."""
        picked = []
        for c in classes if classes is not None else range(len(self.names)):
            pool = torch.tensor(self.train[c])
            if n > len(pool):
                raise ValueError(f"n = {n} training glosses per class exceeds the pool of {len(pool)}; "
                                 "raise the experiment's pool_per_class option.")
            picked.append(pool[torch.randperm(len(pool), generator=generator)[:n]])
        return torch.cat(picked)

    def test_rows(self, classes: tuple[int, ...] | None = None) -> Tensor:
        return torch.tensor([i for c in (classes if classes is not None else range(len(self.names)))
                             for i in self.test[c]])


@lru_cache(maxsize=4)
def gloss_pool(test_per_class: int, pool_per_class: int, max_length: int, seed: int,
               backbone: str | None = None) -> GlossPool:
    """The supersenses with >= 770 glosses (20), each split at random (``seed``) into
    ``test_per_class`` test glosses and a training pool, tokenised to ``max_length``."""
    texts, labels, names = supersense_dataset()
    rng = random.Random(seed)
    by_class = [[i for i, label in enumerate(labels) if label == c] for c in range(len(names))]
    for rows in by_class:
        rng.shuffle(rows)
    chosen: list[int] = []
    test: list[tuple[int, ...]] = []
    train: list[tuple[int, ...]] = []
    for rows in by_class:
        start = len(chosen)
        chosen += rows[:test_per_class + pool_per_class]
        test.append(tuple(range(start, start + test_per_class)))
        train.append(tuple(range(start + test_per_class, len(chosen))))
    _, tokenizer = _backbone(backbone)
    enc = tokenizer([texts[i] for i in chosen], padding="max_length", truncation=True,
                    max_length=max_length, return_tensors="pt")
    text_hash = hashlib.sha256("\n".join(texts[i] for i in chosen).encode()).hexdigest()[:12]
    return GlossPool(enc["input_ids"], enc["attention_mask"], torch.tensor([labels[i] for i in chosen]),
                     tuple(test), tuple(train), tuple(names), f"{text_hash}-{max_length}")


@lru_cache(maxsize=2)
def _backbone(path: str | None):
    return load_backbone(path)


def cache_dir() -> Path:
    return Path(os.environ.get("GATELAB_CACHE", "runs/cache"))


def frozen_states(pool: GlossPool, start: int, backbone: str | None = None) -> Tensor:
    """Hidden states (N, T, d) entering layer ``start`` for every gloss of the pool, from
    the frozen layers below it: computed once, then read from the cache folder."""
    def compute() -> Tensor:
        tuned = PrefixTuned(model_for(backbone), {})
        return torch.cat([tuned.hidden_before(start, pool.ids[i:i + 256], pool.mask[i:i + 256])
                          for i in range(0, len(pool.ids), 256)])

    return cached_tensor(f"{backbone_path(backbone)}|{pool.key}|{start}", compute)


def cached_tensor(key: str, compute: Callable[[], Tensor]) -> Tensor:
    """``compute()``, kept in this process and in the cache folder under a hash of ``key``
    (written atomically: a killed run never leaves a half-written file behind)."""
    name = hashlib.sha256(key.encode()).hexdigest()[:16]
    if name not in _STATES:
        path = cache_dir() / f"states-{name}.pt"
        if path.exists():
            _STATES[name] = torch.load(path)
        else:
            value = compute()
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".part")
            torch.save(value, partial)
            partial.replace(path)
            _STATES[name] = value
    return _STATES[name]


_STATES: dict[str, Tensor] = {}  # this process's copies of the cached tensors


def model_for(backbone: str | None = None):
    """The (cached) backbone model of this process."""
    return _backbone(backbone)[0]
