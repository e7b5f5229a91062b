"""What one run of an experiment does. A task declares its options (with defaults) and
its arms' options, prepares what all runs share once in the parent process (caches), and
runs one (arm, n, seed) to a dict of metrics. Accuracies are in points (0-100).

``prefix-sharing`` (arXiv 2410.02200): supersense classification of WordNet glosses with a
frozen all-MiniLM-L6-v2 and a linear head on the mean-pooled output; the arms differ in
how the prefixes of the prompted layers are parameterised.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.backbone import PrefixTuned, mean_pool
from ..nn.prefix import PrefixLayer
from ..studies.spec import SpecError
from .text import GlossPool, frozen_states, gloss_pool, model_for

__all__ = ["Task", "TextPrefixTask", "PrefixSharing", "gloss_data", "class_split", "draw_per_class",
           "encoder", "trim_padding", "optimise", "train_classifier", "predict"]


class Task:
    """A kind of run. Subclasses set OPTIONS and ARM_OPTIONS (name -> default) and
    implement ``run``; ``prepare`` builds shared caches once, before any run."""

    name: ClassVar[str] = ""
    OPTIONS: ClassVar[dict[str, Any]] = {}
    ARM_OPTIONS: ClassVar[dict[str, Any]] = {}
    #: Bumped when a change to the task changes the rows an unchanged spec gives.
    VERSION: ClassVar[int] = 1

    @classmethod
    def _check(cls, given: Mapping[str, Any], known: dict[str, Any], path: str) -> None:
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise SpecError(f"{path}: unknown key(s) {unknown} for task {cls.name!r}; valid keys: "
                            f"{sorted(known)}.")

    @classmethod
    def check_options(cls, options: Mapping[str, Any], path: str) -> None:
        cls._check(options, cls.OPTIONS, path)

    @classmethod
    def check_arm(cls, options: Mapping[str, Any], path: str) -> None:
        cls._check(options, cls.ARM_OPTIONS, path)
        try:
            cls.build_arm({**cls.ARM_OPTIONS, **options})
        except (ValueError, TypeError) as err:
            raise SpecError(f"{path}: {err}") from None

    @classmethod
    def build_arm(cls, arm: Mapping[str, Any]) -> Any:
        """Check an arm's options by building what they describe (errors name the fix)."""
        return None

    @classmethod
    def resolved(cls, options: Mapping[str, Any], arm: Mapping[str, Any]) -> tuple[dict, dict]:
        return {**cls.OPTIONS, **options}, {**cls.ARM_OPTIONS, **arm}

    def prepare(self, options: Mapping[str, Any]) -> None:
        """Build what every run shares (e.g. cached hidden states), in the parent process."""

    def run(self, options: Mapping[str, Any], arm: Mapping[str, Any], n: int, seed: int) -> dict[str, float]:
        raise NotImplementedError


def prefix_layers(arm: Mapping[str, Any], layers: Iterable[int], hidden: int) -> dict[int, PrefixLayer]:
    """One PrefixLayer per prompted layer from an arm's options (length 0: no prefix)."""
    return {i: PrefixLayer.build(hidden, kind=arm["kind"], length=arm["length"], gate=arm["gate"],
                                 activation=arm["activation"], bottleneck=arm["bottleneck"])
            for i in layers}


def trim_padding(states: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the padding columns every row of a batch has (the pool is padded to one length)."""
    length = int(mask.sum(1).max())
    return states[:, :length], mask[:, :length]


def class_split(labels: np.ndarray, test_per_class: int, seed: int) -> tuple[Tensor, Tensor]:
    """Per class, in a random order drawn with ``seed``: the first ``test_per_class`` rows
    are its fixed test set, the rest its training pool. Returns (test rows (C x t,),
    pool (C, m)), m the smallest class's pool, so that each column is one draw per class."""
    rng = np.random.default_rng(seed)
    test, pool = [], []
    for c in range(int(labels.max()) + 1):
        rows = rng.permutation(np.flatnonzero(labels == c))
        test.append(rows[:test_per_class])
        pool.append(rows[test_per_class:])
    width = min(len(p) for p in pool)
    return torch.as_tensor(np.concatenate(test)), torch.as_tensor(np.stack([p[:width] for p in pool]))


def draw_per_class(pool: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """n training rows per class from ``class_split``'s pool (the same columns for every class)."""
    if n > pool.shape[1]:
        raise ValueError(f"n = {n} training samples per class exceeds the pool of {pool.shape[1]}; "
                         "lower n or test_per_class.")
    return pool[:, torch.randperm(pool.shape[1], generator=generator)[:n]].flatten()


def gloss_data(options: Mapping[str, Any]) -> tuple[GlossPool, Tensor, int]:
    """The gloss pool of a text task's options, the cached frozen states entering its
    first prompted layer, and that layer's index."""
    pool = gloss_pool(options["test_per_class"], options["pool_per_class"], options["max_length"],
                      options["data_seed"], options["backbone"])
    start = min(options["layers"])
    return pool, frozen_states(pool, start, options["backbone"]), start


Encoder = Callable[[Tensor], Tensor]


def encoder(model: PrefixTuned, start: int, states: Tensor, mask: Tensor) -> Encoder:
    """rows -> mean-pooled outputs of the prefix-tuned model, from the cached states entering
    layer ``start``. Without prefixes the outputs never change: they are computed once."""
    def encode(rows: Tensor) -> Tensor:
        h, m = trim_padding(states[rows], mask[rows])
        return mean_pool(model.forward_from(start, h, m), m)

    if any(layer.prefix is not None or layer.value_act != "identity" for layer in model.layers.values()):
        return encode
    key = (id(states), start)
    if key not in _POOLED:
        with torch.no_grad():
            every = torch.arange(len(states))
            _POOLED[key] = torch.cat([encode(every[i:i + 250]) for i in range(0, len(every), 250)])
    pooled = _POOLED[key]
    return lambda rows: pooled[rows]


# The frozen model's pooled outputs, per cached states tensor (they live as long as it does).
_POOLED: dict[tuple[int, int], Tensor] = {}


def optimise(params: Iterable[nn.Parameter], loss_of: Callable[[Tensor], Tensor], rows: Tensor,
             options: Mapping[str, Any], generator: torch.Generator) -> None:
    """AdamW (options lr, weight_decay) on ``loss_of(batch)`` over max(min_steps, epochs x
    rows / batch) minibatches of ``batch`` rows drawn with ``generator``."""
    opt = torch.optim.AdamW(params, lr=options["lr"], weight_decay=options["weight_decay"])
    steps = max(options["min_steps"], math.ceil(options["epochs"] * len(rows) / options["batch"]))
    for _ in range(steps):
        loss = loss_of(rows[torch.randint(len(rows), (options["batch"],), generator=generator)])
        opt.zero_grad()
        loss.backward()
        opt.step()


def train_classifier(encode: Encoder, model: PrefixTuned, rows: Tensor, labels: Tensor, classes: int,
                     hidden: int, options: Mapping[str, Any], generator: torch.Generator) -> nn.Linear:
    """Train the prefix layers and a linear head on ``encode``'s outputs, on cross-entropy
    (``optimise``). Returns the head."""
    head = nn.Linear(hidden, classes)
    params = [p for p in model.layers.parameters() if p.requires_grad] + list(head.parameters())
    model.train()
    optimise(params, lambda batch: F.cross_entropy(head(encode(batch)), labels[batch]), rows, options,
             generator)
    model.eval()
    return head


@torch.no_grad()
def predict(encode: Encoder, head: Encoder, rows: Tensor, batch: int = 250) -> Tensor:
    """The head's logits for ``rows``, in batches."""
    return torch.cat([head(encode(rows[i:i + batch])) for i in range(0, len(rows), batch)])


class TextPrefixTask(Task):
    """Prefixes in the upper layers of a frozen MiniLM, on WordNet glosses by supersense:
    the options and arm options that text tasks share, and their shared caches."""

    OPTIONS: ClassVar[dict[str, Any]] = {
        "test_per_class": 100, "pool_per_class": 100, "max_length": 32, "data_seed": 0,
        "layers": [4, 5], "lr": 1e-2, "weight_decay": 0.0, "batch": 32, "epochs": 6,
        "min_steps": 80, "backbone": "minilm",
    }
    ARM_OPTIONS: ClassVar[dict[str, Any]] = {
        "kind": "mlp", "length": 8, "gate": "linear", "activation": "tanh", "bottleneck": 48,
    }

    @classmethod
    def build_arm(cls, arm: Mapping[str, Any]) -> Any:
        return prefix_layers(arm, range(1), 8)

    def prepare(self, options: Mapping[str, Any]) -> None:
        gloss_data({**self.OPTIONS, **options})


class PrefixSharing(TextPrefixTask):
    """Shared (reparameterised) vs free prefixes on n glosses per class (arXiv 2410.02200).

    Metrics: ``accuracy`` on the fixed test set (points)."""

    name = "prefix-sharing"

    def run(self, options: Mapping[str, Any], arm: Mapping[str, Any], n: int, seed: int) -> dict[str, float]:
        options, arm = self.resolved(options, arm)
        pool, states, start = gloss_data(options)
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # the prefix tables' and the head's initial values
        rows = pool.draw(n, generator)
        model = PrefixTuned(model_for(options["backbone"]),
                            prefix_layers(arm, options["layers"], states.shape[-1]))
        started = time.perf_counter()
        encode = encoder(model, start, states, pool.mask)
        head = train_classifier(encode, model, rows, pool.labels, len(pool.names), states.shape[-1], options,
                                generator)
        test = pool.test_rows()
        logits = predict(encode, head, test)
        accuracy = (logits.argmax(-1) == pool.labels[test]).float().mean().item() * 100
        return {"accuracy": accuracy, "seconds": time.perf_counter() - started}

