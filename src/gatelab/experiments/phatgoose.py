"""``phatgoose-routing`` (arXiv 2402.05859): post-hoc routing among separately trained
LoRA adapters on a frozen all-MiniLM-L6-v2, on WordNet glosses by supersense.

Per seed:

- the supersenses are split (at random, per seed) into ``tasks`` groups of
  ``classes_per_task``; each group is one task, with n training glosses per class;
- one linear head over the union of the tasks' classes is trained on the frozen
  backbone's mean-pooled outputs (all tasks' training glosses), then frozen: every arm
  classifies through this same head;
- stage 1: one LoRA adapter per task (every attention and FFN linear layer of all six
  layers), trained on its task's glosses alone;
- stage 2 (arm ``phatgoose``): with the adapters and backbone frozen, each adapter's gate
  vectors (one per adapted layer, starting at 0) are trained on its task's glosses for
  ``gate_steps`` steps, through W x + sigmoid(v . x) B A x (all tasks in one pass per
  step, each gloss through its own task's adapter: ``train_gates``);
- stage 3: every token at every adapted layer is routed among all adapters with
  LN(x) . LN(v) / sqrt(d), top 2, renormalised (``gatelab.nn.adapters``).

The arms are evaluated on the held-out mixture of all tasks' test glosses, without task
labels (accuracy over the union of classes): ``base`` (the head on the frozen backbone),
``single`` (one task's adapter for every gloss), ``merged`` (the adapters' parameter
average), ``oracle`` (each gloss through its own task's adapter), ``multitask`` (one
adapter trained on all tasks together) and ``phatgoose``. Head and stage-1 adapters are
trained once per (n, seed) and kept in the cache folder, so that every arm of a seed uses
the same ones (and the comparison is paired).

Unlike the paper's zero-shot setting (held-out tasks never seen in training), every test
task here has its own adapter: the supersense groups of one backbone give no task that
is both new and answerable by the shared head.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import time
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.adapters import LoRABank, add_lora, banks_of, set_mode
from ..nn.backbone import mean_pool
from ..studies.spec import SpecError
from .continual import SUPERSENSES, local_labels, task_split
from .tasks import Task, optimise, trim_padding
from .text import GlossPool, cache_dir, frozen_states, gloss_pool, model_for

__all__ = ["PhatgooseRouting", "METHODS", "Stage1"]

METHODS = ("base", "single", "merged", "oracle", "multitask", "phatgoose")


class Stage1:
    """What every arm of one (n, seed) shares: the task split, the frozen head and the
    per-task adapters (``model``, a copy of the backbone with LoRA banks)."""

    def __init__(self, split: list[tuple[int, ...]], head: nn.Linear, model: nn.Module):
        self.split, self.head, self.model = split, head, model

    @property
    def banks(self) -> list[LoRABank]:
        return banks_of(self.model)


def lora_model(backbone: str, n_adapters: int, options: Mapping[str, Any]) -> nn.Module:
    """A copy of the (cached) backbone with a LoRA bank on every encoder linear layer."""
    model = copy.deepcopy(model_for(backbone))
    model.set_attn_implementation("sdpa")  # the cached backbone may have been switched to gatelab's
    add_lora(model, n_adapters, options["rank"], options["alpha"], top_k=options["top_k"])
    return model.eval()


def last_states(pool: GlossPool, backbone: str) -> Tensor:
    """The frozen backbone's last hidden states of every gloss (cached: ``frozen_states``)."""
    layers: Any = model_for(backbone).encoder.layer
    return frozen_states(pool, len(layers), backbone)


def pooled(model: nn.Module, pool: GlossPool, rows: Tensor) -> Tensor:
    """Mean-pooled last hidden states of the glosses ``rows`` (padding columns dropped)."""
    ids, mask = trim_padding(pool.ids[rows], pool.mask[rows])
    return mean_pool(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)


@torch.no_grad()
def logits_of(model: nn.Module, head: nn.Linear, pool: GlossPool, rows: Tensor, batch: int = 100) -> Tensor:
    return torch.cat([head(pooled(model, pool, rows[i:i + batch])) for i in range(0, len(rows), batch)])


def adapter_params(banks: list[LoRABank], e: int) -> list[nn.Parameter]:
    return [p for bank in banks for p in (bank.A[e], bank.B[e])]


def train_adapter(model: nn.Module, head: nn.Linear, pool: GlossPool, rows: Tensor, labels: Tensor,
                  e: int, options: Mapping[str, Any], generator: torch.Generator) -> None:
    """Stage 1: adapter e alone, on cross-entropy through the frozen head."""
    banks = banks_of(model)
    set_mode(banks, "single", e)
    params = adapter_params(banks, e)
    for p in params:
        p.requires_grad_(True)
    optimise(params, lambda b: F.cross_entropy(head(pooled(model, pool, b)), labels[b]), rows, options,
             generator)
    for p in params:
        p.requires_grad_(False)


def train_gates(model: nn.Module, head: nn.Linear, pool: GlossPool, task_rows: list[Tensor], labels: Tensor,
                options: Mapping[str, Any], generator: torch.Generator) -> None:
    """Stage 2: every adapter's gate vectors (adapters and backbone frozen), each on its own
    task through W x + sigmoid(v_e . x) delta_e(x). A step takes ``gate_batch`` glosses of every
    task, each through its own task's adapter, so that adapter e's gate row gets gradient
    from task e's glosses only: one pass does what one step per task would (up to Adam's
    epsilon, as the mean over the tasks scales each row's gradient by 1 / tasks)."""
    banks = banks_of(model)
    gates = [bank.gates for bank in banks]
    for g in gates:
        g.requires_grad_(True)
    opt = torch.optim.AdamW(gates, lr=options["gate_lr"], weight_decay=0.0)
    owner = torch.arange(len(task_rows)).repeat_interleave(options["gate_batch"])
    set_mode(banks, "gated", owner)
    for _ in range(options["gate_steps"]):
        batch = torch.cat([rows[torch.randint(len(rows), (options["gate_batch"],), generator=generator)]
                           for rows in task_rows])
        loss = F.cross_entropy(head(pooled(model, pool, batch)), labels[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for g in gates:
        g.requires_grad_(False)


def train_head(features: Tensor, labels: Tensor, rows: Tensor, classes: int, options: Mapping[str, Any],
               generator: torch.Generator) -> nn.Linear:
    """The shared head: a linear map on frozen pooled features, cross-entropy."""
    head = nn.Linear(features.shape[-1], classes)
    settings = {**options, "lr": options["head_lr"], "min_steps": options["head_steps"]}
    optimise(head.parameters(), lambda b: F.cross_entropy(head(features[b]), labels[b]), rows, settings,
             generator)
    return head.requires_grad_(False)


@contextmanager
def _locked(path):
    """An exclusive lock on ``path`` + ".lock" (parallel workers of one seed train once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class PhatgooseRouting(Task):
    """Routing among per-task LoRA adapters (module docstring). Arm options: ``method``
    (``METHODS``) and ``adapter`` (which task's adapter, for ``single``). Metrics: ``accuracy``
    on the task mixture (points); ``routing_accuracy`` for ``phatgoose``: the share of
    (real token, adapted layer) whose top adapter is the gloss's own task's."""

    name = "phatgoose-routing"
    VERSION = 2  # 2: stage 2 trains every task's gates in one pass per step
    OPTIONS: ClassVar[dict[str, Any]] = {
        "test_per_class": 40, "pool_per_class": 100, "max_length": 32, "data_seed": 0,
        "backbone": "minilm", "tasks": 4, "classes_per_task": 5, "rank": 8, "alpha": 8.0, "top_k": 2,
        "lr": 2e-3, "weight_decay": 0.0, "batch": 16, "epochs": 6, "min_steps": 60,
        "head_lr": 1e-2, "head_steps": 300, "gate_lr": 1e-3, "gate_steps": 100, "gate_batch": 8,
    }
    ARM_OPTIONS: ClassVar[dict[str, Any]] = {"method": "phatgoose", "adapter": 0}

    @classmethod
    def check_options(cls, options: Mapping[str, Any], path: str) -> None:
        super().check_options(options, path)
        full = {**cls.OPTIONS, **options}
        tasks, per_task = full["tasks"], full["classes_per_task"]
        if not (isinstance(tasks, int) and isinstance(per_task, int) and tasks >= 1 and per_task >= 1
                and tasks * per_task <= SUPERSENSES):
            raise SpecError(f"{path}: tasks x classes_per_task must be ints >= 1 with a product <= "
                            f"{SUPERSENSES} (the supersenses of the data); got {tasks} x {per_task}.")

    @classmethod
    def build_arm(cls, arm: Mapping[str, Any]) -> Any:
        if arm["method"] not in METHODS:
            raise ValueError(f"method {arm['method']!r} is not one of {', '.join(METHODS)}.")
        if not isinstance(arm["adapter"], int) or arm["adapter"] < 0:
            raise ValueError(f"adapter must be a task index >= 0; got {arm['adapter']!r}.")
        return arm["method"]

    def prepare(self, options: Mapping[str, Any]) -> None:
        options = {**self.OPTIONS, **options}
        last_states(self._pool(options), options["backbone"])

    @staticmethod
    def _pool(options: Mapping[str, Any]) -> GlossPool:
        return gloss_pool(options["test_per_class"], options["pool_per_class"], options["max_length"],
                          options["data_seed"], options["backbone"])

    def run(self, options: Mapping[str, Any], arm: Mapping[str, Any], n: int, seed: int) -> dict[str, float]:
        options, arm = self.resolved(options, arm)
        if arm["method"] == "single" and arm["adapter"] >= options["tasks"]:
            raise ValueError(f"adapter {arm['adapter']} does not exist: there are {options['tasks']} tasks.")
        pool = self._pool(options)
        stage = self.stage1(options, pool, n, seed)
        union = tuple(c for classes in stage.split for c in classes)
        labels = local_labels(pool.labels, union)
        test = pool.test_rows(union)
        generator = torch.Generator().manual_seed(seed + 1)  # stage 2 / multitask minibatches
        torch.manual_seed(seed + 1)  # the multitask adapter's initial A
        started = time.perf_counter()
        scores = self.evaluate(arm, stage, pool, labels, test, n, options, generator)
        return {**scores, "seconds": time.perf_counter() - started}

    def evaluate(self, arm: Mapping[str, Any], stage: Stage1, pool: GlossPool, labels: Tensor, test: Tensor,
                 n: int, options: Mapping[str, Any], generator: torch.Generator) -> dict[str, float]:
        method, model, banks = arm["method"], stage.model, stage.banks
        extra: dict[str, float] = {}
        if method == "oracle":  # each gloss through its own task's adapter
            own = torch.cat([torch.full((len(pool.test_rows(classes)),), e)
                             for e, classes in enumerate(stage.split)])
            return {"accuracy": 100 * self._correct(model, stage.head, pool, labels, test, "single", own)
                    / len(test)}
        if method == "multitask":
            model = lora_model(options["backbone"], 1, options)
            rows = torch.cat([pool.draw(n, generator, classes) for classes in stage.split])
            train_adapter(model, stage.head, pool, rows, labels, 0, options, generator)
            return {"accuracy": 100 * self._correct(model, stage.head, pool, labels, test, "single", 0)
                    / len(test)}
        if method == "phatgoose":
            with torch.no_grad():
                for bank in banks:
                    bank.gates.zero_()  # stage 2 from its start, even on a stage 1 kept in memory
            task_rows = [pool.draw(n, generator, classes) for classes in stage.split]
            train_gates(model, stage.head, pool, task_rows, labels, options, generator)
            extra["routing_accuracy"] = self._routing_accuracy(stage, pool, test)
        mode = {"base": "off", "single": "single", "merged": "merged", "phatgoose": "routed"}[method]
        right = self._correct(model, stage.head, pool, labels, test, mode, arm["adapter"])
        return {"accuracy": 100 * right / len(test), **extra}

    @staticmethod
    def _correct(model: nn.Module, head: nn.Linear, pool: GlossPool, labels: Tensor, rows: Tensor, mode: str,
                 adapter: int | Tensor) -> int:
        """How many of ``rows`` the model classifies right in ``mode`` (with a tensor
        ``adapter``: one adapter per row of ``rows``)."""
        banks, right = banks_of(model), 0
        for i in range(0, len(rows), 100):
            per_row = adapter[i:i + 100] if isinstance(adapter, Tensor) else adapter
            set_mode(banks, mode, per_row)  # type: ignore[arg-type]
            chunk = rows[i:i + 100]
            right += int((logits_of(model, head, pool, chunk).argmax(-1) == labels[chunk]).sum())
        return right

    @staticmethod
    @torch.no_grad()
    def _routing_accuracy(stage: Stage1, pool: GlossPool, test: Tensor) -> float:
        task_of_class = {c: t for t, classes in enumerate(stage.split) for c in classes}
        banks = stage.banks
        set_mode(banks, "routed")
        hits, total = 0.0, 0.0
        for i in range(0, len(test), 100):
            rows = test[i:i + 100]
            for bank in banks:
                bank.record = []
            ids, mask = trim_padding(pool.ids[rows], pool.mask[rows])
            stage.model(input_ids=ids, attention_mask=mask)
            own = torch.tensor([task_of_class[int(c)] for c in pool.labels[rows]])
            real = mask.bool()
            for bank in banks:
                for w in bank.record or []:
                    top = w.argmax(-1)  # (B, T)
                    hits += float(((top == own[:, None]) & real).sum())
                    total += float(real.sum())
        for bank in banks:
            bank.record = None
        return 100 * hits / total

    def stage1(self, options: Mapping[str, Any], pool: GlossPool, n: int, seed: int) -> Stage1:
        """Head and per-task adapters of (n, seed): trained by the first arm that needs
        them, then read from the cache folder (under a lock, written atomically)."""
        key = json.dumps({"v": self.VERSION, "options": options, "n": n, "seed": seed, "pool": pool.key},
                         sort_keys=True, default=repr)
        path = cache_dir() / f"phatgoose-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
        if path in _STAGES:
            return _STAGES[path]
        torch.manual_seed(seed)  # the adapters' A: seeded here, not by what this process ran before
        model = lora_model(options["backbone"], options["tasks"], options)
        with _locked(path):
            if path.exists():
                saved = torch.load(path)
                split = saved["split"]
                head = nn.Linear(*saved["head"]["weight"].shape[::-1]).requires_grad_(False)
                head.load_state_dict(saved["head"])
                model.load_state_dict(saved["adapters"], strict=False)
            else:
                split, head = self._train_stage1(model, options, pool, n, seed)
                adapters = {k: v for k, v in model.state_dict().items() if ".A." in k or ".B." in k}
                partial = path.with_suffix(".part")
                torch.save({"split": split, "head": head.state_dict(), "adapters": adapters}, partial)
                partial.replace(path)
        _STAGES.clear()  # one (n, seed) at a time: a model copy each is enough memory
        _STAGES[path] = Stage1(split, head, model)
        return _STAGES[path]

    @staticmethod
    def _train_stage1(model: nn.Module, options: Mapping[str, Any], pool: GlossPool, n: int, seed: int
                      ) -> tuple[list[tuple[int, ...]], nn.Linear]:
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed + 2)  # the head's initial values
        split = task_split(len(pool.names), options["tasks"], options["classes_per_task"], generator)
        union = tuple(c for classes in split for c in classes)
        labels = local_labels(pool.labels, union)
        rows = [pool.draw(n, generator, classes) for classes in split]
        features = mean_pool(last_states(pool, options["backbone"]), pool.mask)
        head = train_head(features, labels, torch.cat(rows), len(union), options, generator)
        for e, task_rows in enumerate(rows):
            train_adapter(model, head, pool, task_rows, labels, e, options, generator)
        return split, head


# This process's stage-1 results (one (n, seed) at a time).
_STAGES: dict[Any, Stage1] = {}
