"""Deep-learning experiment specifications: a task, its arms, training sizes, seeds and
the paper's claims, as frozen dataclasses loaded from TOML (``kind = "experiment"`` in a
catalogue file).

Every (arm, n, seed) is one training run, a work unit of the same runner and store as the
statistical studies (``gatelab.studies.runner``): rows are keyed (experiment, arm, n,
seed index) and carry the run's metrics. A claim compares two arms over the same seeds
(a paired difference with its t interval), so it is written as data and decided by a rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..studies.spec import SpecError, _from_dict, _is_int, _key, _need, plain_data

__all__ = ["Arm", "PairedClaim", "Experiment", "PAIRED_RULES"]

PAIRED_RULES = {
    "ci_above": "the paired level CI lies above value",
    "ci_below": "the paired level CI lies below value",
    "ci_covers": "the paired level CI contains value",
    "at_least": "mean >= value and the paired level CI lies above value - margin",
}


@dataclass(frozen=True)
class Arm:
    """One configuration compared in an experiment (e.g. shared vs no-share prefixes)."""

    name: str = _key("the arm's name (rows and claims refer to it)")
    options: Mapping[str, Any] = _key("the task's arm options (e.g. prefix kind, gate)",
                                      factory=dict)
    _path: str = "arms"

    def __post_init__(self) -> None:
        _need(isinstance(self.name, str) and bool(self.name), f"{self._path}.name",
              "a non-empty string", self.name)


@dataclass(frozen=True)
class PairedClaim:
    """x = mean over seeds of metric(arm) - metric(minus) at training size ``n`` (with
    ``versus_n``: that difference at n minus the same difference at versus_n), in the
    metric's unit (accuracy in points), with its paired t interval; decided by ``rule``
    (``PAIRED_RULES``). Written before the runs it judges, not changed after them."""

    text: str = _key("the claim in words")
    arm: str = _key("the arm measured")
    minus: str = _key("the arm it is compared with, seed by seed")
    rule: str = _key(f"one of {', '.join(PAIRED_RULES)}")
    metric: str = _key("the metric compared (a key of the rows' metrics)", "accuracy")
    n: int | None = _key("the training size compared (default: the largest run)", None)
    versus_n: int | None = _key("another size: x = difference(n) - difference(versus_n)", None)
    value: float = _key("the number the rule compares with", 0.0)
    margin: float | None = _key("the margin of rule 'at_least'", None)
    level: float = _key("the interval's confidence level (e.g. 1 - 0.05/3 for a Bonferroni reading of "
                        "three comparisons)", 0.95)
    arxiv: str = _key("arXiv id of the paper that makes the claim (default: the experiment's)", "")
    _path: str = "claims"

    def __post_init__(self) -> None:
        p = self._path
        _need(isinstance(self.text, str) and bool(self.text), f"{p}.text", "a non-empty string",
              self.text)
        _need(self.rule in PAIRED_RULES, f"{p}.rule", f"one of {sorted(PAIRED_RULES)}", self.rule)
        _need(isinstance(self.value, (int, float)), f"{p}.value", "a number", self.value)
        _need(self.rule != "at_least" or isinstance(self.margin, (int, float)), f"{p}.margin",
              "a number for rule 'at_least'", self.margin)
        _need(isinstance(self.level, float) and 0.5 <= self.level < 1, f"{p}.level",
              "a confidence level in [0.5, 1)", self.level)


@dataclass(frozen=True)
class Experiment:
    """A deep-learning experiment: every (arm, n, seed) is one training run of ``task``."""

    name: str = _key("the experiment's name (rows and reports are filed under it)")
    task: str = _key("what one run does: a task of gatelab.experiments.registry.TASKS")
    arms: tuple[Arm, ...] = _key("the compared configurations: [[arms]] tables")
    sizes: tuple[int, ...] = _key("training sizes n (the task says per what, e.g. per class)")
    seeds: int = _key("seeds per (arm, n); a paired CI needs >= 5", 5)
    quick_sizes: tuple[int, ...] = _key("sizes of --quick runs (default: sizes)", ())
    quick_seeds: int = _key("seeds of --quick runs (at most seeds)", 5)
    seed: int = _key("the experiment's seed; each run's seed derives from it", 0)
    options: Mapping[str, Any] = _key("the task's options (steps, learning rate, data ...)", factory=dict)
    paper: str = _key("arXiv id of the paper", "")
    description: str = _key("one line on the experiment", "")
    notes: str = _key("free text shown in the report", "")
    claims: tuple[PairedClaim, ...] = _key("the paper's claims: [[claims]] tables", ())
    kind: str = _key('"experiment" (what tells an experiment file from a study file)', "experiment")

    def __post_init__(self) -> None:
        from .registry import TASKS
        _need(isinstance(self.name, str) and bool(self.name), "name", "a non-empty string", self.name)
        _need(self.task in TASKS, "task", f"one of {sorted(TASKS)}", self.task)
        names = [a.name for a in self.arms]
        _need(len(names) > 0 and len(set(names)) == len(names), "arms", "a non-empty list of uniquely "
              "named arms", names)
        for key, sizes in (("sizes", self.sizes), ("quick_sizes", self.quick_sizes)):
            _need(all(_is_int(n) for n in sizes), key, "a list of ints >= 1", sizes)
        _need(len(self.sizes) >= 1, "sizes", "at least one training size", self.sizes)
        _need(_is_int(self.seeds), "seeds", "an int >= 1", self.seeds)
        _need(_is_int(self.quick_seeds), "quick_seeds", "an int >= 1", self.quick_seeds)
        task = TASKS[self.task]
        task.check_options(self.options, "options")
        for i, arm in enumerate(self.arms):
            task.check_arm(arm.options, f"arms[{i}].options")
        for c in self.claims:
            for key in ("arm", "minus"):
                _need(getattr(c, key) in names, f"{c._path}.{key}", f"an arm ({', '.join(names)})",
                      getattr(c, key))
            for key in ("n", "versus_n"):
                size = getattr(c, key)
                _need(size is None or size in self.sizes, f"{c._path}.{key}",
                      f"one of the sizes {list(self.sizes)}", size)

    @property
    def settings(self) -> tuple[Arm, ...]:
        """The arms, under the name the runner and store give a study's settings."""
        return self.arms

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    def grid(self, quick: bool = False) -> tuple[tuple[int, ...], int]:
        """(training sizes, seeds) of the full or the quick run. A quick run's rows are
        rows of the full run (same options), so a full run afterwards only adds to them."""
        if quick:
            return (self.quick_sizes or self.sizes), min(self.quick_seeds, self.seeds)
        return self.sizes, self.seeds

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Experiment:
        """Build and validate an experiment from a mapping (e.g. parsed TOML)."""
        data = dict(data)
        for key in ("arms", "claims"):
            if not isinstance(data.get(key, []), list):
                raise SpecError(f"{key}: must be a list of tables ([[{key}]] in TOML).")
        data["arms"] = tuple(_from_dict(Arm, a, f"arms[{i}]") for i, a in enumerate(data.get("arms", [])))
        data["claims"] = tuple(_from_dict(PairedClaim, c, f"claims[{i}]")
                               for i, c in enumerate(data.get("claims", [])))
        for key in ("sizes", "quick_sizes"):
            if key in data:
                data[key] = tuple(data[key])
        return _from_dict(cls, data, "")

    def to_dict(self) -> dict:
        """A plain-data form (for the results store and reports)."""
        return plain_data(self)
