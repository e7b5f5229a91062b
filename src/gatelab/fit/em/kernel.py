"""What an EM kernel is: the one typed interface the fitting loop (``loop.run_em``), the
starts (``fit.init``) and SQUAREM talk to, and the result every EM fit returns.

A kernel holds B problems (data, variance floors, options) and offers
- ``e_step(params) -> (loglik (B,), state)``: the state is a tuple of tensors with the
  batch axis first, whatever the kernel needs for its next update (responsibilities, or
  sufficient statistics);
- ``update(params, state, loglik) -> Step``: one EM update that never lowers the
  log-likelihood, with the new E-step already done;
- ``m_step(resp, params) -> params``: one M-step from given responsibilities (starts);
- ``subset(idx)``: the same kernel on rows ``idx`` (finished problems leave the batch);
- ``plain_em(params, tol, max_iter)``: the kernel's own loop for plain EM, or None where
  it has none (then ``run_em`` iterates ``update``).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from ...params import Params

__all__ = ["EMKernel", "FitResult", "State", "Step", "rows", "set_rows", "where_rows"]

#: A kernel's state between E-step and update: tensors with the batch axis first.
State = tuple[Tensor, ...]


class FitResult(NamedTuple):
    """Fitted parameters and diagnostics, one entry per problem in the batch."""

    params: Params
    loglik: Tensor       # (*batch,) final log-likelihood
    n_iter: Tensor       # (*batch,) EM updates done
    converged: Tensor    # (*batch,) bool: stopped on the tolerance, not on max_iter
    degenerate: Tensor   # (*batch,) bool: a variance was floored or an expert emptied
    status: Tensor | None = None   # (*batch,) int8 ``FitStatus`` codes (see ``fit.status``)
    history: Tensor | None = None  # (*batch, max_iter + 1) log-likelihood trace, NaN-padded


class Step(NamedTuple):
    """One EM update's outcome, B rows: new parameters, their log-likelihood and state,
    and whether a variance was floored or an expert emptied on the way."""

    params: Params
    loglik: Tensor
    state: State
    degenerate: Tensor


class EMKernel(Protocol):
    """The steps of EM for one model family over B problems (see the module docstring)."""

    floor: Tensor  # (B,) variance floors

    def e_step(self, params: Params) -> tuple[Tensor, State]: ...

    def update(self, params: Params, state: State, loglik: Tensor) -> Step: ...

    def m_step(self, resp_BNE: Tensor, params: Params) -> Params: ...

    def subset(self, idx: Tensor) -> EMKernel: ...

    def plain_em(self, params: Params, tol: float, max_iter: int) -> FitResult | None: ...


def rows(state: State, idx: Tensor) -> State:
    """Rows ``idx`` of every tensor of a state."""
    return tuple(t[idx] for t in state)


def where_rows(mask: Tensor, a: State, b: State) -> State:
    """Row-wise choice between two states: ``a`` where ``mask`` (B,), else ``b``."""
    return tuple(torch.where(mask.view(-1, *[1] * (u.dim() - 1)), u, v) for u, v in zip(a, b))


def set_rows(state: State, idx: Tensor, value: State) -> None:
    """Write ``value`` into rows ``idx`` of a state, in place."""
    for t, v in zip(state, value):
        t[idx] = v
