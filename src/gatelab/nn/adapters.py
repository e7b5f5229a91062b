"""Low-rank adapters on a frozen model and PHATGOOSE's post-hoc routing among them
(arXiv 2402.05859, "Learning to Route Among Specialized Experts for Zero-Shot
Generalization"; the authors' code is r-three/phatgoose, ``src/models/addons/moe.py``).

Every adapted linear layer of the backbone becomes a ``LoRABank``: the frozen
``W x + b`` plus E low-rank adapters delta_e(x) = (alpha / r) B_e A_e x. What the bank adds
is chosen by its ``mode``:

- ``"off"``: nothing (the backbone alone);
- ``"single"``: adapter ``adapter`` alone, W x + delta_e(x) (stage 1 trains it); with a
  tensor of indices, each sample (row of x) through its own adapter;
- ``"gated"``: W x + sigmoid(v_e . x) delta_e(x), v_e adapter e's gate vector, initialised
  at 0 (stage 2 trains v_e alone, with the adapter and backbone frozen);
- ``"routed"``: W x + sum_e w_e(x) delta_e(x), each token routed at each bank among all
  adapters (stage 3): scores LN(x) . LN(v_e) / sqrt(d) (LayerNorm without affine on both
  sides), the top 2 kept and renormalised. The sigmoid gate is not applied here: in the
  paper the gate vectors become the router's rows;
- ``"merged"``: one adapter whose A and B are the means of the adapters' (parameter
  averaging, the paper's "merged experts" baseline).

The router is a gatelab ``Router`` with the centred cosine gate (``CosineGate(center=
True)``, temperature 1/sqrt(d), so logits are exactly the score above) whose rows are
the gate vectors: stage 2 trains the same tensor that stage 3 routes with.

gatelab's own LoRA, not peft's: routing needs every adapter of a layer evaluated and mixed
per token inside one module, which peft's adapter switching does not do, and peft is not
a dependency.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int, choose
from ..gates import CosineGate
from .routers import Router

__all__ = ["LoRABank", "MODES", "add_lora", "set_mode", "banks_of"]

MODES = {
    "off": "the frozen layer alone",
    "single": "one adapter: W x + delta_e(x)",
    "gated": "one adapter behind its sigmoid gate: W x + sigmoid(v_e . x) delta_e(x)",
    "routed": "top-k of LN(x) . LN(v_e) / sqrt(d) per token, renormalised",
    "merged": "the adapters' mean A and mean B",
}
Mode = Literal["off", "single", "gated", "routed", "merged"]


class LoRABank(nn.Module):
    """A frozen ``nn.Linear`` with ``n_adapters`` LoRA adapters and their gate vectors.

    y = W x + b + sum_e c_e(x) (alpha / r) B_e A_e x, the coefficients c_e set by ``mode``
    (module docstring). A_e (r, in) starts as LoRA's (Kaiming-uniform), B_e (out, r) at 0,
    so every adapter starts as the identity change; the gate vectors v (E, in) start at 0.
    """

    def __init__(self, base: nn.Linear, n_adapters: int, rank: int = 8, alpha: float | None = None,
                 top_k: int = 2):
        super().__init__()
        check_int("n_adapters", n_adapters, 1)
        self.rank = check_int("rank", rank, 1)
        self.base = base.requires_grad_(False)
        self.scale = (rank if alpha is None else alpha) / rank
        self.A = nn.ParameterList([nn.Parameter(self._init_a(rank, base.in_features))
                                   for _ in range(n_adapters)])
        self.B = nn.ParameterList([nn.Parameter(torch.zeros(base.out_features, rank))
                                   for _ in range(n_adapters)])
        d = base.in_features
        self.router = Router(d, n_adapters, min(top_k, n_adapters), CosineGate(center=True),
                             temperature=d ** -0.5, renormalize=True)
        with torch.no_grad():
            self.gates.zero_()
        self.mode: Mode = "off"
        self.adapter: int | Tensor = 0
        #: When a list, routed forwards append their coefficients (..., E) to it (diagnostics).
        self.record: list[Tensor] | None = None

    @staticmethod
    def _init_a(rank: int, fan_in: int) -> Tensor:
        a = torch.empty(rank, fan_in)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # LoRA's (and nn.Linear's) initialisation
        return a

    @property
    def n_adapters(self) -> int:
        return len(self.A)

    @property
    def gates(self) -> nn.Parameter:
        """The gate vectors v (E, in): the router's rows."""
        return cast(nn.Parameter, self.router.scores.params()["beta1"])

    def delta(self, x: Tensor, e: int) -> Tensor:
        """Adapter e's change (alpha / r) B_e A_e x."""
        return F.linear(F.linear(x, self.A[e]), self.B[e]) * self.scale

    def weights(self, x: Tensor) -> Tensor:
        """The routed coefficients (..., E): the router's top-k renormalised weights, 0 elsewhere."""
        flat = x.reshape(-1, x.shape[-1])
        routing = self.router(flat)
        dense = flat.new_zeros(flat.shape[0], self.n_adapters)
        dense[routing.token_index, routing.expert_index] = routing.weight.to(flat.dtype)
        return dense.view(*x.shape[:-1], self.n_adapters)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.mode == "off":
            return y
        if self.mode == "merged":
            a, b = torch.stack(list(self.A)).mean(0), torch.stack(list(self.B)).mean(0)
            return y + F.linear(F.linear(x, a), b) * self.scale
        if self.mode == "routed":
            coefficients = self.weights(x)
            if self.record is not None:
                self.record.append(coefficients.detach())
            return y + self.mix(x, coefficients)
        if isinstance(self.adapter, int):
            change = self.delta(x, self.adapter)
            if self.mode == "gated":
                change = torch.sigmoid(x @ self.gates[self.adapter].to(x.dtype)).unsqueeze(-1) * change
            return y + change
        # one adapter per sample (rows of x): each row's own A, B (and gate vector), gathered
        own = self.adapter
        ax = torch.einsum("b...i,bri->b...r", x, torch.stack(list(self.A))[own])
        change = torch.einsum("b...r,bor->b...o", ax, torch.stack(list(self.B))[own]) * self.scale
        if self.mode == "gated":
            v = self.gates[own].to(x.dtype).view(len(x), *[1] * (x.dim() - 2), x.shape[-1])
            change = torch.sigmoid((x * v).sum(-1, keepdim=True)) * change
        return y + change

    def mix(self, x: Tensor, coefficients: Tensor) -> Tensor:
        """sum_e c_e(x) delta_e(x) for coefficients (..., E): every adapter's low-rank
        product at once (E r columns, cheap beside W)."""
        ax = torch.einsum("...i,eri->...er", x, torch.stack(list(self.A)))
        return torch.einsum("...er,eor->...o", ax * coefficients.unsqueeze(-1), torch.stack(list(self.B))) \
            * self.scale


def add_lora(model: nn.Module, n_adapters: int, rank: int = 8, alpha: float | None = None,
             within: str = "encoder", top_k: int = 2) -> dict[str, LoRABank]:
    """Replace every ``nn.Linear`` under ``model.<within>`` (for a BERT encoder: each
    layer's query, key, value, attention output, intermediate and output maps) by a
    ``LoRABank`` around it, in place. Everything is frozen, the banks too: each training
    stage turns on what it trains. Returns the banks by name."""
    root = model.get_submodule(within)
    model.requires_grad_(False)
    targets = [(name, module) for name, module in root.named_modules() if isinstance(module, nn.Linear)]
    if not targets:
        raise ValueError(f"model.{within} holds no nn.Linear to adapt; pass within= the submodule "
                         "that holds the transformer layers.")
    banks = {}
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        bank = LoRABank(module, n_adapters, rank, alpha, top_k)
        setattr(parent, child, bank.requires_grad_(False))
        banks[f"{within}.{name}"] = bank
    return banks


def banks_of(model: nn.Module) -> list[LoRABank]:
    """The model's LoRA banks, in module order."""
    return [m for m in model.modules() if isinstance(m, LoRABank)]


def set_mode(banks: Iterable[LoRABank], mode: Mode, adapter: int | Tensor = 0) -> None:
    """Put every bank in ``mode`` (``MODES``), using ``adapter`` for single and gated: one
    index, or a LongTensor of one index per sample (the rows of the inputs)."""
    choose("mode", mode, MODES)
    for bank in banks:
        if mode in ("single", "gated"):
            if isinstance(adapter, Tensor):
                if adapter.numel() and not 0 <= int(adapter.min()) <= int(adapter.max()) < bank.n_adapters:
                    raise ValueError(f"adapter indices must lie in [0, {bank.n_adapters - 1}]; got "
                                     f"{int(adapter.min())}..{int(adapter.max())}.")
            else:
                check_int("adapter", adapter, 0, bank.n_adapters - 1)
        bank.mode, bank.adapter = mode, adapter
