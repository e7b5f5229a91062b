"""Hierarchical MoE layer (arXiv 2410.02935): two levels of gating, each with its own
catalogue gate (softmax, Laplace or Gaussian) and its own top-k, on the statistics half's
``HierarchicalGate``:

    y(x) = sum_g sum_j w^outer_g(x) w^inner_{j|g}(x) FFN_{g,j}(x),

where each level's weights are its gate's softmax over its k best scores (the others are 0),
so a token uses k_outer x k_inner experts. Both levels' parameters are trained ``Router``
parameters (the public HMoE code builds a fresh zero gate weight in every forward pass).
"""

from __future__ import annotations

from typing import Any

from ..gates import HierarchicalGate, make_gate
from .layer import MoELayer
from .routers import Router

__all__ = ["HierarchicalMoE", "hierarchical_router"]


def hierarchical_router(dim: int, n_groups: int, n_inner: int, *, outer: str = "softmax",
                        inner: str = "softmax", outer_top_k: int | None = None, inner_top_k: int | None = 2,
                        **router_options: Any) -> Router:
    """A Router over n_groups x n_inner experts (expert g * n_inner + j) whose gate is
    ``HierarchicalGate(outer, inner)`` with each level's top-k (None: all). A level with
    top-k = 1 gives its one chosen entry weight 1 whatever its score, so its gate would get
    no gradient at all: that is refused."""
    for level, k in (("outer_top_k", outer_top_k), ("inner_top_k", inner_top_k)):
        if k == 1:
            raise ValueError(f"{level}=1 gives the chosen entry weight 1, so that level's gate is never "
                             "trained; use top-k >= 2 or None (all).")
    gate = HierarchicalGate(outer=make_gate(outer, top_k=outer_top_k),
                            inner=make_gate(inner, top_k=inner_top_k), n_groups=n_groups, n_inner=n_inner)
    per_token = (outer_top_k or n_groups) * (inner_top_k or n_inner)
    return Router(dim, n_groups * n_inner, per_token, gate, **router_options)


class HierarchicalMoE(MoELayer):
    """An ``MoELayer`` routed by ``hierarchical_router`` (e.g. outer="laplace",
    inner="laplace": the paper's "LL"; ``bias``: learned intercepts beta0 at both levels).
    Other keyword options go to ``MoELayer``
    (``expert``, ``aux``, ``n_shared`` ...)."""

    def __init__(self, dim: int, ffn_dim: int, n_groups: int, n_inner: int, *, outer: str = "softmax",
                 inner: str = "softmax", outer_top_k: int | None = None, inner_top_k: int | None = 2,
                 bias: bool = False, **layer_options: Any):
        router = hierarchical_router(dim, n_groups, n_inner, outer=outer, inner=inner,
                                     outer_top_k=outer_top_k, inner_top_k=inner_top_k, bias=bias)
        super().__init__(dim, ffn_dim, n_groups * n_inner, router.top_k, router=router, **layer_options)
        self.n_groups, self.n_inner = n_groups, n_inner
