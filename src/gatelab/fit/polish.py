"""Certified convergence: damped Newton on every free parameter of the likelihood, until the
gradient is below a stated bound (reading (b) of the studies, issue 14).

EM and SQUAREM stop when the log-likelihood changes by less than a relative tolerance.
Over-specified fits crawl (the information is singular at the truth), so a run can stop
far from the maximum it is meant to measure. ``polish`` continues from where EM stopped
with Newton steps on all parameters at once, and reports the certificate

    grad_norm = || d/dtheta (1/N) sum_n log p(y_n | x_n; theta) ||_2

over the free entries theta (the gate's fixed reference entries excluded), with every
variance on the log scale and ``lam`` on the logit scale, so that the bound does not
depend on the units of y or on a boundary. Each Newton step is the modified step of
``newton.newton_direction`` (absolute eigenvalues, a small ridge) with step halving, so
the log-likelihood never decreases. For a dense softmax gate with experts linear in their
parameters the gradient and Hessian are in closed form: in C, one pass over the data per
step, where the fused kernel of EM is built (``SoftmaxLinearKernel.loglik_derivatives``),
else in PyTorch (``_softmax_linear_derivatives``); other models take autograd. A row
stops once its gradient is at or below
``bound``; rows still above after ``max_steps`` keep their certificate, so the caller can
see (and leave out) what did not converge. Gates that separate the data have no finite
maximum: there the slopes keep growing and the certificate is not met, or is met only as
the likelihood flattens; ``fit.status`` says "separated" for those. Gates whose weights
are not differentiable in their parameters (``Gate.differentiable``: a Laplace gate in one
covariate, top-K gates) cannot be certified this way; the studies refuse them.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import NamedTuple

import torch
from torch import Tensor

from ..params import Params
from .newton import grad_and_hessian, halving_step, newton_direction

__all__ = ["Polished", "polish", "free_masks", "gradient_norm", "DEFAULT_BOUND"]

#: Gradient bound of the certified reading: per-sample mean log-likelihood, 2-norm over
#: the free entries (log variances). At 1e-6 the remaining gain of a quadratic model of
#: the likelihood, g^2 / (2 curvature), is below 1e-12 per sample for any curvature above 1,
#: far below the sampling noise of every n the studies use.
DEFAULT_BOUND = 1e-6

#: Largest change of one free entry in one Newton step (log scale for variances).
MAX_MOVE = 2.0

#: Blocks optimised on another scale, (to, from): positive ones as logs, lam in (0, 1) as
#: a logit, so that no step leaves the domain and the bound does not depend on units.
_SCALES = {"var": (torch.log, torch.exp), "nu": (torch.log, torch.exp),
           "lam": (torch.logit, torch.sigmoid)}


class Polished(NamedTuple):
    """The polished fits, B rows: parameters, log-likelihood, the certificate
    ``grad_norm`` (see the module docstring), the log-likelihood ``gain`` over the start,
    and the Newton steps taken."""

    params: Params
    loglik: Tensor
    grad_norm: Tensor
    gain: Tensor
    steps: Tensor


def free_masks(model) -> dict[str, Tensor]:
    """Per block, the entries the likelihood depends on: all but the entries a gate fixes
    for identifiability (``Gate.free_mask``); for deviated and contaminated models, the
    trainable part's gate decides its blocks."""
    shapes = model.param_shapes()
    masks = {b: torch.ones(s, dtype=torch.bool) for b, s in shapes.items()}
    gate, k = getattr(model, "gate", None), getattr(model, "n_experts", None)
    if gate is None and hasattr(model, "trainable_part"):
        part = model.trainable_part()
        gate, k = part.gate, part.n_experts
    if gate is not None:
        masks.update({b: m for b, m in gate.free_mask(k, model.dim).items() if b in masks})
    return masks


class _Packing:
    """Free entries of a batch of parameters as one (B, P) tensor on the optimiser's scale,
    and back; the fixed entries are taken from ``base``."""

    def __init__(self, masks: dict[str, Tensor], base: Params) -> None:
        self.masks = {name: m.reshape(-1) for name, m in masks.items()}
        self.base = base

    def pack(self, params: Params) -> Tensor:
        return torch.cat([_forward(name, params[name]).reshape(params[name].shape[0], -1)[:, m]
                          for name, m in self.masks.items()], -1)

    def unpack(self, theta: Tensor) -> Params:
        out, offset = {}, 0
        for name, m in self.masks.items():
            count, base = int(m.sum()), self.base[name]
            flat = _forward(name, base).reshape(base.shape[0], -1).clone()
            flat[:, m] = theta[:, offset:offset + count]
            out[name] = _backward(name, flat.reshape(base.shape))
            offset += count
        return out

    def rows(self, idx: Tensor) -> _Packing:
        return _Packing(self.masks, {k: v[idx] for k, v in self.base.items()})


def _forward(name: str, v: Tensor) -> Tensor:
    return _SCALES[name][0](v) if name in _SCALES else v


def _backward(name: str, v: Tensor) -> Tensor:
    return _SCALES[name][1](v) if name in _SCALES else v


def gradient_norm(model, x: Tensor, y: Tensor, params: Params,
                  blocks: Collection[str] | None = None) -> Tensor:
    """The certificate of ``polish`` at ``params`` (B,), without moving them; with
    ``blocks``, over those blocks' free entries only (the rest held fixed)."""
    packing = _Packing(_masks(model, blocks), params)
    with torch.enable_grad():
        theta = packing.pack(params).detach().requires_grad_(True)
        value = model.log_likelihood(x, y, packing.unpack(theta))
        (g,) = torch.autograd.grad(value.sum(), theta)
    return g.norm(dim=-1) / x.shape[-2]


def _masks(model, blocks: Collection[str] | None) -> dict[str, Tensor]:
    """``free_masks``, with every block outside ``blocks`` (where given) held fixed."""
    masks = free_masks(model)
    if blocks is None:
        return masks
    return {b: m if b in blocks else torch.zeros_like(m) for b, m in masks.items()}


def _derivatives(model, x: Tensor, y: Tensor, packing: _Packing, rows: Tensor,
                 theta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Value, gradient and Hessian of the log-likelihood of rows ``rows`` in the packed
    free entries: in closed form for the dense softmax gate with experts linear in their
    parameters (``_softmax_linear_derivatives``), else by autograd."""
    if _closed_form(model):
        sub = packing.rows(rows)
        kernel = _fused_kernel(model, x[rows], y[rows])
        if kernel is None:
            return _softmax_linear_derivatives(model, x[rows], y[rows], sub.unpack(theta), sub)
        value, grad, hess = kernel.loglik_derivatives(sub.unpack(theta))
        order = _fused_order(model, packing)
        return value, grad[:, order], hess[:, order][:, :, order]
    return grad_and_hessian(_objective(model, x, y, packing, rows), theta)


def _fused_kernel(model, x: Tensor, y: Tensor):
    """The fused C kernel of EM over these rows where it is built (a C compiler, float64,
    at most 16 experts), for the closed-form derivatives in C; else None."""
    from . import _fused
    from .em.softmax_linear import _MAX_FUSED_EXPERTS, SoftmaxLinearKernel  # em imports this module

    # Checked first: without C, build() would lay out the PyTorch path's (B, N, ...) products.
    if _fused.load() is None or x.dtype != torch.float64 or model.n_experts > _MAX_FUSED_EXPERTS:
        return None
    return SoftmaxLinearKernel.build(model, x, y, x.new_zeros(x.shape[0]), fused=True)


def _fused_order(model, packing: _Packing) -> Tensor:
    """Where each packed free entry sits in the layout of ``loglik_derivatives``: expert i
    at i W (W = P + Q + 1): beta0, beta1 (P = 1 + d), b, a (Q = 1 + features), log var."""
    k, d, n_feat = model.n_experts, model.dim, model.param_shapes()["a"][-1]
    p, q = 1 + d, 1 + n_feat
    base = torch.arange(k) * (p + q + 1)
    places = {"beta0": base, "beta1": base[:, None] + 1 + torch.arange(d),
              "b": base + p, "a": base[:, None] + p + 1 + torch.arange(n_feat), "var": base + p + q}
    return torch.cat([places[name].reshape(-1)[m] for name, m in packing.masks.items()])


def _closed_form(model) -> bool:
    gate, expert = getattr(model, "gate", None), getattr(model, "expert", None)
    return (gate is not None and gate.is_linear_softmax() and expert is not None
            and expert.linear_in_params and set(model.noise_blocks()) == {"var"}
            and "a" in model.param_shapes())


def _softmax_linear_derivatives(model, x: Tensor, y: Tensor, params: Params, packing: _Packing,
                                chunk: int = 8192) -> tuple[Tensor, Tensor, Tensor]:
    """The log-likelihood l = sum_n log sum_i exp(u_ni), u_ni = log w_ni + log N(y_n | m_ni,
    v_i), w = softmax(s), s_ni = beta1_i . x_n + beta0_i, m_ni = a_i . f(x_n) + b_i, with
    its gradient and Hessian over the packed entries (log v_i for v_i). Per sample, in
    z = (s, m, log v) with r = softmax(u), e_i = (y - m_i) / v_i, h_i = -1/2 + (y - m_i)^2 / (2 v_i):

        du_i/ds_j = d_ij - w_j,  du_i/dm_i = e_i,  du_i/dlog v_i = h_i   (the matrix A),
        dl/dz = A^T r,   d2l/dz2 = A^T (diag r - r r^T) A + sum_i r_i d2u_i/dz2,

    where sum_i r_i d2u_i/dz2 has -(diag w - w w^T) on s, and -r_i / v_i, -r_i e_i and
    -r_i (h_i + 1/2) on (m_i, m_i), (m_i, log v_i) and (log v_i, log v_i). Every z is
    linear in the parameters through phi = (x, f(x), 1), so the Hessian is
    sum_n J_n^T (d2l/dz2) J_n, accumulated over chunks of samples: a few passes over the
    data instead of one backward pass per parameter."""
    k, d = model.n_experts, model.dim
    b1, b0, a, b = params["beta1"], params["beta0"], params["a"], params["b"]
    var = params["var"].unsqueeze(-2)
    n_feat = a.shape[-1]
    width, q = d + n_feat + 1, 3 * k
    batch = x.shape[0]
    eye = torch.eye(k, dtype=x.dtype)
    value = x.new_zeros(batch)
    grad = x.new_zeros(batch, q * width)
    hess = x.new_zeros(batch, q, width, q, width)
    flat = hess.view(batch, q * width, q * width)
    for lo in range(0, x.shape[-2], chunk):
        xc, yc = x[:, lo:lo + chunk], y[:, lo:lo + chunk]
        feats = model.expert.features(xc)
        phi = torch.cat([xc, feats, torch.ones_like(xc[..., :1])], -1)          # (B, n, L)
        log_w = torch.log_softmax(xc @ b1.transpose(-1, -2) + b0.unsqueeze(-2), -1)
        w = log_w.exp()
        res = yc.unsqueeze(-1) - (feats @ a.transpose(-1, -2) + b.unsqueeze(-2))
        e, h = res / var, res.square() / (2 * var) - 0.5
        u = log_w - 0.5 * (math.log(2 * math.pi) + var.log()) - res.square() / (2 * var)
        ll = torch.logsumexp(u, -1, keepdim=True)
        r = (u - ll).exp()                                                     # (B, n, k)
        value += ll.sum((-1, -2))
        amat = torch.cat([eye - w.unsqueeze(-2), torch.diag_embed(e), torch.diag_embed(h)], -1)
        # U_ni = du_ni/dtheta over the (z, phi) layout; sum_i r_i U_i U_i^T - G G^T is the
        # A^T (diag r - r r^T) A term, G = dl_n/dtheta.
        units = (amat.unsqueeze(-1) * phi[:, :, None, None, :]).flatten(-2)     # (B, n, k, QL)
        weighted = units * r.unsqueeze(-1)
        g_n = weighted.sum(-2)                                                 # (B, n, QL)
        grad += g_n.sum(1)
        flat += weighted.flatten(1, 2).transpose(-1, -2) @ units.flatten(1, 2)
        flat -= g_n.transpose(-1, -2) @ g_n
        # sum_i r_i d2u_i: the gate's -(diag w - w w^T) and the experts' diagonal terms.
        gate = (w.unsqueeze(-1) * phi.unsqueeze(-2)).flatten(-2)               # (B, n, kL)
        hess[:, :k, :, :k, :] += (gate.transpose(-1, -2) @ gate).view(batch, k, width, k, width)
        for i, block in enumerate(_grams(torch.stack([w, r / var, r * e, r * (h + 0.5)]), phi)):
            hess[:, i, :, i, :] -= block[0]
            hess[:, k + i, :, k + i, :] -= block[1]
            hess[:, k + i, :, 2 * k + i, :] -= block[2]
            hess[:, 2 * k + i, :, k + i, :] -= block[2]
            hess[:, 2 * k + i, :, 2 * k + i, :] -= block[3]
    order = _closed_form_order(model, packing, d, n_feat, width)
    grad_p = grad[:, order]
    hess_p = hess.flatten(3).flatten(1, 2)[:, order][:, :, order]
    return value, grad_p, hess_p


def _grams(weights: Tensor, phi: Tensor) -> list[Tensor]:
    """sum_n c_ni phi_n phi_n^T for every weight c (C, B, n, k) and expert i: a list over i
    of (C, B, L, L)."""
    c, batch, n, k = weights.shape
    width = phi.shape[-1]
    scaled = weights.permute(1, 0, 3, 2).unsqueeze(-1) * phi[:, None, None]  # (B, C, k, n, L)
    out = (scaled.transpose(-1, -2).reshape(batch, -1, n) @ phi).view(batch, c, k, width, width)
    return [out[:, :, i].transpose(0, 1) for i in range(k)]


def _closed_form_order(model, packing: _Packing, d: int, n_feat: int, width: int) -> Tensor:
    """Where each packed free entry sits in the (z, phi) layout of
    ``_softmax_linear_derivatives``: beta1[i, j] at (s_i, x_j), beta0[i] at (s_i, 1),
    a[i, j] at (m_i, f_j), b[i] at (m_i, 1), var[i] at (log v_i, 1)."""
    k, one = model.n_experts, width - 1
    experts = torch.arange(k)
    places = {"beta1": experts[:, None] * width + torch.arange(d),
              "beta0": experts * width + one,
              "a": (k + experts)[:, None] * width + d + torch.arange(n_feat),
              "b": (k + experts) * width + one,
              "var": (2 * k + experts) * width + one}
    return torch.cat([places[name].reshape(-1)[m] for name, m in packing.masks.items()])


def _capped(direction: Tensor) -> Tensor:
    """The step scaled down so that no entry moves by more than ``MAX_MOVE`` (a trust
    region: far from the maximum a Newton step can overshoot by orders of magnitude, and a
    log variance must not underflow)."""
    reach = direction.abs().amax(-1, keepdim=True).clamp_min(MAX_MOVE)
    return direction * (MAX_MOVE / reach)


def _objective(model, x: Tensor, y: Tensor, packing: _Packing, rows: Tensor):
    """The log-likelihood of rows ``rows`` as a function of their packed free entries."""
    sub, xa, ya = packing.rows(rows), x[rows], y[rows]
    kernel = _fused_kernel(model, xa, ya) if _closed_form(model) else None
    if kernel is not None:  # the same log-likelihood as _derivatives', so steps compare alike
        return lambda theta: kernel.loglik_derivatives(sub.unpack(theta), want=False)[0]
    return lambda theta: model.log_likelihood(xa, ya, sub.unpack(theta))


def polish(model, x: Tensor, y: Tensor, params: Params, bound: float = DEFAULT_BOUND,
           max_steps: int = 100, blocks: Collection[str] | None = None) -> Polished:
    """Newton steps from ``params`` (B rows; x (B, N, D), y (B, N)) until each row's
    gradient norm is <= ``bound`` or ``max_steps`` steps are done (module docstring).
    The log-likelihood never decreases; a row with nothing left to gain keeps its place.
    With ``blocks``, only those blocks move, and the certificate is over them."""
    if not bound > 0:
        raise ValueError(f"bound must be > 0, got {bound}: the gradient is 0 only in exact "
                         f"arithmetic (the default is {DEFAULT_BOUND}).")
    params = {k: v.detach().to(x.dtype) for k, v in params.items()}
    packing = _Packing(_masks(model, blocks), params)
    theta = packing.pack(params)
    steps = torch.zeros(theta.shape[0], dtype=torch.long)
    active = torch.arange(theta.shape[0])
    for _ in range(max_steps):
        val, g, hess = _derivatives(model, x, y, packing, active, theta[active])
        todo = g.norm(dim=-1) / x.shape[-2] > bound
        if not bool(todo.any()):
            break
        active, val, g, hess = active[todo], val[todo], g[todo], hess[todo]
        moved, _ = halving_step(_objective(model, x, y, packing, active), theta[active],
                                _capped(newton_direction(g, -hess)), val, max_halvings=30)
        stalled = (moved == theta[active]).all(-1)   # no step helps: rounding decides there
        theta[active] = moved
        steps[active] += 1
        active = active[~stalled]
        if active.numel() == 0:
            break
    final = packing.unpack(theta)
    start, value = model.log_likelihood(x, y, params), model.log_likelihood(x, y, final)
    return Polished(final, value, gradient_norm(model, x, y, final, blocks), value - start, steps)
