"""Prefix experts for attention: how prefix keys and values are parameterised, and the
gate that scores them (arXiv 2405.14124 NoRGa, 2410.02200 shared reparameterisation).

A prompted layer gets P prefix rows (keys K_p, values V_p, each (P, d) split into heads),
scored by a ``PrefixScore``; ``gatelab.nn.attention.moe_attention`` mixes them with the
tokens. Parameterisations (``PREFIX_KINDS``):

- ``no-share``: free tables K_p, V_p (independent keys and values);
- ``mlp``: a table E (P, d) through Linear(d, m) -> tanh -> Linear(m, 2d), split into
  [K_p | V_p] (arXiv 2410.02200; the authors' ReparamPrefix interleaves the channels, which
  is the same function class up to a permutation of the last layer's rows);
- ``linear``: E (P, d) through one Linear(d, 2d), the linear shared variant;
- ``prompt``: prompt tokens E (P, d) through the host layer's own frozen W_k, W_v (the
  key/value side of deep prompt tuning; the prompts are not themselves updated as tokens).

Tables start uniform(-1, 1), as in the authors' code (MoE_PromptCL).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int, choose
from ..gates import Gate, make_gate, network_form
from .attention import PrefixGate, linear_scores, value_activation

__all__ = ["NORGA_ACTIVATIONS", "PREFIX_KINDS", "PrefixScore", "FreePrefix", "SharedPrefix",
           "PromptPrefix", "make_prefix", "PrefixLayer", "prefix_gate_names"]

#: g in NoRGa's s + alpha * g(tau * s) (arXiv 2405.14124).
NORGA_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "gelu": F.gelu, "identity": lambda s: s,
}

PREFIX_KINDS = ("no-share", "mlp", "linear", "prompt")


def _key_blocks(gate: Gate) -> dict[str, str]:
    """Which of a catalogue gate's blocks the prefix keys fill ("keys") and which are zero
    ("zero"); empty when the gate has a block of any other shape (no meaning on keys)."""
    roles = {}
    for name, shape in gate.param_shapes(3, 5).items():
        if shape == (3, 5):
            roles[name] = "keys"
        elif shape == (3,):
            roles[name] = "zero"
        else:
            return {}
    return roles if "keys" in roles.values() else {}


def prefix_gate_names() -> list[str]:
    """The score gates a prefix accepts: linear, norga, and the catalogue gates whose
    parameters are one vector per expert (plus intercepts), which the prefix keys become."""
    from ..gates import GATES, example_gate
    names = ["linear", "norga"]
    for name in GATES:
        try:
            if _key_blocks(example_gate(name)) and example_gate(name).top_k is None:
                names.append(name)
        except (TypeError, ValueError):
            continue
    return names


class PrefixScore(nn.Module):
    """The gate on prefix experts: scores s_p(q) for queries q and prefix keys k_p, with
    c = 1/sqrt(D) (a ``gatelab.nn.attention.PrefixGate``):

    - ``linear``: s = c q . k_p (plain prefix tuning);
    - ``norga``: s + alpha g(tau s), g from ``NORGA_ACTIVATIONS``; alpha and tau are
      learnable scalars (one pair per prompted layer, shared by its heads), both
      starting at 1, as in the authors' code (arXiv 2405.14124);
    - a catalogue gate name (e.g. ``laplace``: -c ||q - k_p||): the gate's own score with
      the prefix keys as its per-expert vectors and zero intercepts (``gatelab.gates``).
    """

    def __init__(self, gate: str = "linear", activation: str = "tanh"):
        super().__init__()
        self.kind = gate
        self.catalogue: Gate | None = None
        if gate == "norga":
            self.g = choose("NoRGa activation", activation, NORGA_ACTIVATIONS)
            self.alpha = nn.Parameter(torch.ones(()))
            self.tau = nn.Parameter(torch.ones(()))
        elif gate != "linear":
            self.catalogue = self._catalogue(gate)
        self.activation = activation

    @staticmethod
    def _catalogue(name: str) -> Gate:
        allowed = prefix_gate_names()
        if name not in allowed:
            raise ValueError(f"Unknown prefix score gate {name!r}. Valid names: {', '.join(allowed)} "
                             "(catalogue gates need one vector per expert, which the prefix keys become).")
        return network_form(make_gate(name))  # T * P * D differences would dominate a step

    @property
    def gate(self) -> PrefixGate:
        """What attention calls: ``linear_scores`` itself for the linear gate (attention
        then takes its fast path for plain keys), else this module."""
        return linear_scores if self.kind == "linear" else self

    def forward(self, q: Tensor, keys: Tensor, scale: float) -> Tensor:
        """The prefix scores s_p(q), (..., N, P), for queries (..., N, D) and keys (..., P, D)
        with the same leading (head) dimensions."""
        if self.kind == "linear":
            return linear_scores(q, keys, scale)
        if self.catalogue is not None:
            roles = _key_blocks(self.catalogue)
            zeros = keys.new_zeros(keys.shape[:-1])
            params = {n: keys if r == "keys" else zeros for n, r in roles.items()}
            return self.catalogue.scores(q, params) * scale
        s = linear_scores(q, keys, scale)
        return s + self.alpha * self.g(self.tau * s)

    def extra_repr(self) -> str:
        return f"{self.kind}" + (f", g={self.activation}" if self.kind == "norga" else "")


def _split_heads(rows: Tensor, heads: int) -> Tensor:
    """(P, d) -> (H, P, d / H), the layout of transformers' attention."""
    P, d = rows.shape
    return rows.view(P, heads, d // heads).transpose(0, 1)


def _table(length: int, width: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(length, width).uniform_(-1.0, 1.0))


class FreePrefix(nn.Module):
    """No-share prefixes: free key and value tables, (P, d) each."""

    def __init__(self, length: int, hidden: int):
        super().__init__()
        self.keys, self.values = _table(length, hidden), _table(length, hidden)

    def forward(self, host: nn.Module | None = None) -> tuple[Tensor, Tensor]:
        return self.keys, self.values


class SharedPrefix(nn.Module):
    """Shared reparameterisation: [K_p | V_p] = map(E) for one table E (P, w) and a map
    R^w -> R^{2d}, so keys and values share E (arXiv 2410.02200)."""

    def __init__(self, length: int, width: int, reparam: nn.Module):
        super().__init__()
        self.table, self.map = _table(length, width), reparam

    def forward(self, host: nn.Module | None = None) -> tuple[Tensor, Tensor]:
        keys, values = self.map(self.table).chunk(2, dim=-1)
        return keys, values


class PromptPrefix(nn.Module):
    """Prompt tokens E (P, d) through the host layer's frozen key and value projections."""

    def __init__(self, length: int, hidden: int):
        super().__init__()
        self.tokens = _table(length, hidden)

    def forward(self, host: nn.Module | None = None) -> tuple[Tensor, Tensor]:
        if host is None or not hasattr(host, "key") or not hasattr(host, "value"):
            raise ValueError("Prompt tuning needs the host attention module (with .key and .value "
                             "projections); pass it, or choose another prefix kind.")
        key: Any = host.key
        value: Any = host.value
        return key(self.tokens), value(self.tokens)


def make_prefix(kind: str, length: int, hidden: int, bottleneck: int = 48) -> nn.Module:
    """A prefix parameterisation from ``PREFIX_KINDS`` with P = ``length`` rows of width
    ``hidden`` (d); ``bottleneck`` is the mlp kind's m."""
    choose("prefix kind", kind, dict.fromkeys(PREFIX_KINDS))
    check_int("prefix length", length, 0, fix="Use 0 for no prefix rows.")
    check_int("hidden size", hidden, 1)
    if kind == "no-share":
        return FreePrefix(length, hidden)
    if kind == "prompt":
        return PromptPrefix(length, hidden)
    if kind == "linear":
        return SharedPrefix(length, hidden, nn.Linear(hidden, 2 * hidden))
    check_int("bottleneck", bottleneck, 1)
    mlp = nn.Sequential(nn.Linear(hidden, bottleneck), nn.Tanh(), nn.Linear(bottleneck, 2 * hidden))
    return SharedPrefix(length, hidden, mlp)


class PrefixLayer(nn.Module):
    """What gatelab adds to one attention layer: a prefix (or none), the gate on it and the
    value activation (``identity``, or active attention's relu / gelu / tanh)."""

    def __init__(self, prefix: nn.Module | None = None, score: PrefixScore | None = None,
                 value_act: str = "identity"):
        super().__init__()
        value_activation(value_act)
        self.prefix = prefix
        self.score = score if score is not None else PrefixScore()
        self.value_act = value_act

    @classmethod
    def build(cls, hidden: int, *, kind: str = "mlp", length: int = 10, gate: str = "linear",
              activation: str = "tanh", value_act: str = "identity", bottleneck: int = 48
              ) -> PrefixLayer:
        """A layer with a ``make_prefix`` prefix (``length=0`` or ``kind=None``: none)."""
        prefix = make_prefix(kind, length, hidden, bottleneck) if length else None
        return cls(prefix, PrefixScore(gate, activation), value_act)

    def keys_values(self, host: nn.Module, heads: int) -> tuple[Tensor, Tensor] | None:
        """Prefix keys and values (H, P, D) for the host attention module, or None."""
        if self.prefix is None:
            return None
        keys, values = self.prefix(host)
        return _split_heads(keys, heads), _split_heads(values, heads)

