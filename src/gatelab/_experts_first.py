"""The linear softmax gate computed experts-first, (B, E, N): the one place its weights,
gradient and Hessian are written in PyTorch (the C kernel, ``fit/_fused.c``, mirrors it).
``LinearGate.q_derivatives`` and EM's fast kernel both use it. Experts-first because
reductions over a short last axis (E) are slow on a CPU, and because products over the
sample axis then become matmuls.

Shapes: B problems, E experts, N samples, P = 1 + D gate columns z = (1, x).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["outer", "combine", "max_over_experts", "softmax_experts_first", "gate_stats",
           "neg_hessian"]


def outer(z_BNP: Tensor) -> Tensor:
    """Row-wise outer products z_n z_n^T, flattened: (B, N, P*P). Built column by column:
    a broadcast product over two tiny trailing axes is several times slower."""
    p = z_BNP.shape[-1]
    return torch.stack([z_BNP[..., i] * z_BNP[..., j] for i in range(p) for j in range(p)], -1)


def combine(coef_BEK: Tensor, design_BKN: Tensor) -> Tensor:
    """coef @ design, (B, E, N). With few columns K, fused multiply-adds beat a batched
    matmul whose inner dimension is tiny."""
    if coef_BEK.shape[-1] > 4:
        return coef_BEK @ design_BKN
    out = coef_BEK[..., :1] * design_BKN[:, :1]
    for k in range(1, coef_BEK.shape[-1]):
        out.addcmul_(coef_BEK[..., k:k + 1], design_BKN[:, k:k + 1])
    return out


def max_over_experts(t_BEN: Tensor) -> Tensor:
    """max over the expert axis, (B, 1, N): pairwise maxima beat a reduction over a short
    middle axis."""
    top = t_BEN[:, :1].clone()
    for i in range(1, t_BEN.shape[1]):
        torch.maximum(top, t_BEN[:, i:i + 1], out=top)
    return top


def softmax_experts_first(s_BEN: Tensor) -> tuple[Tensor, Tensor]:
    """softmax over the expert axis of (B, E, N) scores, computed in place (``s_BEN`` is
    overwritten and returned), and its log-normaliser (B, 1, N)."""
    top = max_over_experts(s_BEN)
    ex = s_BEN.sub_(top).exp_()
    total = ex.sum(1, keepdim=True)
    return ex.div_(total), total.log_().add_(top)


def gate_stats(resp_BEN: Tensor, w_BEN: Tensor, z_BPN: Tensor, zz_BNK: Tensor):
    """The softmax gate's gradient and Hessian blocks over the free experts (all but the
    last), for responsibilities whose rows sum to 1: grad (B, E-1, P) = sum_n (r - w) z;
    diag (B, E-1, P, P) = sum_n w_i z z^T; cross (B, E-1, E-1, P, P) = sum_n w_i w_j z z^T,
    one zz column k at a time as (w * zz_k) @ w^T (no (E-1)^2 x N temporary)."""
    b, e, p = w_BEN.shape[0], w_BEN.shape[1], z_BPN.shape[1]
    w_m = w_BEN[:, :-1]
    grad = (resp_BEN[:, :-1] - w_m) @ z_BPN.transpose(-1, -2)
    diag = (w_m @ zz_BNK).unflatten(-1, (p, p))
    cross = torch.stack([(w_m * zz_BNK[:, None, :, k]) @ w_m.transpose(-1, -2)
                         for k in range(p * p)], -1)
    return grad, diag, cross.view(b, e - 1, e - 1, p, p)


def neg_hessian(diag_BEPP: Tensor, cross_BEEPP: Tensor) -> Tensor:
    """-Hessian of the softmax gate's Q over the free experts, ((E-1) P, (E-1) P) per
    problem, from diag_i = sum_n w_ni z_n z_n^T and cross_ij = sum_n w_ni w_nj z_n z_n^T:
    -H_(ip),(jq) = d_ij diag_i[p, q] - cross_ij[p, q]."""
    b, e, p, _ = diag_BEPP.shape
    eye = torch.eye(e, dtype=diag_BEPP.dtype, device=diag_BEPP.device)
    block_diag = diag_BEPP.unsqueeze(-2) * eye.view(1, e, 1, e, 1)          # (B, i, p, j, q)
    return (block_diag - cross_BEEPP.permute(0, 1, 3, 2, 4)).reshape(b, e * p, e * p)
