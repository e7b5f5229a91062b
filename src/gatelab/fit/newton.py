"""Batched second-order ascent on small parameter vectors.

Every routine works on a batch of independent problems: ``theta`` has shape (B, P) and
the objective maps (B, P) -> (B,), each entry depending on its own row only, so one
backward pass gives every row's gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Objective = Callable[[Tensor], Tensor]


def grad_and_hessian(objective: Objective, theta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Value (B,), gradient (B, P) and Hessian (B, P, P) of a row-separable objective,
    by reverse-over-reverse autograd (P extra backward passes; P is small here)."""
    with torch.enable_grad():
        t = theta.detach().requires_grad_(True)
        value = objective(t)
        (g,) = torch.autograd.grad(value.sum(), t, create_graph=True)
        rows = []
        for p in range(t.shape[-1]):
            (h,) = torch.autograd.grad(g[:, p].sum(), t, retain_graph=True, allow_unused=True)
            rows.append(torch.zeros_like(t) if h is None else h)
    return value.detach(), g.detach(), torch.stack(rows, dim=-2).detach()


def newton_direction(g: Tensor, neg_hess: Tensor, free: Tensor | None = None,
                     ridge: float = 1e-10) -> Tensor:
    """Solve (-H + ridge * scale * I) d = g for the ascent direction d: (B, P).

    The ridge (relative to the Hessian's diagonal) keeps singular Hessians solvable:
    over-specified mixtures and unidentified directions (e.g. A's antisymmetric part)
    make -H only semi-definite. Where -H is indefinite (far from a maximum) the
    eigenvalues are replaced by their absolute values (a modified Newton step, still an
    ascent direction). Rows with a non-finite gradient or Hessian do not move, nor do
    entries with ``free`` False.
    """
    eye = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
    finite = torch.isfinite(g).all(-1) & torch.isfinite(neg_hess).all((-1, -2))
    g = torch.where(finite.unsqueeze(-1), g, 0.0)
    neg_hess = torch.where(finite[:, None, None], neg_hess, eye)
    if free is not None:
        mask = free.to(g.dtype)
        g = g * mask
        neg_hess = neg_hess * mask.unsqueeze(-1) * mask.unsqueeze(-2) + torch.diag_embed(1 - mask)
    scale = neg_hess.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(1e-300)
    system = neg_hess + ridge * scale[..., None, None] * eye
    chol, info = torch.linalg.cholesky_ex(system)
    d = torch.cholesky_solve(g.unsqueeze(-1), chol).squeeze(-1)
    bad = info != 0
    if bool(bad.any()):
        evals, evecs = torch.linalg.eigh(system[bad])
        evals = evals.abs().clamp_min(ridge * scale[bad].unsqueeze(-1))
        coords = (evecs.transpose(-1, -2) @ g[bad].unsqueeze(-1)).squeeze(-1) / evals
        d = d.clone()
        d[bad] = (evecs @ coords.unsqueeze(-1)).squeeze(-1)
    return d


#: Ridges, relative to the mean |diagonal|, tried in turn for the softmax gate's Newton
#: system until it is positive definite (the C kernel, ``gate_direction`` in _fused.c, uses
#: the same ones). The softmax gate's -Hessian is positive semi-definite in exact
#: arithmetic; rounding makes it indefinite only near singularity (over-specified fits).
SOFTMAX_RIDGES = (1e-10, 1e-6, 1e-2, 1e2)


def ridged_direction(g: Tensor, neg_hess: Tensor) -> Tensor:
    """Solve (-H + r scale I) d = g for d (B, P), scale = mean |diag(-H)| (at least
    1e-300), with the first r in ``SOFTMAX_RIDGES`` for which Cholesky succeeds; d = 0
    where none does, or where g or -H is not finite. The one rule of the softmax gate's
    IRLS step, in PyTorch and in C."""
    eye = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
    scale = neg_hess.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(1e-300)
    pending = torch.isfinite(g).all(-1) & torch.isfinite(neg_hess).all((-1, -2))
    d = torch.zeros_like(g)
    for ridge in SOFTMAX_RIDGES:
        idx = pending.nonzero().squeeze(-1)
        if idx.numel() == 0:
            break
        chol, info = torch.linalg.cholesky_ex(neg_hess[idx] + ridge * scale[idx, None, None] * eye)
        ok = info == 0
        d[idx[ok]] = torch.cholesky_solve(g[idx[ok]].unsqueeze(-1), chol[ok]).squeeze(-1)
        pending[idx[ok]] = False
    return d


def halving_step(objective: Objective, theta: Tensor, direction: Tensor, value: Tensor,
                 max_halvings: int = 12, skip: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Move along ``direction`` with step 1, 1/2, 1/4, ... until the objective does not
    decrease; rows where no step helps keep ``theta``, as do rows in ``skip``. Returns
    (theta, value)."""
    best, best_val = theta, value
    done = torch.zeros(theta.shape[0], dtype=torch.bool, device=theta.device)
    if skip is not None:
        done = skip.clone()
        if bool(done.all()):
            return best, best_val
    step = torch.ones_like(value)
    for _ in range(max_halvings):
        cand = theta + step.unsqueeze(-1) * direction
        val = objective(cand)
        ok = ~done & torch.isfinite(val) & (val >= value)
        best = torch.where(ok.unsqueeze(-1), cand, best)
        best_val = torch.where(ok, val, best_val)
        done = done | ok
        if bool(done.all()):
            break
        step = torch.where(done, step, 0.5 * step)
    return best, best_val


def newton_ascent(objective: Objective, theta: Tensor, free: Tensor | None = None,
                  steps: int = 1) -> tuple[Tensor, Tensor]:
    """``steps`` (>= 1) damped Newton steps that never decrease the objective:
    (theta, value)."""
    value = None
    for _ in range(steps):
        value, g, hess = grad_and_hessian(objective, theta)
        direction = newton_direction(g, -hess, free)
        theta, value = halving_step(objective, theta, direction, value,
                                    skip=at_stationary_point(g, direction, value))
    assert value is not None, "steps must be >= 1"
    return theta, value


def at_stationary_point(g: Tensor, direction: Tensor, value: Tensor) -> Tensor:
    """Rows whose Newton step promises a gain (g . d / 2, exact for a quadratic) below
    the rounding error of the objective: a step there cannot be told from a loss, and
    trying every halving on it costs a dozen evaluations for nothing."""
    gain = 0.5 * (g * direction).sum(-1)
    return ~(gain > 1e-13 * value.abs().clamp_min(1.0))
