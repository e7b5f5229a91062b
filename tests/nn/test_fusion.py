"""FuseMoE (arXiv 2402.03226): the time-attention encoder against a loop, missing modalities
that cannot leak, batched == per sample, trained routers in every fusion mode, shared vs
separate experts, and bad input."""

import pytest
import torch

from gatelab.nn.fusion import FUSIONS, FuseMoE, Modality, TimeAttentionEncoder
from gatelab.nn.layer import MoELayer
from gatelab.nn.routers import Router

MODALITIES = [Modality("a", "vector", 5), Modality("b", "vector", 3), Modality("s", "series", 2)]


def _inputs(B=4, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    observed = torch.rand(B, T, generator=g) > 0.3
    observed[:, 0] = True
    return {"a": torch.randn(B, 5, generator=g), "b": torch.randn(B, 3, generator=g),
            "s": (torch.randn(B, T, 2, generator=g), torch.rand(B, T, generator=g).sort(-1).values, observed)}


def test_time_attention_matches_a_loop_over_reference_times_and_observed_points():
    torch.manual_seed(0)
    enc = TimeAttentionEncoder(2, 8, time_dim=6, references=3).double()
    values, times, observed = (t.double() if t.is_floating_point() else t for t in _inputs()["s"])
    got = enc(values, times, observed)
    phi_r = enc.query(enc.time(enc.reference_times))
    for b in range(values.shape[0]):
        keep = observed[b]
        phi_t = enc.key(enc.time(times[b, keep]))
        for r in range(3):
            w = (phi_t @ phi_r[r] / 6 ** 0.5).softmax(0)
            torch.testing.assert_close(got[b, r], enc.out(w @ values[b, keep]), atol=1e-12, rtol=0)


def test_unobserved_points_do_not_matter_and_an_empty_series_gives_the_zero_input():
    torch.manual_seed(1)
    enc = TimeAttentionEncoder(2, 8)
    values, times, observed = _inputs()["s"]
    changed = values.masked_fill(~observed.unsqueeze(-1), 1e3)
    torch.testing.assert_close(enc(changed, times, observed), enc(values, times, observed))
    empty = enc(values, times, torch.zeros_like(observed))
    torch.testing.assert_close(empty, enc.out(torch.zeros(2)).expand_as(empty))


@pytest.mark.parametrize("router", sorted(FUSIONS))
def test_a_missing_modality_cannot_leak_and_batched_equals_per_sample(router):
    torch.manual_seed(2)
    model = FuseMoE(MODALITIES, 3, width=8, n_experts=4, top_k=2, router=router, references=2).eval()
    inputs = _inputs()
    present = torch.tensor([[True, False, True], [True, True, True], [False, True, True],
                            [True, True, False]])
    logits = model(inputs, present).logits
    leaked = dict(inputs, b=inputs["b"] * 100)  # b is absent in sample 0
    torch.testing.assert_close(model(leaked, present).logits[0], logits[0])
    assert not torch.allclose(model(leaked, present).logits[1], logits[1])  # present there
    for i in range(4):
        one = {"a": inputs["a"][i:i + 1], "b": inputs["b"][i:i + 1],
               "s": tuple(t[i:i + 1] for t in inputs["s"])}
        torch.testing.assert_close(model(one, present[i:i + 1]).logits, logits[i:i + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("router,expert_sets,routers", [("joint", 1, 1), ("per-modality", 1, 3),
                                                         ("disjoint", 3, 3)])
def test_every_router_is_trained_and_experts_are_shared_only_where_asked(router, expert_sets, routers):
    torch.manual_seed(3)
    model = FuseMoE(MODALITIES, 3, width=8, n_experts=4, router=router, gate="laplace", references=2,
                    aux={"load_balance": 0.01, "entropy": 0.01})
    assert len(model.moe) == expert_sets and len(model.routers) == routers
    out = model(_inputs())
    (out.logits.square().mean() + out.aux_loss).backward()
    assert out.aux_loss > 0
    for r in model.routers:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in r.parameters())
    names = {n for n, _ in model.named_parameters()}
    assert sum(n.endswith("experts.up_proj") for n in names) == expert_sets
    assert model.missing_embedding.grad is None or model.missing_embedding.grad.abs().sum() == 0


def test_route_with_another_router_is_that_router_over_the_same_experts():
    torch.manual_seed(4)
    layer = MoELayer(6, 12, 4, 2, expert="gelu", aux={})
    other = Router(6, 4, 2, "laplace")
    twin = MoELayer(6, 12, 4, 2, router=other, expert="gelu", aux={})
    twin.experts.load_state_dict(layer.experts.state_dict())
    x = torch.randn(5, 6)
    torch.testing.assert_close(layer.route(x, other).output, twin(x).output)


def test_route_groups_is_each_group_routed_alone_in_one_dispatch():
    torch.manual_seed(5)
    layer = MoELayer(6, 12, 4, 2, expert="gelu", aux={"load_balance": 0.01, "entropy": 0.01})
    routers = [Router(6, 4, 2, "laplace"), Router(6, 4, 2, "softmax"), layer.router]
    xs = [torch.randn(n, 6) for n in (3, 5, 2)]
    for got, x, r in zip(layer.route_groups(xs, routers), xs, routers, strict=True):
        want = layer.route(x, r)
        torch.testing.assert_close(got.output, want.output)
        torch.testing.assert_close(got.aux_loss, want.aux_loss)
        assert torch.equal(got.expert_counts, want.expert_counts)


def test_bad_input_names_the_fix():
    with pytest.raises(ValueError, match="fusion router.*joint"):
        FuseMoE(MODALITIES, 3, router="late")
    with pytest.raises(ValueError, match="modality kind"):
        Modality("x", "image", 3)
    with pytest.raises(ValueError, match="its own name"):
        FuseMoE([MODALITIES[0], MODALITIES[0]], 3)
    model = FuseMoE(MODALITIES, 3, width=8, n_experts=4, references=2)
    with pytest.raises(ValueError, match="no input for modality 'b'"):
        model({"a": torch.randn(2, 5), "s": _inputs(B=2)["s"]})
