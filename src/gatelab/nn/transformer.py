"""A small pre-LN transformer encoder built on ``moe_attention``, for training attention
variants from scratch (arXiv 2410.11222):

- active attention: softmax(Q K^T / sqrt(d_h)) act(V), act in ``VALUE_ACTIVATIONS``
  ("identity" is standard attention);
- the gate's form: with biases in the query and key maps the score (W_q x_i + b_q) .
  (W_k x_j + b_k) is a quadratic *polynomial* of the tokens; without them
  (``qk_bias=False``) it is the quadratic *monomial* x_i^T W_q^T W_k x_j, the gate the
  paper finds more sample-efficient.

Tokens enter through a given embedding table (e.g. a pre-trained model's, kept frozen) and
a trainable projection to the model width, plus learned positions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import moe_attention, value_activation
from .backbone import mean_pool

__all__ = ["ActiveSelfAttention", "SmallTransformer"]


class ActiveSelfAttention(nn.Module):
    """Multi-head self-attention out = W_o [softmax(q k^T / sqrt(d_h) + mask) act(v)]_heads
    (arXiv 2410.11222), q, k, v = x W_q (+ b_q), x W_k (+ b_k), x W_v + b_v."""

    def __init__(self, width: int, heads: int, value_act: str = "identity", qk_bias: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}; "
                             "pick width = heads x head size.")
        value_activation(value_act)
        self.heads, self.value_act, self.dropout = heads, value_act, dropout
        self.query = nn.Linear(width, width, bias=qk_bias)
        self.key = nn.Linear(width, width, bias=qk_bias)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def _split(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.heads, -1).transpose(1, 2)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x (B, T, width); mask (B, T) boolean, True for real tokens. Returns (B, T, width)."""
        attend = None if mask is None else mask[:, None, None, :].bool()
        q, k, v = (self._split(f(x)) for f in (self.query, self.key, self.value))
        heads = moe_attention(q, k, v, attend, value_act=self.value_act,
                              dropout=self.dropout if self.training else 0.0)
        return self.out(heads.transpose(1, 2).flatten(2))


class SmallTransformer(nn.Module):
    """Embedding table -> Linear(e, width) + positions -> ``depth`` pre-LN blocks
    (x + attn(LN x); x + FFN(LN x), FFN = Linear(width, 4 width) -> GELU -> Linear) ->
    LN -> mean over the real tokens -> Linear(width, classes)."""

    def __init__(self, embeddings: Tensor, classes: int, *, width: int = 64, heads: int = 4, depth: int = 2,
                 max_length: int = 64, value_act: str = "identity", qk_bias: bool = True,
                 dropout: float = 0.1, train_embeddings: bool = False):
        super().__init__()
        self.embed = nn.Embedding.from_pretrained(embeddings, freeze=not train_embeddings)
        self.project = nn.Linear(embeddings.shape[1], width)
        self.positions = nn.Parameter(torch.randn(max_length, width) * 0.02)
        self.attention = nn.ModuleList(ActiveSelfAttention(width, heads, value_act, qk_bias, dropout)
                                       for _ in range(depth))
        self.ffn = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
            for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(2 * depth + 1))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(width, classes)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """ids, mask (B, T), T <= max_length -> logits (B, classes)."""
        if ids.shape[1] > len(self.positions):
            raise ValueError(f"Sequences of {ids.shape[1]} tokens exceed max_length {len(self.positions)}.")
        x = self.drop(self.project(self.embed(ids)) + self.positions[:ids.shape[1]])
        for i, (attention, ffn) in enumerate(zip(self.attention, self.ffn, strict=True)):
            x = x + self.drop(attention(self.norms[2 * i](x), mask))
            x = x + self.drop(ffn(self.norms[2 * i + 1](x)))
        return self.head(mean_pool(self.norms[-1](x), mask))
