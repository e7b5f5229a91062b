"""Active attention and the small transformer (arXiv 2410.11222): against a hand-written
softmax(q k^T / sqrt(d_h)) act(v), padding invariance, the monomial gate, frozen embeddings."""

import pytest
import torch

from gatelab.nn.attention import VALUE_ACTIVATIONS
from gatelab.nn.transformer import ActiveSelfAttention, SmallTransformer


def _reference(layer: ActiveSelfAttention, x, mask):
    """The layer spelled out head by head with explicit matrices."""
    B, T, W = x.shape
    H, D = layer.heads, W // layer.heads
    act = VALUE_ACTIVATIONS[layer.value_act]
    q, k, v = layer.query(x), layer.key(x), layer.value(x)
    out = torch.zeros(B, T, W, dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            cols = slice(h * D, (h + 1) * D)
            scores = q[b, :, cols] @ k[b, :, cols].T / D ** 0.5
            scores = scores.masked_fill(~mask[b][None, :], float("-inf"))
            out[b, :, cols] = scores.softmax(-1) @ act(v[b, :, cols])
    return layer.out(out)


@pytest.mark.parametrize("act", sorted(VALUE_ACTIVATIONS))
@pytest.mark.parametrize("qk_bias", [True, False])
def test_active_attention_is_softmax_times_act_of_values(act, qk_bias):
    torch.manual_seed(0)
    layer = ActiveSelfAttention(12, 3, value_act=act, qk_bias=qk_bias).double()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    torch.testing.assert_close(layer(x, mask), _reference(layer, x, mask), atol=1e-12, rtol=0)


def test_the_monomial_gate_has_no_query_or_key_bias_and_is_homogeneous():
    layer = ActiveSelfAttention(8, 2, qk_bias=False).double()
    assert layer.query.bias is None and layer.key.bias is None and layer.value.bias is not None
    x = torch.randn(4, 8, dtype=torch.float64)
    scores = layer.query(x) @ layer.key(x).T
    torch.testing.assert_close(layer.query(3 * x) @ layer.key(3 * x).T, 9 * scores)  # x^T A y: degree 2


def test_bad_activation_and_width_name_the_fix():
    with pytest.raises(ValueError, match="value activation.*identity"):
        ActiveSelfAttention(8, 2, value_act="swish")
    with pytest.raises(ValueError, match="not a multiple of heads"):
        ActiveSelfAttention(10, 4)


def test_padding_does_not_change_the_logits_and_embeddings_stay_frozen():
    torch.manual_seed(1)
    table = torch.randn(30, 6)
    model = SmallTransformer(table, 3, width=8, heads=2, depth=2, max_length=10, value_act="gelu").eval()
    ids = torch.randint(1, 30, (2, 4))
    mask = torch.ones(2, 4, dtype=torch.bool)
    padded_ids = torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], 1)
    padded_mask = torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], 1)
    torch.testing.assert_close(model(padded_ids, padded_mask), model(ids, mask), atol=1e-6, rtol=1e-5)
    model(ids, mask).sum().backward()
    assert model.embed.weight.grad is None and torch.equal(model.embed.weight, table)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="exceed max_length 10"):
        model(torch.zeros(1, 11, dtype=torch.long), torch.ones(1, 11, dtype=torch.bool))
