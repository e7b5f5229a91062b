"""The experiments' tasks by name (an experiment file's ``task`` key)."""

from __future__ import annotations

from .active import ActiveAttention
from .continual import NorgaContinual
from .early_exit import EarlyExitTask
from .fusion import FuseIrregular, FuseMissing, HMoEGates
from .images import DeWiRecipe
from .phatgoose import PhatgooseRouting
from .tasks import PrefixSharing, Task

__all__ = ["TASKS"]

TASKS: dict[str, type[Task]] = {task.name: task for task in (
    PrefixSharing, NorgaContinual, ActiveAttention, FuseMissing, HMoEGates, FuseIrregular, DeWiRecipe,
    PhatgooseRouting, EarlyExitTask)}
