"""``norga-continual`` (arXiv 2405.14124): prefix-based continual learning on Split-WordNet.

The protocol follows HiDe-Prompt and NoRGa's task-specific prompts:

- the supersenses, in an order drawn per seed, are split into ``tasks`` tasks of
  ``classes_per_task`` classes; the tasks arrive one after the other;
- task t trains its own prefix in each prompted layer and its own linear head over its
  classes, on n glosses per class (one shared head trained with the other tasks' logits
  masked out is the same model); once task t ends, its prefix and head are frozen;
- nothing of a finished task's glosses is replayed: what is kept is its prefix, its head and
  the mean of each of its classes' frozen (prefix-free) MiniLM embeddings;
- at test time the task is inferred from those statistics: the nearest class mean (cosine)
  among the classes seen so far names the task, and the gloss is classified among that
  task's classes with that task's prefix and head.

Because the classes of different tasks are disjoint, a gloss is classified right in the
class-incremental setting exactly when its task is inferred right and its own task's prefix
and head classify it right: CIL accuracy = P(task right and within-task right). The prefix
gate (linear vs NoRGa) acts through the within-task part; the task inference, from the
frozen embedding, is the same for every arm of a seed. With frozen per-task prefixes the
task-incremental accuracy cannot forget, so forgetting is measured on CIL accuracy, which
falls as later tasks make the task inference harder.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..nn.backbone import PrefixTuned
from ..studies.spec import SpecError
from .tasks import Encoder, TextPrefixTask, encoder, gloss_data, predict, prefix_layers, train_classifier
from .text import model_for

__all__ = ["NorgaContinual", "task_split", "continual_scores", "infer_tasks"]

#: The supersenses of the gloss pool (those with >= 770 glosses).
SUPERSENSES = 20


def task_split(classes: int, tasks: int, per_task: int, generator: torch.Generator
               ) -> list[tuple[int, ...]]:
    """``tasks`` disjoint groups of ``per_task`` classes, in an order drawn with ``generator``."""
    if tasks * per_task > classes:
        raise ValueError(f"{tasks} tasks x {per_task} classes need {tasks * per_task} classes; the data "
                         f"has {classes}. Lower the options tasks or classes_per_task.")
    order = torch.randperm(classes, generator=generator).tolist()
    return [tuple(order[t * per_task:(t + 1) * per_task]) for t in range(tasks)]


def continual_scores(task_of: Tensor, inferred: Tensor, correct: Tensor) -> dict[str, float]:
    """Continual-learning metrics (points) of test glosses from tasks 0..T-1.

    ``task_of`` (R,): each gloss's task. ``inferred`` (T, R): the task inferred for it after
    task t (among tasks 0..t; rows of later tasks are ignored). ``correct`` (R,): whether its
    own task's prefix and head classify it right. With a_{t,j} the CIL accuracy on task j
    after task t, the mean of a_{T-1,j} over j (final average accuracy) is ``accuracy``,
    and forgetting = mean over j < T-1 of max_{j <= t < T-1} a_{t,j} - a_{T-1,j}
    (Chaudhry et al. 2018)."""
    tasks = inferred.shape[0]
    hit = (inferred == task_of) & correct  # (T, R)
    acc = torch.stack([torch.stack([hit[t, task_of == j].float().mean() for j in range(tasks)])
                       for t in range(tasks)]) * 100  # acc[t, j], meaningful for j <= t
    forgetting = [(acc[j:tasks - 1, j].max() - acc[-1, j]).item() for j in range(tasks - 1)]
    per_task = torch.stack([correct[task_of == j].float().mean() for j in range(tasks)]) * 100
    return {"accuracy": acc[-1].mean().item(), "til_accuracy": per_task.mean().item(),
            "forgetting": sum(forgetting) / len(forgetting) if forgetting else 0.0,
            "task_inference": (inferred[-1] == task_of).float().mean().item() * 100}


def infer_tasks(embeddings: Tensor, means: Sequence[Tensor]) -> Tensor:
    """(T, R): after each task t, the task of the class mean (among tasks 0..t) nearest in
    cosine to each embedding (R, d); ``means[t]`` holds task t's class means (C, d)."""
    sims = F.normalize(embeddings, dim=-1) @ F.normalize(torch.cat(list(means)), dim=-1).T
    per_task = len(means[0])
    return torch.stack([sims[:, :(t + 1) * per_task].argmax(-1) // per_task for t in range(len(means))])


@torch.no_grad()
def class_means(embed: Encoder, rows: Tensor, labels: Tensor, classes: int) -> Tensor:
    """(classes, d): the mean embedding of each class's rows (labels: local, per row)."""
    return torch.stack([embed(rows[labels == c]).mean(0) for c in range(classes)])


def local_labels(labels: Tensor, classes: Sequence[int]) -> Tensor:
    """Each row's index within ``classes`` (-1 for rows of other classes)."""
    lookup = torch.full((int(labels.max()) + 1,), -1, dtype=torch.long)
    lookup[list(classes)] = torch.arange(len(classes))
    return lookup[labels]


class NorgaContinual(TextPrefixTask):
    """Task-specific prefixes learned one task after another, the task inferred at test time
    (module docstring). Metrics (points): ``accuracy`` (class-incremental final average
    accuracy), ``til_accuracy`` (task-incremental, the oracle task), ``forgetting`` (of CIL
    accuracy) and ``task_inference``. n is the number of training glosses per class."""

    name = "norga-continual"
    OPTIONS: ClassVar[dict[str, Any]] = {**TextPrefixTask.OPTIONS, "tasks": 5, "classes_per_task": 4,
                                         "batch": 16, "min_steps": 32}
    ARM_OPTIONS: ClassVar[dict[str, Any]] = {**TextPrefixTask.ARM_OPTIONS, "kind": "no-share"}

    @classmethod
    def check_options(cls, options: Mapping[str, Any], path: str) -> None:
        super().check_options(options, path)
        tasks, per_task = ({**cls.OPTIONS, **options}[k] for k in ("tasks", "classes_per_task"))
        if not (isinstance(tasks, int) and isinstance(per_task, int) and tasks >= 1 and per_task >= 1
                and tasks * per_task <= SUPERSENSES):
            raise SpecError(f"{path}: tasks x classes_per_task must be ints >= 1 with a product <= "
                            f"{SUPERSENSES} (the supersenses of the data); got {tasks} x {per_task}.")

    def run(self, options: Mapping[str, Any], arm: Mapping[str, Any], n: int, seed: int) -> dict[str, float]:
        options, arm = self.resolved(options, arm)
        pool, states, start = gloss_data(options)
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # the prefix tables' and the heads' initial values
        split = task_split(len(pool.names), options["tasks"], options["classes_per_task"], generator)
        backbone, hidden = model_for(options["backbone"]), states.shape[-1]
        frozen = encoder(PrefixTuned(backbone, {}), start, states, pool.mask)
        started = time.perf_counter()
        means, tests, correct = [], [], []
        for classes in split:
            local = local_labels(pool.labels, classes)
            rows = pool.draw(n, generator, classes)
            model = PrefixTuned(backbone, prefix_layers(arm, options["layers"], hidden))
            encode = encoder(model, start, states, pool.mask)
            head = train_classifier(encode, model, rows, local, len(classes), hidden, options, generator)
            model.requires_grad_(False)
            means.append(class_means(frozen, rows, local[rows], len(classes)))
            test = pool.test_rows(classes)
            tests.append(test)
            correct.append(predict(encode, head, test).argmax(-1) == local[test])
        test = torch.cat(tests)
        task_of = torch.cat([torch.full((len(t),), i) for i, t in enumerate(tests)])
        with torch.no_grad():
            inferred = infer_tasks(frozen(test), means)
        scores = continual_scores(task_of, inferred, torch.cat(correct))
        return {**scores, "seconds": time.perf_counter() - started}
