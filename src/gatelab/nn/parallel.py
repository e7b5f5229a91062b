"""Expert parallelism over ``torch.distributed``: each rank holds E / world_size experts;
tokens travel to the rank holding their expert with an all-to-all and come back with a
second one. Both exchanges are differentiable, so backward sends gradients the same way.

The router and shared experts are replicated: every rank computes them on its own tokens,
so their gradients must be summed over ranks (DistributedDataParallel does this, or
``all_reduce`` by hand), while each rank's expert gradients are already complete.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .experts import FusedExperts
from .layer import MoELayer, MoEOutput

__all__ = ["ExpertParallelMoE"]


def _all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> Tensor:
    from torch.distributed.nn.functional import all_to_all_single  # differentiable version
    out = x.new_empty(sum(out_splits), *x.shape[1:])
    return all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)


class ExpertParallelMoE(nn.Module):
    """A ``MoELayer`` whose experts are split over the ranks of ``group``; rank r holds
    experts [r * E / W, (r + 1) * E / W). Build it from the full layer on every rank
    (same weights everywhere, e.g. same seed or a broadcast) with ``from_layer``; the
    forward pass takes this rank's tokens and returns the same ``MoEOutput`` as the
    full layer would for them. Dropless routing only (no capacity factor)."""

    def __init__(self, layer: MoELayer, group: Any = None):
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call "
                               "torch.distributed.init_process_group first.")
        if layer.capacity_factor is not None:
            raise ValueError("ExpertParallelMoE is dropless; build the layer without "
                             "capacity_factor.")
        self.group = group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        n_experts = layer.n_experts
        if n_experts % self.world:
            raise ValueError(f"{n_experts} experts cannot be split evenly over {self.world} "
                             "ranks; use a number of experts divisible by the world size.")
        self.local = n_experts // self.world
        self.layer = layer
        full = layer.experts
        local = FusedExperts(self.local, full.dim, full.ffn_dim, full.kind, full.activation,
                             backend=full.backend)
        first = self.rank * self.local
        with torch.no_grad():
            for name, p in full.named_parameters():
                getattr(local, name).data = p[first:first + self.local].clone()
        layer.experts = local  # this rank's slice only; the full weights are dropped
        self.n_experts = n_experts

    @classmethod
    def from_layer(cls, layer: MoELayer, group: Any = None) -> "ExpertParallelMoE":
        return cls(layer, group)

    def forward(self, x: Tensor) -> MoEOutput:
        layer = self.layer
        x_TD = x.reshape(-1, layer.dim)
        routing = layer.router(x_TD)
        order = torch.sort(routing.expert_index, stable=True).indices
        counts = torch.bincount(routing.expert_index, minlength=self.n_experts)
        # recv[r, e]: tokens rank r sends to this rank's local expert e.
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=self.group)
        recv = recv.view(self.world, self.local)
        send_splits = counts.view(self.world, self.local).sum(1).tolist()
        recv_splits = recv.sum(1).tolist()
        tokens = routing.token_index[order]
        x_in = _all_to_all(x_TD.index_select(0, tokens), recv_splits, send_splits, self.group)
        y_in = self._run_local(x_in, recv)
        y = _all_to_all(y_in, send_splits, recv_splits, self.group)
        y = (y * routing.weight[order].unsqueeze(-1)).to(x_TD.dtype)
        out = torch.zeros_like(x_TD).index_add_(0, tokens, y)
        if layer.shared is not None:
            out = out + layer.shared(x_TD)
        losses = layer.aux_losses(routing, counts)
        total = sum((w * losses[k] for k, w in layer.aux.items()), x.new_zeros(()))
        return MoEOutput(out.view(x.shape), total, losses, routing.logits, routing.probs,
                         counts, 0)

    def _run_local(self, x_in: Tensor, recv: Tensor) -> Tensor:
        """Rows arrive grouped by source rank, then by local expert; regroup them by
        expert, run the experts, and restore the arrival order."""
        expert_of_row = torch.arange(self.local, device=x_in.device).repeat(self.world)
        expert_of_row = expert_of_row.repeat_interleave(recv.reshape(-1))
        perm = torch.sort(expert_of_row, stable=True).indices
        y_sorted = self.layer.experts(x_in.index_select(0, perm), recv.sum(0))
        return torch.empty_like(y_sorted).index_copy(0, perm, y_sorted)
