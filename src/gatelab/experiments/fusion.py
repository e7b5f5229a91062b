"""``fusemoe-missing`` (arXiv 2402.03226): MoE fusion of the six views of UCI Multiple
Features when views are missing, against a concatenation MLP and late fusion.

Per class a fixed test set (``test_per_class``, drawn with ``data_seed``) and a training
pool; each seed draws n training digits per class. Features are standardised with the
training rows' means and deviations. Each view of each digit (training and test) is
missing independently with the arm's rate; where every view of a digit is dropped, one
view drawn at random is kept, so a digit always has at least one view. Masks depend on the
seed and the rate only, so the arms of a seed with the same rate see the same gaps.

Models (arm option ``model``):

- "fusemoe": ``FuseMoE`` with one vector modality per view, ``router`` joint or
  per-modality, catalogue ``gate``; absent views become the learned missing embedding;
- "concat": an MLP on the concatenated views, absent views imputed by the training mean
  (0 after standardising) plus one missing indicator per view;
- "late": one MLP per view, trained on the digits that have that view; the prediction
  averages the class probabilities of the views a digit has.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import choose
from ..data import MFEAT_VIEWS, uci_multiple_features
from ..nn.fusion import FUSIONS, FuseMoE, Modality
from ..nn.hierarchical import HierarchicalMoE
from .tasks import Task, class_split, draw_per_class, optimise

__all__ = ["FuseMissing", "HMoEGates", "FuseIrregular", "missing_masks", "irregular_vowels", "interpolate",
           "MODELS"]

MODELS = {"fusemoe": "FuseMoE fusion", "concat": "concatenation MLP, mean imputation + indicators",
          "late": "late fusion: the mean of the available views' classifiers"}


def missing_masks(rows: int, views: int, rate: float, generator: torch.Generator) -> Tensor:
    """(rows, views) bool, True = present: each view dropped with probability ``rate``; a row
    that lost every view gets one back, drawn uniformly."""
    present = torch.rand(rows, views, generator=generator) >= rate
    empty = ~present.any(1)
    keep = torch.randint(views, (rows,), generator=generator)
    present[empty, keep[empty]] = True
    return present


def _check_rate(rate: Any) -> None:
    if not (isinstance(rate, (int, float)) and 0 <= rate < 1):
        raise ValueError(f"missing must be a rate in [0, 1); got {rate!r}.")


@lru_cache(maxsize=2)
def _split(test_per_class: int, seed: int) -> tuple[tuple[Tensor, ...], Tensor, Tensor, Tensor]:
    """Views (float32), labels, and the fixed test rows and training pool (``class_split``)."""
    data = uci_multiple_features()
    views = tuple(torch.as_tensor(v, dtype=torch.float32) for v in data.views)
    return (views, torch.as_tensor(data.labels), *class_split(data.labels, test_per_class, seed))


class _ViewModel(nn.Module):
    """A classifier of digits from their views (list of (B, d_v)) and presence mask (B, V)."""

    def scores(self, views: list[Tensor], present: Tensor) -> tuple[Tensor, Tensor]:
        """(logits (B, C), auxiliary loss)."""
        raise NotImplementedError

    def forward(self, views: list[Tensor], present: Tensor) -> Tensor:
        return self.scores(views, present)[0]

    def loss(self, views: list[Tensor], present: Tensor, labels: Tensor) -> Tensor:
        logits, aux = self.scores(views, present)
        return F.cross_entropy(logits, labels) + aux


def _imputed(views: list[Tensor], present: Tensor) -> Tensor:
    """The views side by side, absent ones at the training mean (0 after standardising),
    then one missing indicator per view."""
    return torch.cat([v * present[:, i:i + 1] for i, v in enumerate(views)] + [present.float()], -1)


class _Concat(_ViewModel):
    def __init__(self, dims: list[int], classes: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(sum(dims) + len(dims), hidden), nn.GELU(),
                                 nn.Linear(hidden, classes))

    def scores(self, views: list[Tensor], present: Tensor) -> tuple[Tensor, Tensor]:
        return self.net(_imputed(views, present)), present.new_zeros((), dtype=views[0].dtype)


class _Late(_ViewModel):
    def __init__(self, dims: list[int], classes: int, hidden: int):
        super().__init__()
        self.nets = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, classes))
                                  for d in dims)

    def view_logits(self, views: list[Tensor]) -> Tensor:
        return torch.stack([net(v) for net, v in zip(self.nets, views, strict=True)], 1)  # (B, V, C)

    def loss(self, views: list[Tensor], present: Tensor, labels: Tensor) -> Tensor:
        """Each view's classifier on the digits that have that view."""
        logits = self.view_logits(views)
        each = F.cross_entropy(logits.flatten(0, 1), labels.repeat_interleave(len(views)), reduction="none")
        return (each * present.flatten().float()).sum() / present.sum()

    def scores(self, views: list[Tensor], present: Tensor) -> tuple[Tensor, Tensor]:
        probs = self.view_logits(views).softmax(-1) * present.unsqueeze(-1)
        logits = (probs.sum(1) / present.sum(1, keepdim=True)).log()
        return logits, present.new_zeros((), dtype=views[0].dtype)


class _Fused(_ViewModel):
    def __init__(self, fuse: FuseMoE):
        super().__init__()
        self.fuse = fuse

    def scores(self, views: list[Tensor], present: Tensor) -> tuple[Tensor, Tensor]:
        out = self.fuse(dict(zip(MFEAT_VIEWS, views, strict=True)), present)
        return out.logits, out.aux_loss


class FuseMissing(Task):
    """n training digits per class, views missing at the arm's ``missing`` rate. Metric:
    ``accuracy`` on the fixed test set (points), with its views missing at the same rate."""

    name = "fusemoe-missing"
    OPTIONS: ClassVar[dict[str, Any]] = {
        "test_per_class": 100, "data_seed": 0, "width": 32, "n_experts": 8, "top_k": 2, "hidden": 64,
        "lr": 3e-3, "weight_decay": 1e-4, "batch": 32, "epochs": 60, "min_steps": 150,
        "load_balance": 0.01,
    }
    ARM_OPTIONS: ClassVar[dict[str, Any]] = {"model": "fusemoe", "router": "joint", "gate": "laplace",
                                             "missing": 0.0}

    @classmethod
    def build_arm(cls, arm: Mapping[str, Any]) -> Any:
        choose("model", arm["model"], MODELS)
        choose("fusion router", arm["router"], FUSIONS)
        _check_rate(arm["missing"])
        return cls._model(arm, {**cls.OPTIONS}, 10)

    @staticmethod
    def _model(arm: Mapping[str, Any], options: Mapping[str, Any], classes: int) -> _ViewModel:
        dims = list(MFEAT_VIEWS.values())
        if arm["model"] == "concat":
            return _Concat(dims, classes, options["hidden"])
        if arm["model"] == "late":
            return _Late(dims, classes, options["hidden"])
        return _Fused(FuseMoE([Modality(v, "vector", d) for v, d in MFEAT_VIEWS.items()], classes,
                              width=options["width"], n_experts=options["n_experts"], top_k=options["top_k"],
                              gate=arm["gate"], router=arm["router"],
                              aux={"load_balance": options["load_balance"]}))

    def prepare(self, options: Mapping[str, Any]) -> None:
        options = {**self.OPTIONS, **options}
        _split(options["test_per_class"], options["data_seed"])

    def run(self, options: Mapping[str, Any], arm: Mapping[str, Any], n: int, seed: int) -> dict[str, float]:
        options, arm = self.resolved(options, arm)
        views, labels, test, pool = _split(options["test_per_class"], options["data_seed"])
        generator = torch.Generator().manual_seed(seed)
        train = draw_per_class(pool, n, generator)
        masks = torch.Generator().manual_seed(seed + 1)  # the same gaps for every model of a rate
        present = torch.zeros(len(labels), len(views), dtype=torch.bool)
        present[train] = missing_masks(len(train), len(views), arm["missing"], masks)
        present[test] = missing_masks(len(test), len(views), arm["missing"], masks)
        mean = [v[train].mean(0) for v in views]
        std = [v[train].std(0).clamp_min(1e-6) for v in views]
        scaled = [(v - m) / s for v, m, s in zip(views, mean, std, strict=True)]
        torch.manual_seed(seed)
        model = self._model(arm, options, int(labels.max()) + 1)
        started = time.perf_counter()
        model.train()
        optimise(list(model.parameters()),
                 lambda rows: model.loss([v[rows] for v in scaled], present[rows], labels[rows]),
                 train, options, generator)
        model.eval()
        with torch.no_grad():
            logits = model([v[test] for v in scaled], present[test])
        accuracy = (logits.argmax(-1) == labels[test]).float().mean().item() * 100
        return {"accuracy": accuracy, "seconds": time.perf_counter() - started}



class _Hierarchical(_ViewModel):
    """The imputed views side by side -> Linear(width) -> GELU = x -> x + HMoE(x) -> head."""

    def __init__(self, dims: list[int], classes: int, options: Mapping[str, Any], outer: str, inner: str):
        super().__init__()
        width = options["width"]
        self.embed = nn.Sequential(nn.Linear(sum(dims) + len(dims), width), nn.GELU())
        self.moe = HierarchicalMoE(width, 2 * width, options["groups"], options["inner"], outer=outer,
                                   inner=inner, outer_top_k=None, inner_top_k=options["inner_top_k"],
                                   expert="gelu", aux={"load_balance": options["load_balance"]})
        self.head = nn.Linear(width, classes)

    def scores(self, views: list[Tensor], present: Tensor) -> tuple[Tensor, Tensor]:
        x = self.embed(_imputed(views, present))
        out = self.moe(x)
        return self.head(x + out.output), out.aux_loss


class HMoEGates(FuseMissing):
    """The hierarchical MoE's gate pairs (arXiv 2410.02935) on UCI Multiple Features: arm
    options ``outer`` and ``inner`` (softmax, laplace, gaussian), the outer level dense over
    ``groups`` groups, the inner level top-``inner_top_k`` of ``inner`` experts. Same data,
    training and metric as ``fusemoe-missing`` (views may be missing: arm option ``missing``)."""

    name = "hmoe-gates"
    OPTIONS: ClassVar[dict[str, Any]] = {**FuseMissing.OPTIONS, "groups": 2, "inner": 4, "inner_top_k": 2}
    ARM_OPTIONS: ClassVar[dict[str, Any]] = {"outer": "softmax", "inner": "softmax", "missing": 0.0}

    @classmethod
    def build_arm(cls, arm: Mapping[str, Any]) -> Any:
        _check_rate(arm["missing"])
        return cls._model(arm, {**cls.OPTIONS}, 10)

    @staticmethod
    def _model(arm: Mapping[str, Any], options: Mapping[str, Any], classes: int) -> _ViewModel:
        return _Hierarchical(list(MFEAT_VIEWS.values()), classes, options, arm["outer"], arm["inner"])


def irregular_vowels(split: str, drop: float, groups: int, generator: torch.Generator
                     ) -> tuple[list[tuple[Tensor, Tensor, Tensor]], Tensor]:
    """JapaneseVowels as ``groups`` irregular series per utterance: the 12 channels split
    into equal groups (sensors), each time point of each group dropped independently with
    probability ``drop`` (at least one kept per group). Per group (values (N, 29, C/groups),
    times (N, 29) = frame / 28, observed (N, 29) bool; padding is unobserved), and labels."""
    from ..data import japanese_vowels
    data = japanese_vowels(split)
    N, T = len(data.values), 29
    values = torch.zeros(N, T, 12)
    real = torch.zeros(N, T, dtype=torch.bool)
    for i, v in enumerate(data.values):
        values[i, :len(v)] = torch.as_tensor(v, dtype=torch.float32)
        real[i, :len(v)] = True
    times = (torch.arange(T, dtype=torch.float32) / (T - 1)).expand(N, T)
    out = []
    for cols in torch.arange(12).chunk(groups):
        observed = real & (torch.rand(N, T, generator=generator) >= drop)
        lost = ~observed.any(1)
        first = real.float().argmax(1)  # a real frame to give back where all were dropped
        observed[lost, first[lost]] = True
        out.append((values[:, :, cols], times, observed))
    return out, torch.as_tensor(data.labels)


def interpolate(values: Tensor, times: Tensor, observed: Tensor, grid: int) -> Tensor:
    """(N, grid, C): each series linearly interpolated at ``grid`` equally spaced times in
    [0, 1] from its observed points (held constant beyond the first and last)."""
    at = torch.linspace(0, 1, grid)
    out = torch.empty(values.shape[0], grid, values.shape[-1])
    for i in range(values.shape[0]):
        t, v = times[i, observed[i]].numpy(), values[i, observed[i]].numpy()
        out[i] = torch.as_tensor(np.stack([np.interp(at.numpy(), t, v[:, c]) for c in range(v.shape[1])], 1))
    return out


class _SeriesModel(nn.Module):
    """A classifier of utterances given as channel groups of irregular series."""

    def inputs(self, groups: list[tuple[Tensor, Tensor, Tensor]]) -> Any:
        """What ``scores`` takes, computed once for all rows (e.g. interpolated grids)."""
        return groups

    @staticmethod
    def take(inputs: Any, rows: Tensor) -> Any:
        return [tuple(t[rows] for t in g) for g in inputs]

    def scores(self, inputs: Any) -> tuple[Tensor, Tensor]:
        """(logits, auxiliary loss)."""
        raise NotImplementedError


class _SeriesFused(_SeriesModel):
    """FuseMoE over the channel groups, each an irregular series (mTAND tokens)."""

    def __init__(self, group_channels: list[int], classes: int, options: Mapping[str, Any],
                 arm: Mapping[str, Any]):
        super().__init__()
        modalities = [Modality(f"group{g}", "series", c) for g, c in enumerate(group_channels)]
        self.fuse = FuseMoE(modalities, classes, width=options["width"], n_experts=options["n_experts"],
                            top_k=options["top_k"], gate=arm["gate"], router=arm["router"],
                            references=options["references"], aux={"load_balance": options["load_balance"]})

    def scores(self, inputs: Any) -> tuple[Tensor, Tensor]:
        out = self.fuse({f"group{g}": s for g, s in enumerate(inputs)})
        return out.logits, out.aux_loss


class _Imputed(_SeriesModel):
    """Each group interpolated onto a fixed grid, the grids side by side, then an MLP."""

    def __init__(self, group_channels: list[int], classes: int, options: Mapping[str, Any]):
        super().__init__()
        self.grid = options["grid"]
        self.net = nn.Sequential(nn.Linear(self.grid * sum(group_channels), options["hidden"]), nn.GELU(),
                                 nn.Linear(options["hidden"], classes))

    def inputs(self, groups: list[tuple[Tensor, Tensor, Tensor]]) -> Any:
        return torch.cat([interpolate(*g, self.grid).flatten(1) for g in groups], -1)

    @staticmethod
    def take(inputs: Any, rows: Tensor) -> Any:
        return inputs[rows]

    def scores(self, inputs: Any) -> tuple[Tensor, Tensor]:
        return self.net(inputs), inputs.new_zeros(())


class FuseIrregular(Task):
    """``fusemoe-irregular`` (arXiv 2402.03226): JapaneseVowels with time points dropped at the
    arm's ``drop`` rate, the 12 channels as ``groups`` irregular series. Arm ``model``:
    "fusemoe" (mTAND-style encoders, MoE fusion with ``gate`` and ``router``) or "impute"
    (linear interpolation onto ``grid`` times, concatenation, MLP). n training utterances
    per speaker (of the 30 of the archive's training split); tested on the 370 of its test
    split. Metric: ``accuracy`` (points)."""

    name = "fusemoe-irregular"
    OPTIONS: ClassVar[dict[str, Any]] = {
        "groups": 2, "grid": 16, "width": 32, "n_experts": 8, "top_k": 2, "references": 8, "hidden": 64,
        "lr": 3e-3, "weight_decay": 1e-4, "batch": 32, "epochs": 60, "min_steps": 150, "load_balance": 0.01,
    }
    ARM_OPTIONS: ClassVar[dict[str, Any]] = {"model": "fusemoe", "gate": "laplace", "router": "joint",
                                             "drop": 0.3}

    @classmethod
    def build_arm(cls, arm: Mapping[str, Any]) -> Any:
        choose("model", arm["model"], {"fusemoe": "", "impute": ""})
        choose("fusion router", arm["router"], FUSIONS)
        _check_rate(arm["drop"])
        return cls._model(arm, cls.OPTIONS)

    @staticmethod
    def _model(arm: Mapping[str, Any], options: Mapping[str, Any]) -> _SeriesModel:
        channels = [len(c) for c in torch.arange(12).chunk(options["groups"])]
        if arm["model"] == "impute":
            return _Imputed(channels, 9, options)
        return _SeriesFused(channels, 9, options, arm)

    def prepare(self, options: Mapping[str, Any]) -> None:
        from ..data import japanese_vowels
        japanese_vowels("train"), japanese_vowels("test")  # a missing file fails here, once

    def run(self, options: Mapping[str, Any], arm: Mapping[str, Any], n: int, seed: int) -> dict[str, float]:
        options, arm = self.resolved(options, arm)
        masks = torch.Generator().manual_seed(seed + 1)  # the same dropped points for every model
        train, y_train = irregular_vowels("train", arm["drop"], options["groups"], masks)
        test, y_test = irregular_vowels("test", arm["drop"], options["groups"], masks)
        generator = torch.Generator().manual_seed(seed)
        rows = torch.cat([torch.nonzero(y_train == c).flatten()[torch.randperm(int((y_train == c).sum()),
                                                                                  generator=generator)[:n]]
                          for c in range(9)])
        train, test = _standardised(train, test, rows)
        torch.manual_seed(seed)
        model = self._model(arm, options)
        started = time.perf_counter()
        train_in, test_in = model.inputs(train), model.inputs(test)

        def loss(batch: Tensor) -> Tensor:
            logits, aux = model.scores(model.take(train_in, batch))
            return F.cross_entropy(logits, y_train[batch]) + aux

        model.train()
        optimise(list(model.parameters()), loss, rows, options, generator)
        model.eval()
        with torch.no_grad():
            logits, _ = model.scores(test_in)
        accuracy = (logits.argmax(-1) == y_test).float().mean().item() * 100
        return {"accuracy": accuracy, "seconds": time.perf_counter() - started}


def _standardised(train: list, test: list, rows: Tensor) -> tuple[list, list]:
    """Each channel scaled by the mean and deviation of the training rows' observed points."""
    def scale(groups: list, stats: list) -> list:
        return [((v - m) / s * o.unsqueeze(-1), t, o)
                for (v, t, o), (m, s) in zip(groups, stats, strict=True)]

    stats = []
    for v, _, o in train:
        seen = v[rows][o[rows]]
        stats.append((seen.mean(0), seen.std(0).clamp_min(1e-6)))
    return scale(train, stats), scale(test, stats)
