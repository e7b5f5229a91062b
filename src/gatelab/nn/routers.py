"""Routers: ``nn.Module`` wrappers around the shared gate catalogue that turn scores into
a sparse assignment of tokens to experts.

A router computes logits with a ``gatelab.gates.Gate`` (the same code the statistical
models use), then selects experts and their weights. Every router returns a ``Routing``:
flat (token, expert, weight) assignments plus the dense logits and probabilities that the
auxiliary losses need. Token-choice routers give ``T * top_k`` assignments in token-major
order, so ``weight.view(T, top_k)`` is the usual top-k weight matrix.

Shape legend: T tokens, D hidden size, E experts, K experts per token, S assignments.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int, check_nonnegative, check_positive, choose
from ..gates import NORMALISERS, Gate, make_gate, network_form, top_k_indices

__all__ = ["Routing", "Router", "ExpertChoiceRouter", "ORDERS"]

ORDERS = {
    "softmax_topk": "softmax over all experts, then keep the top-k probabilities (Mixtral)",
    "topk_softmax": "keep the top-k logits, then softmax over them",
}


class Routing(NamedTuple):
    """Where each token goes. ``token_index``, ``expert_index`` and ``weight`` have one
    entry per assignment (S,); ``logits`` and ``probs`` are dense (T, E)."""

    token_index: Tensor
    expert_index: Tensor
    weight: Tensor
    logits: Tensor
    probs: Tensor
    top_k: int | None


class _GateModule(nn.Module):
    """Holds a gate's parameter blocks as ``nn.Parameter``s (dots in block names, as in
    ``outer.beta1``, become ``__`` because module attribute names cannot hold dots).

    With ``bias=False`` the intercept blocks ``beta0`` are fixed zero buffers, which is
    what Mixtral-style routers (a bias-free linear map) need."""

    def __init__(self, gate: Gate, dim: int, n_experts: int, bias: bool, init_std: float):
        super().__init__()
        gate.check(n_experts)
        self.gate = gate
        self.names = list(gate.param_shapes(n_experts, dim))
        for name, shape in gate.param_shapes(n_experts, dim).items():
            key = name.replace(".", "__")
            if name.split(".")[-1] == "beta0" and not bias:
                self.register_buffer(key, torch.zeros(shape))
            else:
                self.register_parameter(key, nn.Parameter(torch.randn(shape) * init_std))

    def params(self) -> dict[str, Tensor]:
        return {name: getattr(self, name.replace(".", "__")) for name in self.names}

    def forward(self, x_TD: Tensor) -> Tensor:
        params = {k: v.to(x_TD.dtype) for k, v in self.params().items()}
        return self.gate.scores(x_TD, params)


class Router(nn.Module):
    """Token-choice router: each token picks ``top_k`` experts.

    logits = gate.scores(P x) / tau, where P is an optional projection (``proj_dim``,
    X-MoE, arXiv 2204.09179) and tau an optional temperature (learnable with
    ``learn_temperature``, clamped at ``min_temperature``). Then:

    - ``order="softmax_topk"``: p = softmax(logits); keep the top-k p, renormalised to sum 1
      if ``renormalize`` (Mixtral; Qwen2-MoE's ``norm_topk_prob``).
    - ``order="topk_softmax"``: keep the top-k logits; softmax over them.
    - ``normaliser="sigmoid"`` gates (DeepSeek-V3, arXiv 2412.19437): p = sigmoid(logits);
      select on p + b where b is a selection-only bias (``selection_bias``, updated by
      ``update_bias``, the auxiliary-loss-free rule); weights are p, optionally
      renormalised; then times ``scaling`` (the routed scaling factor).
    - ``n_groups`` / ``topk_groups``: group-limited routing (DeepSeek-V3): experts form
      ``n_groups`` equal groups, a group scores the sum of its two best selection scores,
      and only experts in the ``topk_groups`` best groups can be chosen.

    A gate that carries its own ``top_k`` (``make_gate("topk", top_k=2)``, the top-K
    sparse softmax of arXiv 2309.13850) routes as it does in the statistical models:
    softmax over its K largest logits, i.e. ``order="topk_softmax"`` with k = its top_k.

    Training-time noise: ``jitter`` multiplies the router input by U(1-eps, 1+eps)
    (Switch Transformer); ``noisy`` adds N(0, 1) * softplus(x W_noise) to the logits
    (noisy top-k, Shazeer et al. 2017, arXiv 1701.06538).

    ``router_dtype`` (e.g. float32): compute the probabilities in that dtype, as Mixtral
    and Qwen2-MoE do; ``cast_input`` also computes the logits there (DeepSeek-V3).
    """

    def __init__(self, dim: int, n_experts: int, top_k: int | None = None,
                 gate: str | Gate = "softmax", *, order: str | None = None,
                 renormalize: bool = True, bias: bool = False,
                 n_groups: int = 1, topk_groups: int | None = None, scaling: float = 1.0,
                 selection_bias: bool = False, jitter: float = 0.0, noisy: bool = False,
                 proj_dim: int | None = None, temperature: float | None = None,
                 learn_temperature: bool = False, min_temperature: float = 0.01,
                 router_dtype: torch.dtype | None = None, cast_input: bool = False,
                 init_std: float = 0.02, **gate_options: Any):
        super().__init__()
        self.dim = check_int("dim", dim, 1)
        self.n_experts = check_int("n_experts", n_experts, 1)
        by_name = isinstance(gate, str) and "expanded" not in gate_options
        gate = make_gate(gate, **gate_options)
        if by_name:
            gate = network_form(gate)  # a Gate instance, or an explicit expanded=..., is kept as given
        top_k, order = _with_gate_top_k(gate, top_k, order)
        self.top_k = check_int("top_k", top_k, 1, n_experts,
                               fix=f"A token cannot use more than the {n_experts} experts; "
                                   f"choose top_k <= n_experts.")
        choose("order", order, ORDERS)
        self.order, self.renormalize, self.scaling = order, renormalize, float(scaling)
        self._check_groups(n_groups, topk_groups)
        self.jitter, self.noisy = check_nonnegative("jitter", jitter), noisy
        self.router_dtype, self.cast_input = router_dtype, cast_input
        self.proj = nn.Linear(dim, proj_dim, bias=False) if proj_dim else None
        self.scores = _GateModule(gate, proj_dim or dim, n_experts, bias, init_std)
        self._init_temperature(temperature, learn_temperature, min_temperature)
        if noisy:
            self.w_noise = nn.Parameter(torch.zeros(n_experts, dim))
        if selection_bias:
            self.register_buffer("selection_bias", torch.zeros(n_experts))
        else:
            self.selection_bias = None

    @property
    def gate(self) -> Gate:
        return self.scores.gate

    @property
    def sigmoid(self) -> bool:
        return self.gate.normaliser == "sigmoid"

    def _check_groups(self, n_groups: int, topk_groups: int | None) -> None:
        self.n_groups = check_int("n_groups", n_groups, 1, self.n_experts)
        if self.n_experts % n_groups:
            raise ValueError(f"n_groups={n_groups} must divide n_experts={self.n_experts}: "
                             "group-limited routing splits the experts into equal groups.")
        self.topk_groups = n_groups if topk_groups is None else topk_groups
        check_int("topk_groups", self.topk_groups, 1, n_groups)
        if self.topk_groups * (self.n_experts // n_groups) < self.top_k:
            raise ValueError(f"topk_groups={self.topk_groups} groups of "
                             f"{self.n_experts // n_groups} experts hold fewer than top_k="
                             f"{self.top_k} experts; raise topk_groups or lower top_k.")

    def _init_temperature(self, temperature: float | None, learn: bool, floor: float) -> None:
        self.min_temperature = floor
        if temperature is None and not learn:
            self.temperature = None
            return
        value = torch.tensor(float(temperature if temperature is not None else 1.0))
        check_positive("temperature", float(value))
        if learn:
            self.temperature = nn.Parameter(value)
        else:
            self.register_buffer("temperature", value)

    # --- logits -------------------------------------------------------------------------

    def logits(self, x_TD: Tensor) -> Tensor:
        """Router logits (T, E), before any selection."""
        if self.training and self.jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - self.jitter, 1 + self.jitter)
        h = x_TD.to(self.router_dtype) if self.cast_input and self.router_dtype else x_TD
        if self.proj is not None:
            h = F.linear(h, self.proj.weight.to(h.dtype))
        logits = self.scores(h)
        if self.temperature is not None:
            logits = logits / self.temperature.clamp_min(self.min_temperature).to(logits.dtype)
        if self.training and self.noisy:
            noise_sd = F.softplus(F.linear(x_TD, self.w_noise.to(x_TD.dtype)))
            logits = logits + torch.randn_like(logits) * noise_sd.to(logits.dtype)
        return logits

    # --- selection ----------------------------------------------------------------------

    def _limit_groups(self, choice_TE: Tensor) -> Tensor:
        if self.topk_groups == self.n_groups:
            return choice_TE
        grouped = choice_TE.view(choice_TE.shape[0], self.n_groups, -1)
        group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_score, dtype=torch.bool)
        keep.scatter_(1, group_score.topk(self.topk_groups, dim=-1).indices, True)
        return choice_TE.masked_fill(~keep.repeat_interleave(grouped.shape[-1], 1), -math.inf)

    def forward(self, x_TD: Tensor) -> Routing:
        if x_TD.shape[-1] != self.dim:
            raise ValueError(f"The router expects hidden size {self.dim}; got input of shape "
                             f"{tuple(x_TD.shape)}. Build it with dim={x_TD.shape[-1]}.")
        logits = self.logits(x_TD.reshape(-1, self.dim))
        z = logits.to(self.router_dtype) if self.router_dtype else logits
        normaliser = NORMALISERS[self.gate.normaliser]
        probs = normaliser.weights(z)
        ranked_by_logit = self.order == "topk_softmax" and not self.sigmoid
        choice = z if ranked_by_logit else probs
        if self.selection_bias is not None:
            choice = choice + self.selection_bias.to(choice.dtype)
        experts_TK = top_k_indices(self._limit_groups(choice), self.top_k)
        if ranked_by_logit:  # the normaliser over the kept logits only
            weight = normaliser.weights(z.gather(1, experts_TK))
        else:
            weight = probs.gather(1, experts_TK)
            if self.renormalize:
                weight = weight / (weight.sum(-1, keepdim=True) + 1e-20)
        weight = weight * self.scaling if self.scaling != 1.0 else weight
        tokens = torch.arange(z.shape[0], device=z.device).repeat_interleave(self.top_k)
        return Routing(tokens, experts_TK.reshape(-1), weight.reshape(-1), logits, probs,
                       self.top_k)

    @torch.no_grad()
    def update_bias(self, expert_counts: Tensor, rate: float = 1e-3) -> None:
        """Auxiliary-loss-free balancing (arXiv 2408.15664, DeepSeek-V3): after a step,
        b_i += rate * sign(mean load - load_i), so overloaded experts get picked less.
        The bias only changes which experts are selected, never their weights."""
        if self.selection_bias is None:
            raise ValueError("This router has no selection bias; build it with "
                             "selection_bias=True to use the auxiliary-loss-free update.")
        load = expert_counts.to(self.selection_bias.dtype)
        self.selection_bias += rate * torch.sign(load.mean() - load)


def _with_gate_top_k(gate: Gate, top_k: int | None, order: str | None) -> tuple[int, str]:
    """The router's k and order: its own, or a top-K gate's (top-K sparse softmax), or
    the defaults (k = 2, softmax then top-k)."""
    if gate.top_k is None:
        return (2 if top_k is None else top_k), (order or "softmax_topk")
    if top_k is not None and top_k != gate.top_k:
        raise ValueError(f"The router's top_k={top_k} differs from its gate's top_k="
                         f"{gate.top_k}; give one of them (the gate's is used when the "
                         "router's is omitted).")
    if order not in (None, "topk_softmax"):
        raise ValueError(f"A gate with top_k is the top-K sparse softmax (order "
                         f"'topk_softmax'); got order={order!r}. Drop the gate's top_k to "
                         "use another order.")
    return gate.top_k, "topk_softmax"


class ExpertChoiceRouter(Router):
    """Expert-choice routing (Zhou et al. 2022, arXiv 2202.09368): p = softmax(logits)
    over experts; each expert takes the C tokens with the highest p_{t,e}, where
    C = ceil(capacity_factor * T / E), and weights them by p_{t,e}. A token may be taken
    by several experts or by none; every expert is exactly full."""

    def __init__(self, dim: int, n_experts: int, capacity_factor: float = 1.0,
                 gate: str | Gate = "softmax", **options: Any):
        super().__init__(dim, n_experts, 1, gate, **options)
        self.capacity_factor = check_positive("capacity_factor", capacity_factor)

    def forward(self, x_TD: Tensor) -> Routing:
        logits = self.logits(x_TD.reshape(-1, self.dim))
        z = logits.to(self.router_dtype) if self.router_dtype else logits
        probs = NORMALISERS["softmax"].weights(z)
        n_tokens = z.shape[0]
        capacity = min(n_tokens, math.ceil(self.capacity_factor * n_tokens / self.n_experts))
        weight_EC, tokens_EC = probs.t().topk(capacity, dim=-1)
        experts = torch.arange(self.n_experts, device=z.device).repeat_interleave(capacity)
        return Routing(tokens_EC.reshape(-1), experts, weight_EC.reshape(-1), logits, probs,
                       None)

