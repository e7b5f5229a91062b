"""An experiment's work units, as the studies' runner runs them: one unit per (arm, n,
seed index), its row keyed (experiment, arm, n, seed index) in the same store, so that a
killed run resumes without losing finished units and a changed spec is never answered
with old rows (``arm_hash``).

The seed of a run depends on (experiment seed, name, n, seed index) and not on the arm:
every arm of a seed trains on the same glosses in the same minibatch order, which is what
makes the claims' differences paired.
"""

from __future__ import annotations

import hashlib
import json
import time

from .. import __version__
from ..studies.runner import Unit, seed_for
from ..studies.store import FitRow
from .registry import TASKS
from .spec import Arm, Experiment

__all__ = ["arm_hash", "plan_runs", "run_experiment_unit", "PAIRED"]

#: The "setting" every arm's seed is drawn for (see the module docstring).
PAIRED = "paired"


def arm_hash(exp: Experiment, arm: Arm) -> str:
    """A hash of what makes one arm's rows: the experiment's seed, name, task (and its
    version) and options, and the arm's options."""
    task = TASKS[exp.task]
    options, arm_options = task.resolved(exp.options, arm.options)
    inputs = {"name": exp.name, "seed": exp.seed, "task": exp.task, "task_version": task.VERSION,
              "options": options, "arm": arm_options}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=repr).encode()).hexdigest()[:16]


def plan_runs(exp: Experiment, quick: bool = False, done: set | frozenset = frozenset()) -> list[Unit]:
    """The runs still to do, smallest n first, seed by seed (so that a partial run holds
    complete pairs early)."""
    sizes, seeds = exp.grid(quick)
    return [Unit(arm.name, n, (r,)) for n in sizes for r in range(seeds) for arm in exp.arms
            if (arm.name, n, r) not in done]


def prepare(exp: Experiment) -> None:
    """What all runs share, built once in the parent process (worker processes read it)."""
    TASKS[exp.task]().prepare(exp.options)


def run_experiment_unit(exp: Experiment, unit: Unit) -> list[FitRow]:
    """Train and evaluate one (arm, n, seed): one row, its metrics in ``blocks``."""
    arm = exp.arm(unit.setting)
    (replicate,) = unit.replicates
    seed = seed_for(exp, PAIRED, unit.n, replicate)  # type: ignore[arg-type]
    start = time.perf_counter()
    metrics = TASKS[exp.task]().run(exp.options, arm.options, unit.n, seed)
    seconds = time.perf_counter() - start
    main = metrics.get("accuracy", float("nan"))
    return [FitRow(exp.name, arm.name, unit.n, replicate, seed, loss=1 - main / 100, mass=0.0,
                   blocks=metrics, loglik=float("nan"), n_iter=0, converged=True, degenerate=False,
                   seconds=seconds, version=__version__, spec_hash=arm_hash(exp, arm), status="trained")]
