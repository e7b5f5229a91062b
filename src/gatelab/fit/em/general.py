"""The reference EM kernel: any gate, any expert, in the (B, N, E) layout of the models.
Its update is ``m_step`` then ``e_step``; m_step's parts never lower Q, so the
likelihood never decreases. With a gate ridge its "log-likelihood" is the penalised one,
l - (ridge / 2) ||beta1||^2, which is what then never decreases."""

from __future__ import annotations

from torch import Tensor

from ...models import GaussianMoE
from ...params import Params
from .gate_step import slope_penalty
from .kernel import FitResult, State, Step
from .steps import e_step, m_step

__all__ = ["GeneralKernel"]


class GeneralKernel:
    """``EMKernel`` for a Gaussian MoE with any gate and expert; state: (responsibilities,)."""

    def __init__(self, model: GaussianMoE, x: Tensor, y: Tensor, floor: Tensor, gate_steps: int,
                 gate_ridge: float = 0.0):
        self.model, self.x, self.y, self.floor, self.gate_steps = model, x, y, floor, gate_steps
        self.gate_ridge = gate_ridge

    def e_step(self, params: Params) -> tuple[Tensor, State]:
        ll, resp = e_step(self.model, self.x, self.y, params)
        return ll - slope_penalty(params, self.gate_ridge), (resp,)

    def m_step(self, resp_BNE: Tensor, params: Params) -> Params:
        return m_step(self.model, self.x, self.y, resp_BNE, params, self.floor, self.gate_steps,
                      self.gate_ridge)[0]

    def update(self, params: Params, state: State, loglik: Tensor) -> Step:
        new, degenerate = m_step(self.model, self.x, self.y, state[0], params, self.floor,
                                 self.gate_steps, self.gate_ridge)
        ll_new, state_new = self.e_step(new)
        return Step(new, ll_new, state_new, degenerate)

    def subset(self, idx: Tensor) -> GeneralKernel:
        return GeneralKernel(self.model, self.x[idx], self.y[idx], self.floor[idx],
                             self.gate_steps, self.gate_ridge)

    def plain_em(self, params: Params, tol: float, max_iter: int) -> FitResult | None:
        return None
