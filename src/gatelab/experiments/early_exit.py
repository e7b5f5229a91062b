"""``early-exit``: JEI-DNN's learned exits (``gatelab.nn.early_exit``) against confidence
thresholding, on a frozen all-MiniLM-L6-v2 with a linear head on the mean-pooled output
of each of its 6 layers, WordNet glosses by supersense (20 classes).

Because the backbone is frozen, every layer's pooled output is computed once for all
glosses; heads and gates then train on those features. Per seed:

- plain heads: the 6 heads trained together on sum_l CE_l (n glosses per class);
- thresholding (arms ``max-prob``, ``entropy``): a sample exits at the first layer whose
  plain head's max probability is >= t (entropy <= t); t swept over ``thresholds`` values
  gives a curve of (mean exit layer, accuracy);
- JEI-DNN (arm ``jei``): for each lambda of ``lambdas``, new gates and the heads of the
  same plain run stopped ``jei_steps / 2`` steps early, trained with alternating
  classifier and gate steps (``jei_steps`` in all) on the same glosses, so that both
  methods' heads get the same number of updates; each lambda is one point of its curve.

Each curve is read, by linear interpolation in the mean exit layer, on a grid over the
range that all three curves cover (the same for every arm of a seed): ``accuracy`` is the
mean accuracy on that grid (the area under the accuracy-vs-mean-exit-layer curve divided
by the range's width), ``ece`` the mean expected calibration error (confidence: the exiting
head's max probability, 15 equal bins). ``acc@b`` is the curve's accuracy at mean exit
layer b (``budgets``) when the curve reaches b. MiniLM has 6 exits, so the compute axis
has 6 steps and a curve between them is an average of exits, not a finer model.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..nn.backbone import backbone_path, mean_pool
from ..nn.early_exit import (
    EarlyExit,
    at_exit,
    classifier_loss,
    exit_features,
    exit_targets,
    first_exit,
    gate_loss,
)
from .tasks import Task, optimise, trim_padding
from .text import GlossPool, cached_tensor, gloss_pool, model_for

__all__ = ["EarlyExitTask", "METHODS", "expected_calibration_error", "curve_summary"]

METHODS = ("jei", "max-prob", "entropy")

Point = tuple[float, float, float]  # (mean exit layer, accuracy, ece), points


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = 15) -> float:
    """ECE (points): sum over equal-width confidence bins of |B|/N |accuracy(B) - mean
    confidence(B)|, the confidence being the max probability (Guo et al. 2017)."""
    conf, pred = probs.max(-1)
    right = (pred == labels).double()
    which = (conf.double() * bins).long().clamp(max=bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.double().mean().item() * abs(right[inside].mean().item()
                                                         - conf[inside].double().mean().item())
    return 100 * total


def operating_point(probs: Tensor, layer: Tensor, labels: Tensor) -> Point:
    """(mean exit layer counted from 1, accuracy, ECE) of predictions ``probs`` (B, C)."""
    accuracy = (probs.argmax(-1) == labels).double().mean().item() * 100
    return float(layer.double().mean()) + 1, accuracy, expected_calibration_error(probs, labels)


def curve_summary(curves: Mapping[str, list[Point]], grid: int) -> tuple[float, float, dict[str, tuple]]:
    """The range (low, high) of mean exit layers every curve covers, and per curve the mean
    accuracy and mean ECE on ``grid`` evenly spaced points of it (linear interpolation)."""
    low = max(min(p[0] for p in c) for c in curves.values())
    high = min(max(p[0] for p in c) for c in curves.values())
    xs = np.linspace(low, high, grid)
    out = {}
    for name, points in curves.items():
        x, acc, ece = (np.array(v) for v in zip(*sorted(points)))
        out[name] = (float(np.interp(xs, x, acc).mean()), float(np.interp(xs, x, ece).mean()), (x, acc))
    return low, high, out


def threshold_curve(logits: Tensor, labels: Tensor, method: str, count: int) -> list[Point]:
    """Operating points of confidence thresholding on max probability or entropy."""
    feats = exit_features(logits)  # (L, B, 3): max prob, entropy, margin
    probs = torch.softmax(logits, -1)
    if method == "max-prob":
        exits = [feats[..., 0] >= t for t in torch.linspace(0, 1.0001, count)]
    else:
        exits = [feats[..., 1] <= t for t in torch.linspace(-1e-4, float(np.log(logits.shape[-1])), count)]
    points = []
    for rule in exits:
        layer = first_exit(rule)
        points.append(operating_point(at_exit(probs, layer), layer, labels))
    return points


def summed_ce(logits_LBC: Tensor, labels_B: Tensor) -> Tensor:
    """sum over layers of the mean cross-entropy of each layer's head."""
    return F.cross_entropy(logits_LBC.flatten(0, 1), labels_B.repeat(len(logits_LBC))) * len(logits_LBC)


def train_jei(start: EarlyExit, features: Tensor, labels: Tensor, rows: Tensor, lam: float,
              options: Mapping[str, Any], generator: torch.Generator) -> EarlyExit:
    """JEI-DNN from ``start``'s heads: even steps train the heads on sum_l p_l CE_l, odd
    steps the gates on their cumulative exit targets (``gatelab.nn.early_exit``)."""
    model = copy.deepcopy(start)
    heads = torch.optim.AdamW(model.heads.parameters(), lr=options["lr"],
                              weight_decay=options["weight_decay"])
    gates = torch.optim.AdamW(model.gates.parameters(), lr=options["gate_lr"], weight_decay=0.0)
    for step in range(options["jei_steps"]):
        batch = rows[torch.randint(len(rows), (options["batch"],), generator=generator)]
        logits = model.logits(features[:, batch])
        g = model.gate_values(logits)
        if step % 2 == 0:
            loss, opt = classifier_loss(logits, labels[batch], g), heads
        else:
            ce = F.cross_entropy(logits.detach().flatten(0, 1), labels[batch].repeat(len(logits)),
                                 reduction="none").view(logits.shape[:2])
            loss, opt = gate_loss(g, exit_targets(ce, lam)), gates
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


class EarlyExitTask(Task):
    """Learned exits vs thresholding (module docstring). Arm option ``method``
    (``METHODS``); n is the number of training glosses per class."""

    name = "early-exit"
    VERSION = 2  # 2: JEI-DNN's heads get as many updates as the plain heads
    OPTIONS: ClassVar[dict[str, Any]] = {
        "test_per_class": 100, "pool_per_class": 300, "max_length": 32, "data_seed": 0, "backbone": "minilm",
        "lr": 1e-2, "weight_decay": 1e-4, "batch": 64, "epochs": 20, "min_steps": 200,
        "gate_lr": 1e-2, "jei_steps": 200, "lambdas": [0.0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2],
        "thresholds": 41, "grid": 21, "budgets": [2.0, 3.0, 4.0, 5.0],
    }
    ARM_OPTIONS: ClassVar[dict[str, Any]] = {"method": "jei"}

    @classmethod
    def build_arm(cls, arm: Mapping[str, Any]) -> Any:
        if arm["method"] not in METHODS:
            raise ValueError(f"method {arm['method']!r} is not one of {', '.join(METHODS)}.")
        return arm["method"]

    @staticmethod
    def _pool(options: Mapping[str, Any]) -> GlossPool:
        return gloss_pool(options["test_per_class"], options["pool_per_class"], options["max_length"],
                          options["data_seed"], options["backbone"])

    def prepare(self, options: Mapping[str, Any]) -> None:
        options = {**self.OPTIONS, **options}
        layer_features(self._pool(options), options["backbone"])

    @staticmethod
    def _heads(features: Tensor, labels: Tensor, rows: Tensor, classes: int, options: Mapping[str, Any],
               generator: torch.Generator) -> tuple[EarlyExit, EarlyExit]:
        """(plain heads after S steps on sum_l CE_l, the same heads after S - jei_steps / 2 of
        those steps): JEI-DNN continues the second with jei_steps / 2 head steps, so that
        both methods' heads get S updates (S = max(min_steps, epochs x rows / batch))."""
        steps = max(options["min_steps"], math.ceil(options["epochs"] * len(rows) / options["batch"]))
        warm_steps = steps - options["jei_steps"] // 2
        if warm_steps < 0:
            raise ValueError(f"jei_steps / 2 = {options['jei_steps'] // 2} head steps exceed the {steps} "
                             "steps of the plain heads; lower jei_steps or raise min_steps.")
        start = EarlyExit(features.shape[-1], classes, features.shape[0])
        state = generator.get_state()
        heads = []
        for count in (steps, warm_steps):  # the same start and minibatches: a prefix of one run
            model = copy.deepcopy(start)
            generator.set_state(state)
            def loss(b: Tensor, m: EarlyExit = model) -> Tensor:
                return summed_ce(m.logits(features[:, b]), labels[b])

            optimise(model.heads.parameters(), loss, rows, {**options, "min_steps": count, "epochs": 0},
                     generator)
            heads.append(model)
        return heads[0], heads[1]

    def run(self, options: Mapping[str, Any], arm: Mapping[str, Any], n: int, seed: int) -> dict[str, float]:
        options, arm = self.resolved(options, arm)
        pool = self._pool(options)
        features = layer_features(pool, options["backbone"])  # (L, N, D)
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # the heads' and gates' initial values
        started = time.perf_counter()
        rows, test, labels = pool.draw(n, generator), pool.test_rows(), pool.labels
        plain, warm = self._heads(features, labels, rows, len(pool.names), options, generator)
        with torch.no_grad():
            test_logits = plain.logits(features[:, test])
        curves = {m: threshold_curve(test_logits, labels[test], m, options["thresholds"])
                  for m in ("max-prob", "entropy")}
        curves["jei"] = []
        for lam in options["lambdas"]:
            model = train_jei(warm, features, labels, rows, lam, options, generator)
            probs, layer = model.predict(features[:, test])
            curves["jei"].append(operating_point(probs, layer, labels[test]))
        low, high, summary = curve_summary(curves, options["grid"])
        accuracy, ece, (x, acc) = summary[arm["method"]]
        out = {"accuracy": accuracy, "ece": ece, "range_low": low, "range_high": high,
               "last_layer_accuracy": curves["max-prob"][-1][1]}
        for b in options["budgets"]:
            if x.min() <= b <= x.max():
                out[f"acc@{b:g}"] = float(np.interp(b, x, acc))
        return {**out, "seconds": time.perf_counter() - started}


def layer_features(pool: GlossPool, backbone: str) -> Tensor:
    """(L, N, D): the frozen backbone's mean-pooled output of each layer for every gloss,
    from one pass over the pool, kept in the cache folder (``cached_tensor``)."""
    @torch.no_grad()
    def compute() -> Tensor:
        model = model_for(backbone)
        parts = []
        for i in range(0, len(pool.ids), 256):
            ids, mask = trim_padding(pool.ids[i:i + 256], pool.mask[i:i + 256])
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            parts.append(torch.stack([mean_pool(h, mask) for h in hidden[1:]]))
        return torch.cat(parts, 1)

    return cached_tensor(f"layer-features|{backbone_path(backbone)}|{pool.key}", compute)
