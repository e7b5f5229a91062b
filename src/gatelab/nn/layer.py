"""The sparse MoE layer: a router, fused experts, optional shared experts, dropless
dispatch (or a capacity factor), and auxiliary losses returned with the output."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .._checks import check_int, check_positive, choose
from ..gates import Gate
from . import losses as L
from .experts import DenseMLP, FusedExperts
from .routers import Router, Routing

__all__ = ["MoEOutput", "MoELayer", "dispatch"]


class MoEOutput(NamedTuple):
    """What ``MoELayer.forward`` returns. ``output`` has the input's shape; ``aux_loss`` is
    the weighted sum of ``aux_losses`` (name -> unweighted value); ``expert_counts`` (E,)
    counts assignments per expert before any capacity drop; ``dropped`` is how many
    assignments the capacity factor dropped (0 when dropless)."""

    output: Tensor
    aux_loss: Tensor
    aux_losses: dict[str, Tensor]
    router_logits: Tensor
    router_probs: Tensor
    expert_counts: Tensor
    dropped: int


def _capacity_keep(sorted_experts: Tensor, counts: Tensor, capacity: int) -> Tensor:
    """Mask over assignments sorted by expert (token order inside each expert): an
    expert keeps its first ``capacity`` assignments, i.e. the earliest tokens (GShard)."""
    starts = counts.cumsum(0) - counts
    rank = torch.arange(sorted_experts.numel(), device=counts.device) - starts[sorted_experts]
    return rank < capacity


def dispatch(x_TD: Tensor, routing: Routing, experts: FusedExperts,
             capacity: int | None = None) -> tuple[Tensor, Tensor, int]:
    """Sum over assignments of weight * expert(x_token), computed by sorting assignments
    by expert once (a stable sort keeps token order inside each expert), running each
    expert on its contiguous slice, and adding the weighted rows back per token.
    Returns (output (T, D), counts per expert (E,), number of assignments dropped)."""
    order = torch.sort(routing.expert_index, stable=True).indices
    counts = torch.bincount(routing.expert_index, minlength=experts.n_experts)
    kept = counts
    if capacity is not None:
        order = order[_capacity_keep(routing.expert_index[order], counts, capacity)]
        kept = counts.clamp(max=capacity)
    tokens = routing.token_index[order]
    y = experts(x_TD.index_select(0, tokens), kept)  # index_select: 5x faster than x[idx] here
    y = (y * routing.weight[order].unsqueeze(-1)).to(x_TD.dtype)
    out = torch.zeros_like(x_TD).index_add_(0, tokens, y)
    return out, counts, routing.expert_index.numel() - order.numel()


class MoELayer(nn.Module):
    """Sparse mixture-of-experts feed-forward layer.

    y(x) = sum_{e in selected(x)} w_e(x) FFN_e(x) + shared(x), with the routing of a
    ``Router`` (any gate of the catalogue), experts fused in (E, ...) weights, and
    ``n_shared`` always-active experts (hidden size ``shared_ffn_dim``, default
    ``n_shared * ffn_dim``; ``shared_gate=True`` scales them by sigmoid(x . w) as
    Qwen2-MoE does).

    Dispatch is dropless unless ``capacity_factor`` is set: then each expert takes at most
    ceil(capacity_factor * S / E) of the S assignments, earliest tokens first, and the rest
    are dropped (their contribution is 0; a residual connection outside passes them on).

    ``top_k``: experts per token; by default the router gate's own ``top_k`` (a top-K
    gate), else 2.

    ``backend``: how the experts run (``experts.BACKENDS``): "auto" uses torch's
    grouped_mm on CUDA and a per-expert loop with a custom backward on CPU.

    ``aux``: auxiliary losses to compute, name -> weight (names in ``losses.AUX_LOSSES``);
    ``balance_convention``: "switch" (1 at uniform routing) or "hf" (top_k at uniform).
    Extra keyword options go to the ``Router`` (e.g. ``order``, ``n_groups``, ``tau1``).
    """

    def __init__(self, dim: int, ffn_dim: int, n_experts: int, top_k: int | None = None,
                 router: str | Gate | Router = "softmax", *, expert: str = "swiglu",
                 activation: str | None = None, n_shared: int = 0,
                 shared_ffn_dim: int | None = None, shared_gate: bool = False,
                 capacity_factor: float | None = None, backend: str = "auto",
                 aux: dict[str, float] | None = None, balance_convention: str = "switch",
                 **router_options: Any):
        super().__init__()
        self.dim = check_int("dim", dim, 1)
        if isinstance(router, Router):
            if router_options:
                raise ValueError("Router options were given with a ready-made Router; set "
                                 f"them on the Router instead: {sorted(router_options)}.")
            self.router = router
        else:
            self.router = Router(dim, n_experts, top_k, router, **router_options)
        if self.router.dim != dim or self.router.n_experts != n_experts:
            raise ValueError(f"The router routes hidden size {self.router.dim} over "
                             f"{self.router.n_experts} experts; the layer has dim={dim}, "
                             f"n_experts={n_experts}. Build them with the same sizes.")
        self.experts = FusedExperts(n_experts, dim, ffn_dim, expert, activation, backend=backend)
        check_int("n_shared", n_shared, 0)
        self.shared = (DenseMLP(dim, shared_ffn_dim or n_shared * ffn_dim,
                                self.experts.activation, shared_gate)
                       if n_shared or shared_ffn_dim else None)
        self.capacity_factor = (None if capacity_factor is None
                                else check_positive("capacity_factor", capacity_factor))
        self.aux = dict({"load_balance": 0.01} if aux is None else aux)
        for name in self.aux:
            choose("auxiliary loss", name, L.AUX_LOSSES)
        choose("balance convention", balance_convention, L.CONVENTIONS)
        self.balance_convention = balance_convention

    @property
    def n_experts(self) -> int:
        return self.experts.n_experts

    def capacity(self, n_assignments: int) -> int | None:
        """Per-expert capacity for ``n_assignments`` assignments (None when dropless)."""
        if self.capacity_factor is None:
            return None
        return max(1, math.ceil(self.capacity_factor * n_assignments / self.n_experts))

    def forward(self, x: Tensor) -> MoEOutput:
        if x.shape[-1] != self.dim:
            raise ValueError(f"MoELayer(dim={self.dim}) got input of shape {tuple(x.shape)}; "
                             f"the last axis must be the hidden size {self.dim}.")
        out = self.route(x.reshape(-1, self.dim))
        return out._replace(output=out.output.view(x.shape))

    def route(self, x_TD: Tensor, router: Router | None = None) -> MoEOutput:
        """Tokens (T, D) through ``router`` (default: the layer's own) and this layer's
        experts."""
        return self.route_groups([x_TD], [router or self.router])[0]

    def route_groups(self, xs: Sequence[Tensor], routers: Sequence[Router]) -> list[MoEOutput]:
        """Groups of tokens, each (T_g, D) through its own router, over this layer's experts in
        one dispatch (FuseMoE's per-modality routers share one layer's experts this way). Each
        group's output, auxiliary losses and counts are its own; the capacity, if any, is
        shared by all assignments."""
        routings = [router(x) for router, x in zip(routers, xs, strict=True)]
        starts = [0, *itertools.accumulate(len(x) for x in xs)]
        def cat(field: str) -> Tensor:
            return torch.cat([getattr(r, field) for r in routings])

        offsets = torch.cat([r.token_index + s for r, s in zip(routings, starts, strict=False)])
        merged = Routing(offsets, cat("expert_index"), cat("weight"), cat("logits"), cat("probs"),
                         routings[0].top_k)
        x_TD = torch.cat(list(xs)) if len(xs) > 1 else xs[0]
        y, _, dropped = dispatch(x_TD, merged, self.experts, self.capacity(merged.expert_index.numel()))
        if self.shared is not None:
            y = y + self.shared(x_TD)
        out = []
        for r, x, start in zip(routings, xs, starts, strict=False):
            counts = torch.bincount(r.expert_index, minlength=self.n_experts)
            losses = self.aux_losses(r, counts)
            total = sum((w * losses[k] for k, w in self.aux.items()), x.new_zeros(()))
            out.append(MoEOutput(y[start:start + len(x)], total, losses, r.logits, r.probs, counts, dropped))
        return out

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict`` with a clearer error when a checkpoint lacks keys."""
        missing = sorted(set(self.state_dict()) - set(state_dict))
        if strict and missing:
            raise KeyError(f"The checkpoint lacks {len(missing)} of this layer's entries: "
                           f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}. "
                           "Check that it was saved from a layer of the same configuration "
                           "(router, expert kind, shared experts); for a Hugging Face block "
                           "use gatelab.nn.from_hf; or pass strict=False to keep the missing "
                           "entries at their current values.")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def aux_losses(self, routing: Routing, counts: Tensor) -> dict[str, Tensor]:
        """The configured auxiliary losses of one routing (unweighted)."""
        top_k = routing.top_k or max(1, routing.expert_index.numel() // routing.probs.shape[0])
        make = {
            "load_balance": lambda: L.load_balancing_loss(routing.probs, counts, top_k,
                                                          self.balance_convention),
            "z_loss": lambda: L.z_loss(routing.logits),
            "importance": lambda: L.importance_loss(_dense_weights(routing)),
            "load": lambda: L.load_loss(counts),
            "entropy": lambda: L.entropy_loss(routing.probs),
        }
        return {name: make[name]() for name in self.aux}


def _dense_weights(routing: Routing) -> Tensor:
    """(T, E) gate weights with zeros for experts a token does not use."""
    dense = routing.probs.new_zeros(routing.probs.shape)
    return dense.index_put((routing.token_index, routing.expert_index),
                           routing.weight.to(dense.dtype), accumulate=True)
