"""Auxiliary router losses. Each takes the dense router output of one layer (T tokens,
E experts) and returns a 0-d tensor; ``MoELayer`` computes the ones it is asked for."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._checks import choose

__all__ = ["load_balancing_loss", "z_loss", "cv_squared", "importance_loss", "load_loss",
           "entropy_loss", "AUX_LOSSES"]

CONVENTIONS = {
    "switch": "f_i = share of the S assignments that go to expert i (sums to 1); 1 at uniform",
    "hf": "f_i = share of the T tokens that use expert i (sums to top_k); top_k at uniform",
}


def load_balancing_loss(probs_TE: Tensor, expert_counts: Tensor, top_k: int = 1,
                        convention: str = "switch") -> Tensor:
    """Switch / GShard load balancing (arXiv 2101.03961, eq. 4-6):
    L = E * sum_i f_i P_i, with P_i the mean over tokens of the router probability of
    expert i (rows are renormalised first, so sigmoid routers are covered as in
    DeepSeek-V3) and f_i the share of routing that expert i receives.

    ``convention="switch"``: f_i = count_i / (T * top_k), so L = 1 under uniform routing.
    ``convention="hf"``: f_i = count_i / T, Hugging Face's ``load_balancing_loss_func``,
    which equals top_k under uniform routing.
    """
    choose("convention", convention, CONVENTIONS)
    n_tokens, n_experts = probs_TE.shape
    p = probs_TE / probs_TE.sum(-1, keepdim=True)
    share = n_tokens * (top_k if convention == "switch" else 1)
    f = expert_counts.to(p.dtype) / share
    return n_experts * (f * p.mean(0)).sum()


def z_loss(logits_TE: Tensor) -> Tensor:
    """Router z-loss (ST-MoE, arXiv 2202.08906): mean over tokens of logsumexp(logits)^2;
    it keeps router logits small, which keeps the softmax numerically stable."""
    return torch.logsumexp(logits_TE, -1).square().mean()


def cv_squared(v: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation Var(v) / (mean(v)^2 + eps), with the unbiased
    variance, as in Shazeer et al. (arXiv 1701.06538). 0 for a vector of one entry."""
    v = v.float() if not v.is_floating_point() else v
    if v.numel() <= 1:
        return v.new_zeros(())
    return v.var() / (v.mean().square() + eps)


def importance_loss(weights_TE: Tensor) -> Tensor:
    """cv^2 of expert importance, importance_i = sum over tokens of the gate weight that
    token gives expert i (zero if not selected) (arXiv 1701.06538)."""
    return cv_squared(weights_TE.sum(0))


def load_loss(expert_counts: Tensor) -> Tensor:
    """cv^2 of the number of tokens each expert receives. Counts are not differentiable;
    this is a balance measure to log, or to use with a smooth load estimate."""
    return cv_squared(expert_counts)


def entropy_loss(probs_TE: Tensor, marginal_weight: float = 1.0) -> Tensor:
    """Entropy regulariser for routers (the FuseMoE-style mutual-information form,
    arXiv 2402.03226): mean_t H(p_t) - marginal_weight * H(mean_t p_t).

    Minimising it makes each token's routing confident (low per-token entropy) while
    keeping the experts' overall usage spread out (high entropy of the mean routing).
    FuseMoE's exact weighting is not stated in its abstract; ``marginal_weight`` sets it.
    """
    p = probs_TE / probs_TE.sum(-1, keepdim=True)
    per_token = -(p * p.clamp_min(1e-30).log()).sum(-1).mean()
    mean_p = p.mean(0)
    marginal = -(mean_p * mean_p.clamp_min(1e-30).log()).sum()
    return per_token - marginal_weight * marginal


AUX_LOSSES: dict[str, Any] = {
    "load_balance": "Switch/GShard load balancing (convention set on the layer)",
    "z_loss": "router z-loss, mean logsumexp(logits)^2",
    "importance": "cv^2 of summed gate weights per expert",
    "load": "cv^2 of tokens per expert (not differentiable)",
    "entropy": "per-token routing entropy minus entropy of the mean routing",
}
