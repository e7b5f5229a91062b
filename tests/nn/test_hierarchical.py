"""The hierarchical MoE layer (arXiv 2410.02935): weights against a per-level loop with each
level's own top-k, both levels trained, and the paper's four gate pairs."""

import pytest
import torch

from gatelab.nn.hierarchical import HierarchicalMoE


def _level(scores, k):
    """Softmax over the k best scores of a level (the rest 0), by hand."""
    keep = scores.topk(k).indices
    w = torch.zeros_like(scores)
    w[keep] = scores[keep].softmax(0)
    return w


def _scores(name, x, W, b):
    if name == "softmax":
        return W @ x + b
    dist = (x - W).norm(dim=-1)
    return b - (dist if name == "laplace" else dist.square())


@pytest.mark.parametrize("outer,inner", [("softmax", "softmax"), ("softmax", "laplace"),
                                         ("laplace", "softmax"), ("laplace", "laplace"),
                                         ("gaussian", "laplace")])
def test_the_weights_are_the_product_of_each_levels_top_k_softmax(outer, inner):
    torch.manual_seed(0)
    layer = HierarchicalMoE(4, 8, 3, 4, outer=outer, inner=inner, outer_top_k=2, inner_top_k=2,
                            bias=True, aux={}).double()
    for p in layer.router.parameters():
        p.data.normal_()
    params = {k: v.detach() for k, v in layer.router.scores.params().items()}
    x = torch.randn(6, 4, dtype=torch.float64)
    routing = layer.router(x)
    dense = torch.zeros(6, 12, dtype=torch.float64).index_put_(
        (routing.token_index, routing.expert_index), routing.weight.detach(), accumulate=True)
    for n in range(6):
        w_outer = _level(_scores(outer, x[n], params["outer.W" if outer != "softmax" else "outer.beta1"],
                                 params["outer.beta0"]), 2)
        for g in range(3):
            key = "inner.W" if inner != "softmax" else "inner.beta1"
            w_inner = _level(_scores(inner, x[n], params[key][g], params["inner.beta0"][g]), 2)
            torch.testing.assert_close(dense[n, g * 4:(g + 1) * 4], w_outer[g] * w_inner)
    assert (dense > 0).sum(-1).tolist() == [4] * 6  # 2 groups x 2 experts per token


def test_both_levels_are_trained():
    torch.manual_seed(1)
    layer = HierarchicalMoE(4, 8, 2, 3, outer="laplace", inner="laplace")
    out = layer(torch.randn(10, 4))
    (out.output.square().mean() + out.aux_loss).backward()
    grads = {n: p.grad for n, p in layer.router.named_parameters()}
    assert set(grads) == {"scores.outer__W", "scores.inner__W"}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_bad_levels_name_the_fix():
    with pytest.raises(ValueError, match="top_k"):
        HierarchicalMoE(4, 8, 2, 3, outer_top_k=3)
    with pytest.raises(ValueError, match="outer_top_k=1 .* never trained"):
        HierarchicalMoE(4, 8, 2, 3, outer_top_k=1)
    with pytest.raises(ValueError, match="Unknown gate 'laplac'"):
        HierarchicalMoE(4, 8, 2, 3, inner="laplac")
