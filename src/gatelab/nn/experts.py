"""Experts stored as fused 3-D weights and run on tokens already sorted by expert.

``grouped_linear`` applies expert e's weight to its contiguous slice of rows. Its
backward writes each expert's weight gradient straight into its slice of one (E, ...)
tensor; plain autograd through ``w[e]`` would instead allocate a full-size zero tensor
per expert, which dominates the backward pass when there are many experts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int, choose

__all__ = ["grouped_linear", "FusedExperts", "DenseMLP", "ACTIVATIONS", "EXPERT_KINDS", "BACKENDS"]

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "relu": F.relu,
}

EXPERT_KINDS = {
    "swiglu": "act(x W_gate^T) * (x W_up^T), then W_down (Mixtral, Qwen2-MoE, DeepSeek-V3)",
    "gelu": "act(x W_up^T), then W_down (a plain two-layer FFN)",
}


def _slices(counts: list[int]):
    start = 0
    for e, c in enumerate(counts):
        if c:
            yield e, slice(start, start + c)
        start += c


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_SI: Tensor, w_EOI: Tensor, counts: list[int]) -> Tensor:
        out = x_SI.new_empty(x_SI.shape[0], w_EOI.shape[1])
        for e, rows in _slices(counts):
            torch.mm(x_SI[rows], w_EOI[e].t(), out=out[rows])
        ctx.save_for_backward(x_SI, w_EOI)
        ctx.counts = counts
        return out

    @staticmethod
    def backward(ctx, grad_SO: Tensor):
        x_SI, w_EOI = ctx.saved_tensors
        grad_SO = grad_SO.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(x_SI)
            for e, rows in _slices(ctx.counts):
                torch.mm(grad_SO[rows], w_EOI[e], out=grad_x[rows])
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros_like(w_EOI)
            for e, rows in _slices(ctx.counts):
                torch.mm(grad_SO[rows].t(), x_SI[rows], out=grad_w[e])
        return grad_x, grad_w, None


BACKENDS = {
    "auto": "torch's grouped_mm on CUDA where torch has it, else the loop",
    "loop": "one matmul per expert slice, with the custom backward (best on CPU)",
    "grouped_mm": "torch.nn.functional.grouped_mm: one kernel, no host sync (CUDA)",
}


def _use_grouped_mm(backend: str, x: Tensor) -> bool:
    if backend == "auto":
        return x.is_cuda and hasattr(F, "grouped_mm")
    return backend == "grouped_mm"


def grouped_linear(x_SI: Tensor, w_EOI: Tensor, counts: Tensor | list[int],
                   backend: str = "auto") -> Tensor:
    """Rows of ``x_SI`` are grouped by expert (``counts[e]`` rows for expert e, in order);
    row s of the result is x_s W_e^T for its expert e. Shapes: (S, I) x (E, O, I) -> (S, O).
    ``backend``: see ``BACKENDS``."""
    choose("backend", backend, BACKENDS)
    w_EOI = w_EOI.to(x_SI.dtype)
    if _use_grouped_mm(backend, x_SI):
        offsets = torch.as_tensor(counts, device=x_SI.device).cumsum(0).to(torch.int32)
        return F.grouped_mm(x_SI, w_EOI.transpose(-2, -1), offs=offsets)
    counts = counts.tolist() if isinstance(counts, Tensor) else list(counts)
    if sum(counts) != x_SI.shape[0]:
        raise ValueError(f"counts add up to {sum(counts)} rows but x has {x_SI.shape[0]}.")
    return _GroupedLinear.apply(x_SI.contiguous(), w_EOI, counts)


class FusedExperts(nn.Module):
    """E feed-forward experts in two fused weights, Hugging Face's layout:
    swiglu: ``gate_up_proj`` (E, 2F, D) (gate rows first) and ``down_proj`` (E, D, F);
    gelu: ``up_proj`` (E, F, D) and ``down_proj`` (E, D, F)."""

    def __init__(self, n_experts: int, dim: int, ffn_dim: int, kind: str = "swiglu",
                 activation: str | None = None, init_std: float = 0.02, backend: str = "auto"):
        super().__init__()
        choose("expert kind", kind, EXPERT_KINDS)
        choose("backend", backend, BACKENDS)
        self.backend = backend
        self.kind = kind
        self.activation = activation or ("silu" if kind == "swiglu" else "gelu")
        self.act = choose("activation", self.activation, ACTIVATIONS)
        self.n_experts = check_int("n_experts", n_experts, 1)
        self.dim, self.ffn_dim = check_int("dim", dim, 1), check_int("ffn_dim", ffn_dim, 1)
        up_rows = 2 * ffn_dim if kind == "swiglu" else ffn_dim
        up_name = "gate_up_proj" if kind == "swiglu" else "up_proj"
        self.up_name = up_name
        self.register_parameter(up_name, nn.Parameter(torch.randn(n_experts, up_rows, dim) * init_std))
        self.down_proj = nn.Parameter(torch.randn(n_experts, dim, ffn_dim) * init_std / math.sqrt(2))

    @property
    def up(self) -> Tensor:
        return getattr(self, self.up_name)

    def forward(self, x_sorted_SD: Tensor, counts: Tensor | list[int]) -> Tensor:
        """Run expert e on its ``counts[e]`` consecutive rows."""
        if isinstance(counts, Tensor) and not _use_grouped_mm(self.backend, x_sorted_SD):
            counts = counts.tolist()  # one host sync for both projections
        h = grouped_linear(x_sorted_SD, self.up, counts, self.backend)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return grouped_linear(h, self.down_proj, counts, self.backend)

    def expert(self, e: int, x_ND: Tensor) -> Tensor:
        """Expert ``e`` on its own, written out plainly (references and tests)."""
        h = F.linear(x_ND, self.up[e].to(x_ND.dtype))
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return F.linear(h, self.down_proj[e].to(x_ND.dtype))


class DenseMLP(nn.Module):
    """A shared (always active) SwiGLU expert, as Qwen2-MoE's and DeepSeek-V3's shared
    experts: down(act(gate(x)) * up(x)). With ``gated=True`` its output is scaled by
    sigmoid(x . w) per token (Qwen2-MoE's ``shared_expert_gate``)."""

    def __init__(self, dim: int, ffn_dim: int, activation: str = "silu", gated: bool = False):
        super().__init__()
        self.act = choose("activation", activation, ACTIVATIONS)
        self.gate_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.up_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, dim, bias=False)
        self.gate = nn.Linear(dim, 1, bias=False) if gated else None

    def forward(self, x_TD: Tensor) -> Tensor:
        y = self.down_proj(self.act(self.gate_proj(x_TD)) * self.up_proj(x_TD))
        return y if self.gate is None else torch.sigmoid(self.gate(x_TD)) * y
