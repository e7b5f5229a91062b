"""Attention as a mixture of experts (arXiv 2405.14124, 2410.11222).

Row i of a head's attention is an MoE: the experts are the value rows v_j (linear in the
tokens), the gate is a softmax over the quadratic scores q_i . k_j / sqrt(d_h) (quadratic
monomials of the token sequence). Prefix tuning adds P experts: prefix value rows whose
gate scores s_p(q_i) are linear in the query, or any other prefix score gate
(``gatelab.nn.prefix.PrefixScore``: NoRGa, Laplace, ...):

    out_i = sum_j softmax_j([s_1(q_i) .. s_P(q_i), q_i . k_1 * c + m_i1, ..]) act([V_p; V])_j

with c = 1/sqrt(d_h), m the additive padding mask and ``act`` the identity, or a
non-linearity for active attention (arXiv 2410.11222: softmax(Q K^T / sqrt(d)) act(V)).

``moe_attention`` is the fast path. With no prefix it is the host's own
``scaled_dot_product_attention``. With a prefix, the softmax over [prefix; tokens] is two
softmaxes joined by their log-sum-exps (``_PrefixMixture``): the tokens in the fused flash
kernel, forward and backward, the prefix columns, (T, P), in plain torch with whatever
gate scored them. No (T, P + S) matrix is built, and a prefix gate costs only its own
(T, P) scores. ``explicit_moe`` spells the same thing out as gate
weights and experts; it is the reference the fast path is tested against.

Shape legend: B batch, H heads, T queries, S keys, P prefix rows, D head size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import choose

__all__ = ["VALUE_ACTIVATIONS", "PrefixGate", "linear_scores", "moe_attention", "explicit_moe",
           "additive_mask", "value_activation"]

#: Value activations for active attention (arXiv 2410.11222); "identity" is plain attention.
VALUE_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda v: v, "relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh,
}


def additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A mask as an additive float bias: boolean masks (True = attend) become 0 / -inf,
    float masks (already additive, as transformers' eager masks are) are cast to ``dtype``."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def value_activation(value_act: str) -> Callable[[Tensor], Tensor]:
    """The ``VALUE_ACTIVATIONS`` entry of that name (an unknown name: ValueError naming the valid ones)."""
    return choose("value activation", value_act, VALUE_ACTIVATIONS)


def _with_prefix(prefix: Tensor, tokens: Tensor) -> Tensor:
    """[prefix rows; token rows] along the key axis; prefix (H, P, D) or (B, H, P, D)."""
    B, H = tokens.shape[:2]
    return torch.cat([prefix.expand(B, H, *prefix.shape[-2:]), tokens], -2)


#: A prefix gate: (queries (..., N, D), prefix keys (..., P, D), scale c) -> scores (..., N, P).
PrefixGate = Callable[[Tensor, Tensor, float], Tensor]


def linear_scores(q: Tensor, keys: Tensor, scale: float) -> Tensor:
    """Plain prefix tuning's gate: s_p(q) = c q . k_p."""
    return q @ keys.transpose(-1, -2) * scale


def _rows(x: Tensor) -> Tensor:
    """(B, H, T, X) -> (H, B T, X): one matrix per head, so that products with the shared
    prefix tables are H large GEMMs instead of B H tiny ones (which CPUs run slowly)."""
    B, H, T, X = x.shape
    return x.transpose(0, 1).reshape(H, B * T, X)


def _unrows(x: Tensor, B: int) -> Tensor:
    H, N, X = x.shape
    return x.view(H, B, N // B, X).transpose(0, 1)


class _PrefixMixture(torch.autograd.Function):
    """softmax over [prefix scores s_p, token scores q K^T c + m] applied to [V_p; V].

    The tokens go through the CPU flash kernel, which returns their output O_t and
    log-sum-exp l_t; the P prefix columns are small. With l = logaddexp(l_t, logsumexp(s_p))
    and a = exp(l_t - l), out = a O_t + exp(s_p - l) V_p.

    Backward: the full softmax's score gradient is dS_ij = W_ij (dO_i . v_j - dO_i . out_i),
    W the full weights. On the token columns W = a A (A the tokens' own softmax), so the
    flash kernel's backward, given the gradient a dO, the full output ``out`` (which it uses
    only for dO . out) and l_t, returns exactly the gradients of q, K and V. The prefix
    columns' dS and dV_p are formed directly. No (T, P + S) matrix is built.
    Prefix tensors are head-major rows (``_rows``): scores (H, B T, P), values (H, P, D)."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float,
                prefix_v: Tensor, scores: Tensor) -> Tensor:
        B = q.shape[0]
        out_t, lse_t = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=mask, scale=scale)[:2]
        lse = torch.logaddexp(_rows(lse_t.unsqueeze(-1)), scores.logsumexp(-1, keepdim=True))
        weights_p = torch.exp(scores - lse)
        share = torch.exp(_rows(lse_t.unsqueeze(-1)) - lse)
        out = torch.addcmul(_unrows(weights_p @ prefix_v, B), _unrows(share, B), out_t)
        ctx.save_for_backward(q, k, v, mask, out, lse_t, share, prefix_v, weights_p)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, mask, out, lse_t, share, prefix_v, weights_p = ctx.saved_tensors
        B = q.shape[0]
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            (_unrows(share, B) * grad_out).contiguous(), q, k, v, out, lse_t, 0.0, False,
            attn_mask=mask, scale=ctx.scale)
        grad_rows = _rows(grad_out)
        row = _rows(torch.linalg.vecdot(grad_out, out).unsqueeze(-1))
        g_scores = weights_p * (grad_rows @ prefix_v.transpose(-1, -2) - row)
        g_prefix_v = weights_p.transpose(-1, -2) @ grad_rows
        return gq, gk, gv, None, None, g_prefix_v, g_scores


def moe_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, *,
                  scale: float | None = None, prefix_k: Tensor | None = None,
                  prefix_v: Tensor | None = None, prefix_gate: PrefixGate = linear_scores,
                  value_act: str = "identity", dropout: float = 0.0) -> Tensor:
    """Attention of q (B, H, T, D) over [prefix; tokens], as in the module docstring.

    ``mask``: boolean (True = attend) or additive, broadcastable to (B, H, T, S).
    ``prefix_k``, ``prefix_v``: (H, P, D) prefix experts, P >= 0.
    ``prefix_gate(q, prefix_k, c)``: the prefix scores s_p(q) for queries of any leading
    shape (a ``gatelab.nn.prefix.PrefixScore``, or the linear default). Returns (B, H, T, D)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    act = value_activation(value_act)
    v = act(v)
    mask = additive_mask(mask, q.dtype)
    if prefix_k is None or prefix_v is None or prefix_k.shape[-2] == 0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)
    prefix_v = act(prefix_v)
    if prefix_k.dim() != 3 or prefix_v.dim() != 3:
        raise ValueError(f"Prefix keys and values are (heads, rows, head size); got {tuple(prefix_k.shape)} "
                         f"and {tuple(prefix_v.shape)}.")
    if prefix_gate is linear_scores:
        # Linear prefix scores are plain keys: one fused kernel over [prefix; tokens].
        B, T, S = q.shape[0], q.shape[2], k.shape[-2]
        right = q.new_zeros(()).expand(B, 1, T, S) if mask is None else mask.expand(B, -1, T, S)
        bias = torch.cat([q.new_zeros(()).expand(*right.shape[:-1], prefix_k.shape[-2]), right], -1)
        return F.scaled_dot_product_attention(q, _with_prefix(prefix_k, k), _with_prefix(prefix_v, v),
                                              attn_mask=bias, dropout_p=dropout, scale=scale)
    if q.device.type == "cpu" and dropout == 0.0:
        scores = prefix_gate(_rows(q), prefix_k, scale)
        return _PrefixMixture.apply(q, k, v, mask, scale, prefix_v, scores)
    bias = prefix_gate(q, prefix_k, scale) - linear_scores(q, prefix_k, scale)
    return _one_kernel(q, k, v, mask, scale, prefix_k, prefix_v, bias, dropout)


def _one_kernel(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, prefix_k: Tensor,
                prefix_v: Tensor, prefix_bias: Tensor, dropout: float) -> Tensor:
    """Off the CPU, or with dropout on the weights: one kernel over [prefix; tokens], the
    gate entering as a bias on the prefix columns (autograd forms its gradient)."""
    B, H, T = q.shape[:3]
    S = k.shape[-2]
    right = q.new_zeros(()).expand(B, H, T, S) if mask is None else mask.expand(B, H, T, S)
    right = right.to(q.dtype)
    bias = torch.cat([prefix_bias.expand(B, H, T, -1), right], -1)
    return F.scaled_dot_product_attention(q, _with_prefix(prefix_k, k), _with_prefix(prefix_v, v),
                                          attn_mask=bias, dropout_p=dropout, scale=scale)


def explicit_moe(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, *,
                 scale: float | None = None, prefix_k: Tensor | None = None,
                 prefix_v: Tensor | None = None, prefix_gate: PrefixGate = linear_scores,
                 value_act: str = "identity") -> tuple[Tensor, Tensor]:
    """The same attention as an explicit MoE: (gate weights (B, H, T, P + S), experts
    (B, H, P + S, D)); the output is ``weights @ experts``. A slow, obvious form, kept as
    the reference for ``moe_attention`` and for reading gate weights off a model."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale
    mask = additive_mask(mask, q.dtype)
    if mask is not None:
        scores = scores + mask
    experts = v
    if prefix_k is not None and prefix_v is not None:
        scores = torch.cat([prefix_gate(q, prefix_k, scale), scores], -1)
        experts = _with_prefix(prefix_v, v)
    return scores.softmax(-1), value_activation(value_act)(experts)
