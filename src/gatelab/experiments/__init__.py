"""Deep-learning experiments on a real pre-trained model and real data: specs
(``Experiment``: a task, arms, sizes, seeds, paired claims), tasks, data and reports. They
run through the studies' runner and store (``gatelab reproduce NAME``)."""

from .spec import Arm, Experiment, PairedClaim

__all__ = ["Arm", "Experiment", "PairedClaim"]
