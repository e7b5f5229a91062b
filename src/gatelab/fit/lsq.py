"""Least squares for MoE regression by batched Levenberg-Marquardt.

Minimises RSS(theta) = sum_n (y_n - f(x_n; theta))^2 with f(x) = sum_i w_i(x) h(x; eta_i)
(arXiv 2402.02952, 2405.13997, 2405.14131) for any gate and expert. The parameters are
few (tens), so a second-order method pays: each iteration forms the Jacobian J (B, N, P)
a chunk of samples at a time (``_Problem.normal_equations``), from the model's
``mean_jacobian`` where it has one (MoE regression's takes one forward-mode pass per entry
of an expert's row for all experts at once, 4-6x faster whole fits than one pass per free
parameter, the fallback; ``benchmarks/lsq_jacobian.py``), and solves
(J^T J + lam diag(J^T J)) d = -J^T r (Marquardt's scaling). A step is kept only where
it lowers the RSS; there lam shrinks 10x, elsewhere it grows 10x and the row stays put,
so the RSS never increases. ``benchmarks/lsq_methods.py`` compares it with Adam and
L-BFGS on the same problems. The noise variance is estimated at the end as RSS / N.

Shape legend: B problems, N samples, P free parameters.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from .._checks import check_int, check_positive
from .._runtime import keep_freed_memory
from .._threads import threads_for, using_threads
from ..models import Regression
from ..params import Params, Shapes, pack, unpack
from .polish import free_masks
from .status import fit_status

__all__ = ["LSQResult", "fit_lsq", "profile_loglik", "rss_gradient_norm"]


def profile_loglik(rss: Tensor, n: int) -> Tensor:
    """The Gaussian log-likelihood at the least-squares fit with its MLE noise variance
    RSS / n: -n/2 (log(2 pi RSS / n) + 1)."""
    return -0.5 * n * (torch.log(2 * torch.pi * rss / n) + 1)


class LSQResult(NamedTuple):
    """Least-squares fits, one entry per problem in the batch."""

    params: Params       # includes nu = RSS / N
    rss: Tensor          # (*batch,)
    n_iter: Tensor       # (*batch,)
    converged: Tensor    # (*batch,) bool
    status: Tensor | None = None   # (*batch,) int8 ``FitStatus`` codes (see ``fit.status``)
    history: Tensor | None = None  # (*batch, max_iter + 1) RSS trace, NaN-padded


class _Problem:
    """The residual function of a batch of problems over their free parameters."""

    def __init__(self, model: Regression, x: Tensor, y: Tensor, params: Params) -> None:
        self.model, self.x, self.y = model, x, y
        self.shapes: Shapes = {k: v for k, v in model.param_shapes().items() if k != "nu"}
        b = x.shape[0]
        masks = {k: m for k, m in free_masks(model).items() if k in self.shapes}
        self.free = pack({k: m.expand(b, *m.shape) for k, m in masks.items()}, self.shapes)[0]
        self.full = pack({k: params[k] for k in self.shapes}, self.shapes)

    def subset(self, idx: Tensor) -> _Problem:
        """The problems ``idx`` (rows of the batch)."""
        return self._copy(x=self.x[idx], y=self.y[idx], full=self.full[idx])

    def _copy(self, **fields: Tensor) -> _Problem:
        new = object.__new__(_Problem)
        new.__dict__.update({**self.__dict__, **fields})
        return new

    def params(self, theta: Tensor) -> Params:
        """All blocks, with the free entries taken from ``theta`` (B, P)."""
        rows = torch.arange(self.full.shape[0]).unsqueeze(-1)
        cols = self.free.nonzero().squeeze(-1).unsqueeze(0)
        return unpack(self.full.to(theta.dtype).index_put((rows, cols), theta), self.shapes)

    def residuals(self, theta: Tensor) -> Tensor:
        return self.y - self.model._regression(self.x, self.params(theta))

    def theta(self) -> Tensor:
        return self.full[:, self.free]

    def jacobian(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """Residuals (B, N) and their Jacobian (B, N, P): the model's own where it gives
        one (``mean_jacobian``; it may decline with None), else one forward-mode pass per
        column."""
        closed = getattr(self.model, "mean_jacobian", None)
        structured = closed(self.x, self.params(theta)) if closed is not None else None
        if structured is not None:
            f, jac = structured
            return self.y - f, -jac[..., self.free]
        cols: list[Tensor] = []
        r: Tensor | None = None
        eye = torch.eye(theta.shape[-1], dtype=theta.dtype)
        for p in range(theta.shape[-1]):
            with fwAD.dual_level():
                dual = fwAD.make_dual(theta, eye[p].expand_as(theta))
                out = fwAD.unpack_dual(self.residuals(dual))
                r = out.primal if r is None else r   # the residuals, from the first pass
                cols.append(out.tangent)
        assert r is not None, "a problem has at least one free parameter"
        return r, torch.stack(cols, dim=-1)

    def normal_equations(self, theta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The RSS (B,), J^T J (B, P, P) and g = J^T r (B, P) at ``theta``, summed over
        chunks of the samples: the Jacobian of a whole batch is hundreds of MB, which
        chunks of ``_CHUNK_ELEMENTS`` keep out of memory (the allocator reuses them; see
        ``_runtime.keep_freed_memory``, without which each fresh allocation cost page
        faults, 25% of a full least-squares study's CPU time)."""
        n = self.x.shape[-2]
        width = sum(math.prod(shape) for shape in self.shapes.values())
        per = max(1, _CHUNK_ELEMENTS // (theta.shape[0] * width))
        rss = theta.new_zeros(theta.shape[0])
        jtj = theta.new_zeros(theta.shape[0], theta.shape[1], theta.shape[1])
        grad = theta.new_zeros(theta.shape)
        for lo in range(0, n, per):
            part = self._copy(x=self.x[:, lo:lo + per], y=self.y[:, lo:lo + per])
            r, jac = part.jacobian(theta)
            rss += r.square().sum(-1)
            jtj += jac.transpose(-1, -2) @ jac
            grad += (jac.transpose(-1, -2) @ r.unsqueeze(-1)).squeeze(-1)
        return rss, jtj, grad


#: Jacobian entries (B x chunk x parameters) per chunk of ``_Problem.normal_equations``
#: (32 MB): large enough that the per-chunk passes cost little, small beside a study's
#: batch.
_CHUNK_ELEMENTS = 1 << 22


@torch.no_grad()
def rss_gradient_norm(model: Regression, x: Tensor, y: Tensor, params: Params) -> Tensor:
    """The stationarity of least-squares fits (B,): the 2-norm over the free mean
    parameters of the gradient of the mean squared residual,

        || d/dtheta (1/N) sum_n (y_n - f(x_n; theta))^2 || = (2/N) || J^T r ||,

    the least-squares counterpart of ``fit.polish``'s certificate (0 at a stationary
    point; x (B, N, D), y (B, N), blocks (B, ...))."""
    problem = _Problem(model, x, y, params)
    _, _, grad = problem.normal_equations(problem.theta())
    return _certificate(grad, x.shape[-2])


def _certificate(grad: Tensor, n: int) -> Tensor:
    """(2/N) ||J^T r|| from g = J^T r: the gradient norm of the mean squared residual."""
    return 2 * grad.norm(dim=-1) / n


def _lm_step(problem: _Problem, theta: Tensor,
             lam: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The damped Gauss-Newton step, the current RSS, the decrease of the RSS that the
    undamped Gauss-Newton model predicts, g^T (J^T J)^+ g with g = J^T r (a stopping
    measure that does not depend on the damping), and the certificate (2/N) ||g||
    (``rss_gradient_norm``) at ``theta``."""
    rss, jtj, grad = problem.normal_equations(theta)
    diag = jtj.diagonal(dim1=-2, dim2=-1)
    scale = diag.mean(-1, keepdim=True).clamp_min(1e-300)
    damping = lam.unsqueeze(-1) * (diag + 1e-12 * scale)
    system = jtj + torch.diag_embed(damping)
    step = -torch.linalg.lstsq(system, grad.unsqueeze(-1)).solution.squeeze(-1)
    ridge = torch.diag_embed((1e-12 * scale).expand_as(diag))
    gn = torch.linalg.lstsq(jtj + ridge, grad.unsqueeze(-1)).solution.squeeze(-1)
    return step, rss, (gn * grad).sum(-1), _certificate(grad, problem.x.shape[-2])


@torch.no_grad()
def fit_lsq(model: Regression, x: Tensor, y: Tensor, init: Params, *, tol: float = 1e-8,
            max_iter: int = 500, lam0: float = 1e-3, record: bool = False,
            grad_bound: float | None = None) -> LSQResult:
    """Least-squares fit of an MoE regression from ``init``, batched over its leading
    dimensions (as ``fit_em``). Each problem stops when even an undamped Gauss-Newton step
    is predicted to lower the RSS by a relative ``tol`` or less, or when a lightly damped
    step (lam <= 1) lowered it by a relative ``tol`` or less (heavily damped steps are
    short by construction, so their small decrease says nothing), or after ``max_iter``.
    With ``grad_bound``, a problem stops instead when its certificate ``rss_gradient_norm``
    is at most the bound (converged), or when no damping finds a lower RSS, or after
    ``max_iter`` (not converged): the certified reading of least-squares studies.
    Each fit has a ``status`` (``gatelab.fit.status``); ``degenerate`` there means
    RSS / N <= ``VARIANCE_COLLAPSE`` Var(y), a fit through the points."""
    from .em import broadcast_problem, shaped
    check_positive("tol", tol)
    if grad_bound is not None:
        check_positive("grad_bound", grad_bound)
    check_int("max_iter", max_iter, 1)
    x, y, params, lead = broadcast_problem(model, x, y, init)
    start = model.normalise(params)
    keep_freed_memory()
    with using_threads(threads_for(y.numel() * model.n_experts)):
        res = _run_lsq(_Problem(model, x, y, start), tol, max_iter, lam0, record, grad_bound)
        status = fit_status(model, x, y, start, res.params, res.converged,
                            torch.zeros_like(res.converged))
    return shaped(res._replace(status=status), lead)


def _run_lsq(problem: _Problem, tol: float, max_iter: int, lam0: float,
             record: bool, grad_bound: float | None = None) -> LSQResult:
    """The Levenberg-Marquardt loop of ``fit_lsq`` over the problem's B rows (a flat
    result without its status)."""
    theta = problem.theta()
    b = theta.shape[0]
    lam = torch.full((b,), lam0, dtype=theta.dtype)
    rss = problem.residuals(theta).square().sum(-1)
    n_iter = torch.zeros(b, dtype=torch.long)
    converged = torch.zeros(b, dtype=torch.bool)
    history = rss.new_full((b, max_iter + 1), float("nan")) if record else None
    if history is not None:
        history[:, 0] = rss
    active = torch.ones(b, dtype=torch.bool)
    for it in range(1, max_iter + 1):
        idx = active.nonzero().squeeze(-1)
        if idx.numel() == 0:
            break
        sub = problem.subset(idx) if idx.numel() < b else problem
        step, old, predicted, grad_norm = _lm_step(sub, theta[idx], lam[idx])
        certified = grad_norm <= grad_bound if grad_bound is not None else None
        cand = theta[idx] + step
        new = sub.residuals(cand).square().sum(-1)
        better = torch.isfinite(new) & (new < old)
        if certified is not None:   # the certificate holds where the row stands: stay
            better &= ~certified
        light = lam[idx] <= 1.0   # the step was close to Gauss-Newton's
        theta[idx] = torch.where(better.unsqueeze(-1), cand, theta[idx])
        rss[idx] = torch.where(better, new, old)
        lam[idx] = torch.where(better, lam[idx] / 10, lam[idx] * 10).clamp(1e-12, 1e12)
        n_iter[idx] = it
        if certified is None:
            stalled = better & light & ((old - new) <= tol * old)
            done = (predicted <= tol * old) | stalled | (lam[idx] >= 1e12) | (old == 0)
            converged[idx] |= done
        else:
            converged[idx] |= certified | (old == 0)
            done = certified | (lam[idx] >= 1e12) | (old == 0)
        active[idx] &= ~done
        if history is not None:
            history[idx, it] = rss[idx]
    fitted = problem.params(theta)
    fitted["nu"] = (rss / problem.y.shape[-1]).clamp_min(torch.finfo(rss.dtype).tiny)
    return LSQResult(fitted, rss, n_iter, converged, history=history)
