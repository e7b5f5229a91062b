"""Batched EM for the Gaussian MoE and the models with a known part (maximum likelihood).

One call fits B problems at once (replicates x restarts flattened into one batch
axis): every E- and M-step is a tensor program over (B, N, E), and a problem that has
converged leaves the batch, so the others do not pay for it.

E-step: responsibilities r_ni = w_i(x_n) N(y_n | h_i(x_n), var_i) / p(y_n | x_n) in log
space. M-step: an ECM/GEM step whose parts never lower the expected log-likelihood Q
(``steps`` for experts and variances, ``gate_step`` for the gate). Limitation: with
top-K gates the gate step cannot move the selection boundaries (a sample whose kept
experts change gets Q = -inf, so halving refuses the step); fits keep the selection
regions of their start. Top-1 from a flat start never moves its gate.

The package, one concept a module:
- ``kernel``: the ``EMKernel`` protocol every kernel follows, ``FitResult``, ``Step``;
- ``steps``: the E-step and the experts' and variances' M-step (reference layout);
- ``gate_step``: the gate's M-step (closed-form derivatives from the gate, or autograd);
- ``general``: the reference kernel (any gate, any expert);
- ``softmax_linear``: the fast kernel (dense softmax gate, linear experts; C or PyTorch);
- ``known``: the kernel for deviated and contaminated MoEs;
- ``loop``: ``fit_em``, SQUAREM, ``KERNELS`` (the kernel for a model class), ``select_best``.
Tests check that the kernels agree.

Shape legend: B problems, N samples, D features, E experts, P parameters.
"""

from .gate_step import check_gate_ridge, expected_log, gate_q, gate_update, slope_penalty
from .kernel import EMKernel, FitResult, Step
from .known import KnownPartKernel, trainable_part
from .loop import ENGINES, KERNELS, broadcast_problem, fit_em, make_kernel, select_best, shaped
from .steps import e_step, m_step

__all__ = ["FitResult", "EMKernel", "Step", "fit_em", "select_best", "e_step", "m_step",
           "gate_update", "gate_q", "expected_log", "slope_penalty", "check_gate_ridge",
           "ENGINES", "KERNELS", "make_kernel", "broadcast_problem", "shaped",
           "KnownPartKernel", "trainable_part"]
