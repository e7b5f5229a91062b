"""FuseMoE (arXiv 2402.03226): multimodal fusion through a sparse MoE whose gate comes from
the catalogue (Laplace top-2 by default), with missing modalities and irregularly sampled
series.

Each modality becomes tokens of width d:

- a vector view: one token, MLP(x) = Linear(GELU(Linear(x)));
- an irregular series: R tokens from an mTAND-style time-attention encoder
  (``TimeAttentionEncoder``, Shukla & Marlin, arXiv 2101.10318): R learned reference times
  attend over the observed time points through a learned time embedding.

Every token gets its modality's type embedding; a modality a sample lacks (``present`` is
False) is replaced by that modality's learned missing-modality embedding (plus its type
embedding), so a sample with any subset of modalities has the same tokens.

Fusion (``router``):

- "joint": the modalities' mean tokens are concatenated, z (M d), and one MoE layer
  routes z (one router on the concatenated modalities);
- "per-modality": every token is routed by its own modality's router over one shared set
  of experts;
- "disjoint": each modality has its own router and its own experts.

The fused tokens (with a residual connection) are mean-pooled into a linear head. Every
router is a trained ``Router`` (registered in the module tree), and the load-balancing and
entropy losses of ``gatelab.nn.losses`` are options (``aux``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn

from .._checks import check_int, choose
from .layer import MoELayer
from .routers import Router

__all__ = ["Modality", "TimeEmbedding", "TimeAttentionEncoder", "FuseMoE", "FusionOutput", "FUSIONS"]

FUSIONS = {
    "joint": "one router on the concatenated modalities",
    "per-modality": "each modality's tokens routed by its own router over shared experts",
    "disjoint": "separate router and experts per modality",
}


@dataclass(frozen=True)
class Modality:
    """One input modality: ``kind`` "vector" (``dim`` features) or "series" (``dim``
    channels, observed at irregular times)."""

    name: str
    kind: str
    dim: int

    def __post_init__(self) -> None:
        choose("modality kind", self.kind, {"vector": "", "series": ""})
        check_int(f"{self.name}.dim", self.dim, 1)


class TimeEmbedding(nn.Module):
    """phi(t) = [w_0 t + b_0, sin(w_1 t + b_1), ..., sin(w_{e-1} t + b_{e-1})] (mTAND)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(1, 1)
        self.periodic = nn.Linear(1, check_int("time_dim", dim, 2) - 1)

    def forward(self, t: Tensor) -> Tensor:
        t = t.unsqueeze(-1)
        return torch.cat([self.linear(t), torch.sin(self.periodic(t))], -1)


class TimeAttentionEncoder(nn.Module):
    """mTAND-style encoder of an irregular series into ``references`` tokens:

        h_r = sum_j softmax_j(phi(r) W_q . phi(t_j) W_k / sqrt(e) + m_j) x_j,  token_r = MLP(h_r)

    with r the learned reference times, phi the ``TimeEmbedding``, m_j = 0 for observed
    points and -inf otherwise. A series with no observed point gives zeros."""

    def __init__(self, channels: int, width: int, *, time_dim: int = 16, references: int = 4):
        super().__init__()
        self.time = TimeEmbedding(time_dim)
        self.reference_times = nn.Parameter(torch.linspace(0, 1, check_int("references", references, 1)))
        self.query = nn.Linear(time_dim, time_dim)
        self.key = nn.Linear(time_dim, time_dim)
        self.out = nn.Sequential(nn.Linear(channels, width), nn.GELU(), nn.Linear(width, width))

    def forward(self, values: Tensor, times: Tensor, observed: Tensor) -> Tensor:
        """values (B, T, C), times (B, T), observed (B, T) bool -> tokens (B, R, width)."""
        q = self.query(self.time(self.reference_times))                      # (R, e)
        k = self.key(self.time(times))                                       # (B, T, e)
        scores = (k @ q.T).transpose(1, 2) / math.sqrt(q.shape[-1])          # (B, R, T)
        scores = scores.masked_fill(~observed.bool().unsqueeze(1), float("-inf"))
        weights = torch.nan_to_num(scores.softmax(-1))                       # all-masked rows -> 0
        return self.out(weights @ values)


class FusionOutput(NamedTuple):
    """Logits (B, classes); the weighted auxiliary loss; per fusion MoE its router probabilities."""

    logits: Tensor
    aux_loss: Tensor
    router_probs: tuple[Tensor, ...]


class FuseMoE(nn.Module):
    """Multimodal classifier with MoE fusion (module docstring, arXiv 2402.03226).

    ``gate``: any catalogue gate for the routers ("laplace": -||x - w_e||, FuseMoE's
    choice; "softmax"; "gaussian"); ``top_k`` experts per token; ``aux``: auxiliary losses,
    name -> weight (default {"load_balance": 0.01}, as FuseMoE; add "entropy" for the
    entropy regulariser; {} for none); other keyword options go to every ``Router``."""

    def __init__(self, modalities: Sequence[Modality], classes: int, *, width: int = 64, n_experts: int = 8,
                 top_k: int = 2, gate: str = "laplace", router: str = "joint", ffn_dim: int | None = None,
                 references: int = 4, time_dim: int = 16, aux: Mapping[str, float] | None = None,
                 **router_options: Any):
        super().__init__()
        names = [m.name for m in modalities]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"FuseMoE needs at least one modality, each with its own name; got {names}.")
        choose("fusion router", router, FUSIONS)
        self.modalities, self.fusion = tuple(modalities), router
        self.encoders = nn.ModuleDict({m.name: self._encoder(m, width, references, time_dim)
                                       for m in modalities})
        self.type_embedding = nn.Parameter(torch.randn(len(names), width) * 0.02)
        self.missing_embedding = nn.Parameter(torch.randn(len(names), width) * 0.02)
        dim = width * len(names) if router == "joint" else width
        layers = 1 if router == "joint" else len(names)
        self.routers = nn.ModuleList(Router(dim, n_experts, top_k, gate, **router_options)
                                     for _ in range(layers))
        shared = router == "per-modality"
        self.moe = nn.ModuleList(
            MoELayer(dim, ffn_dim or 2 * dim, n_experts, top_k, router=self._router(i), expert="gelu",
                     aux=None if aux is None else dict(aux))
            for i in range(1 if shared else layers))
        self.head = nn.Linear(dim, classes)

    @staticmethod
    def _encoder(m: Modality, width: int, references: int, time_dim: int) -> nn.Module:
        if m.kind == "vector":
            return nn.Sequential(nn.Linear(m.dim, width), nn.GELU(), nn.Linear(width, width))
        return TimeAttentionEncoder(m.dim, width, time_dim=time_dim, references=references)

    def tokens(self, inputs: Mapping[str, Any], present: Tensor) -> list[Tensor]:
        """Per modality its tokens (B, n_m, width): encoded, then ``embed``."""
        encoded = []
        for m in self.modalities:
            if m.name not in inputs:
                raise ValueError(f"FuseMoE got no input for modality {m.name!r}; pass every modality "
                                 "(any values where it is missing) and mark absences in present.")
            encoder, given = self.encoders[m.name], inputs[m.name]
            encoded.append(encoder(given).unsqueeze(1) if m.kind == "vector" else encoder(*given))
        return self.embed(encoded, present)

    def embed(self, encoded: Sequence[Tensor], present: Tensor) -> list[Tensor]:
        """Encoded tokens (B, n_m, width) per modality -> the missing embedding where
        ``present`` (B, M) is False, plus the type embedding."""
        return [torch.where(present[:, i].view(-1, 1, 1).bool(), t, self.missing_embedding[i])
                + self.type_embedding[i] for i, t in enumerate(encoded)]

    def forward(self, inputs: Mapping[str, Any], present: Tensor | None = None) -> FusionOutput:
        """``inputs``: modality name -> (B, dim) for vectors, (values, times, observed) for
        series; ``present`` (B, M) bool, default all present."""
        batch = next(iter(inputs.values()))
        B = (batch if isinstance(batch, Tensor) else batch[0]).shape[0]
        present = torch.ones(B, len(self.modalities), dtype=torch.bool) if present is None else present
        return self.fuse(self.tokens(inputs, present))

    def fuse(self, tokens: Sequence[Tensor]) -> FusionOutput:
        """The fusion MoE, residual, mean pool and head on per-modality tokens (``tokens``)."""
        if self.fusion == "joint":
            z = torch.cat([t.mean(1) for t in tokens], -1)
            out = self.moe[0](z)
            return FusionOutput(self.head(z + out.output), out.aux_loss, (out.router_probs,))
        flat = [t.reshape(-1, t.shape[-1]) for t in tokens]
        if self.fusion == "per-modality":  # every modality's router, the shared experts, one dispatch
            outs = self._layer(0).route_groups(flat, [self._router(i) for i in range(len(flat))])
        else:
            outs = [self._layer(i).route(x, self._router(i)) for i, x in enumerate(flat)]
        pooled = torch.cat([t + o.output.view(t.shape) for t, o in zip(tokens, outs, strict=True)], 1).mean(1)
        aux = torch.stack([o.aux_loss for o in outs]).sum()
        return FusionOutput(self.head(pooled), aux, tuple(o.router_probs for o in outs))

    def _router(self, i: int) -> Router:
        return cast(Router, self.routers[i])

    def _layer(self, i: int) -> MoELayer:
        return cast(MoELayer, self.moe[0 if self.fusion == "per-modality" else i])
