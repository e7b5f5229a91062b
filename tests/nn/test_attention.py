"""Attention as an MoE, prefix gates and parameterisations, on a random BertModel and on
the real all-MiniLM-L6-v2 (issue 13)."""

import pytest
import torch

from gatelab.nn.attention import _one_kernel, additive_mask, explicit_moe, moe_attention
from gatelab.nn.prefix import NORGA_ACTIVATIONS, FreePrefix, PrefixLayer, PrefixScore, SharedPrefix
from markers import needs_minilm

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertModel  # noqa: E402

from gatelab.nn.backbone import PrefixTuned, backbone_path, load_backbone  # noqa: E402

GATES = ["linear", "norga", "laplace", "gaussian", "perturbed_cosine"]


def test_both_fused_paths_agree_on_linear_scores():
    """Plain keys take one kernel over [prefix; tokens]; any other gate the two-softmax
    path. On linear scores both must give the same values and gradients."""
    q, k, v, pk, pv, mask = _qkv()
    plain = moe_attention(q, k, v, mask, prefix_k=pk, prefix_v=pv)
    mixed = moe_attention(q, k, v, mask, prefix_k=pk, prefix_v=pv, prefix_gate=PrefixScore("linear"))
    assert torch.allclose(plain, mixed, atol=1e-12, rtol=0)
    g = torch.randn_like(plain)
    for a, b in zip(torch.autograd.grad((plain * g).sum(), [q, k, v, pk, pv]),
                    torch.autograd.grad((mixed * g).sum(), [q, k, v, pk, pv])):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)


def _bert(dtype=torch.float64, attn="eager", seed=0):
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
                        vocab_size=50, max_position_embeddings=32, attn_implementation=attn)
    return BertModel(config).to(dtype).eval()


def _batch(seed=1, B=3, T=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 6:] = 0  # padding
    mask[2, 3:] = 0
    return ids, mask


def _qkv(dtype=torch.float64, B=2, H=3, T=5, S=5, P=4, D=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype, requires_grad=True)  # noqa: E731
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    mask[-1, ..., S - 2:] = False
    return r(B, H, T, D), r(B, H, S, D), r(B, H, S, D), r(H, P, D), r(H, P, D), mask


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_zero_length_prefixes_equal_the_hosts_eager_attention(dtype, tol):
    ids, mask = _batch()
    host = _bert(dtype)
    want = host(input_ids=ids, attention_mask=mask).last_hidden_state
    layers = {i: PrefixLayer.build(32, length=0) for i in range(3)}
    got = PrefixTuned(_bert(dtype), layers)(input_ids=ids, attention_mask=mask)
    keep = mask.bool()
    assert (got - want)[keep].abs().max() <= tol


def test_hook_runs_in_prompted_layers_only():
    """A value activation in layer 1 changes the output; the same model without it does not
    (so the equality above is gatelab's code path, not a bypass)."""
    ids, mask = _batch()
    plain = PrefixTuned(_bert(), {1: PrefixLayer.build(32, length=0)})(input_ids=ids, attention_mask=mask)
    active = PrefixTuned(_bert(), {1: PrefixLayer.build(32, length=0, value_act="relu")})
    assert (active(input_ids=ids, attention_mask=mask) - plain).abs().max() > 1e-3


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("value_act", ["identity", "gelu"])
def test_fused_path_equals_the_explicit_moe(gate, value_act):
    q, k, v, pk, pv, mask = _qkv()
    score = PrefixScore(gate, "sigmoid").double()
    # score.gate is linear_scores itself for the linear gate (the plain-keys kernel path)
    fused = moe_attention(q, k, v, mask, prefix_k=pk, prefix_v=pv, prefix_gate=score.gate,
                          value_act=value_act)
    weights, experts = explicit_moe(q, k, v, mask, prefix_k=pk, prefix_v=pv, prefix_gate=score,
                                    value_act=value_act)
    assert torch.allclose(fused, weights @ experts, atol=1e-12, rtol=0)
    assert torch.allclose(weights.sum(-1), torch.ones(()).double())
    assert (weights[-1, ..., -2:] == 0).all()  # padded keys get no weight, prefix rows do
    inputs = [q, k, v, pk, pv, *score.parameters()]
    g = torch.randn_like(fused)
    got = torch.autograd.grad((fused * g).sum(), inputs)
    want = torch.autograd.grad(((weights @ experts) * g).sum(), inputs)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-11, rtol=0)


def test_the_one_kernel_path_used_off_the_cpu_equals_the_explicit_moe():
    q, k, v, pk, pv, mask = _qkv()
    score = PrefixScore("norga").double()
    got = _one_kernel(q, k, v, additive_mask(mask, q.dtype), 0.3, pk, pv,
                      score(q, pk, 0.3) - q @ pk.transpose(-1, -2) * 0.3, 0.0)
    weights, experts = explicit_moe(q, k, v, mask, scale=0.3, prefix_k=pk, prefix_v=pv, prefix_gate=score)
    assert torch.allclose(got, weights @ experts, atol=1e-12, rtol=0)


def test_the_explicit_moe_is_a_softmax_over_prefix_and_token_scores_by_hand():
    q, k, v, pk, pv, _ = _qkv(B=1, H=1, T=1, S=2, P=1, D=2)
    c = 2 ** -0.5
    s = torch.stack([q[0, 0, 0] @ pk[0, 0], q[0, 0, 0] @ k[0, 0, 0], q[0, 0, 0] @ k[0, 0, 1]]) * c
    w = torch.exp(s) / torch.exp(s).sum()
    want = w[0] * pv[0, 0] + w[1] * v[0, 0, 0] + w[2] * v[0, 0, 1]
    out = moe_attention(q, k, v, prefix_k=pk, prefix_v=pv)
    assert torch.allclose(out[0, 0, 0], want, atol=1e-12)


def test_gradcheck_of_the_prefix_gates_through_the_fused_kernel():
    q, k, v, pk, pv, mask = _qkv(B=1, H=2, T=3, S=3, P=2, D=3)
    for gate, act in [("norga", "tanh"), ("norga", "gelu"), ("laplace", "tanh"), ("gaussian", "tanh")]:
        score = PrefixScore(gate, act).double()

        def f(q, k, v, pk, pv, score=score):
            return moe_attention(q, k, v, mask, scale=0.5, prefix_k=pk, prefix_v=pv, prefix_gate=score)

        assert torch.autograd.gradcheck(f, (q, k, v, pk, pv))
    alpha_tau = PrefixScore("norga").double()
    def norga(a, t):
        return moe_attention(q, k, v, prefix_k=pk, prefix_v=pv,
                             prefix_gate=lambda x, kp, c: a * torch.tanh(t * (x @ kp.transpose(-1, -2))))

    assert torch.autograd.gradcheck(
        norga,
        (alpha_tau.alpha.detach().clone().requires_grad_(), alpha_tau.tau.detach().clone().requires_grad_()))


def test_norga_with_alpha_zero_is_plain_prefix_tuning():
    ids, mask = _batch()
    torch.manual_seed(3)
    linear = PrefixLayer.build(32, kind="no-share", length=4).double()
    norga = PrefixLayer.build(32, kind="no-share", length=4, gate="norga").double()
    norga.prefix.load_state_dict(linear.prefix.state_dict())
    with torch.no_grad():
        norga.score.alpha.zero_()
        norga.score.tau.fill_(2.7)
    a = PrefixTuned(_bert(), {1: linear})(input_ids=ids, attention_mask=mask)
    b = PrefixTuned(_bert(), {1: norga})(input_ids=ids, attention_mask=mask)
    assert (a - b).abs().max() <= 1e-12
    with torch.no_grad():
        norga.score.alpha.fill_(1.0)
    c = PrefixTuned(_bert(), {1: norga})(input_ids=ids, attention_mask=mask)
    assert (a - c).abs().max() > 1e-4


def test_norga_starts_at_alpha_tau_one_and_scores_by_its_formula():
    score = PrefixScore("norga", "sigmoid")
    assert score.alpha.item() == 1.0 and score.tau.item() == 1.0
    q, _, _, pk, _, _ = _qkv(dtype=torch.float32)
    s = q @ pk.transpose(-1, -2) * 0.4
    assert torch.allclose(score(q, pk, 0.4), s + torch.sigmoid(s))


def test_a_shared_prefix_through_the_identity_equals_no_share_with_the_same_tables():
    free = FreePrefix(4, 32)
    shared = SharedPrefix(4, 64, torch.nn.Identity())
    with torch.no_grad():
        shared.table.copy_(torch.cat([free.keys, free.values], -1))
    ids, mask = _batch()
    a = PrefixTuned(_bert(dtype=torch.float32), {0: PrefixLayer(free)})(input_ids=ids, attention_mask=mask)
    b = PrefixTuned(_bert(dtype=torch.float32), {0: PrefixLayer(shared)})(input_ids=ids, attention_mask=mask)
    assert torch.equal(a, b)


def test_prompt_tuning_passes_prompts_through_the_frozen_key_and_value_maps():
    model = PrefixTuned(_bert(dtype=torch.float32), {2: PrefixLayer.build(32, kind="prompt", length=3)})
    host = model.backbone.encoder.layer[2].attention.self
    keys, values = model.layers["2"].keys_values(host, 4)
    tokens = model.layers["2"].prefix.tokens
    assert torch.allclose(keys.transpose(0, 1).reshape(3, 32), host.key(tokens))
    assert torch.allclose(values.transpose(0, 1).reshape(3, 32), host.value(tokens))


@pytest.mark.parametrize("kind", ["no-share", "mlp", "linear", "prompt"])
def test_training_moves_prefixes_and_leaves_the_backbone_unchanged(kind):
    ids, mask = _batch()
    model = PrefixTuned(_bert(dtype=torch.float32), {1: PrefixLayer.build(32, kind=kind, length=3,
                                                                            gate="norga", bottleneck=8)})
    before = {n: p.clone() for n, p in model.backbone.named_parameters()}
    prefix_before = [p.clone() for p in model.layers.parameters()]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    target = torch.randn(32)  # a layer-normed output's squared norm would be constant
    for _ in range(3):
        opt.zero_grad()
        (model(input_ids=ids, attention_mask=mask)[:, 0] @ target).sum().backward()
        opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.backbone.named_parameters())
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(prefix_before, model.layers.parameters()))


def test_cached_lower_layers_give_the_full_forward():
    ids, mask = _batch()
    model = PrefixTuned(_bert(), {2: PrefixLayer.build(32, kind="mlp", length=3, gate="laplace").double()})
    hidden = model.hidden_before(2, ids, mask)
    assert not hidden.requires_grad
    full = model(input_ids=ids, attention_mask=mask)
    assert torch.allclose(model.forward_from(2, hidden, mask), full, atol=1e-12)
    with pytest.raises(ValueError, match="holds a prefix"):
        model.hidden_before(3, ids, mask)


@pytest.mark.parametrize("build,match", [
    (lambda: PrefixScore("softmaxx"), "Unknown prefix score gate 'softmaxx'.*laplace"),
    (lambda: PrefixScore("quadratic"), "Unknown prefix score gate 'quadratic'"),
    (lambda: PrefixScore("norga", "swish"), "Unknown NoRGa activation 'swish'.*tanh"),
    (lambda: PrefixLayer.build(32, value_act="elu"), "Unknown value activation 'elu'.*relu"),
    (lambda: PrefixLayer.build(32, length=-1), "prefix length.*Got -1"),
    (lambda: PrefixLayer.build(32, kind="shared"), "Unknown prefix kind 'shared'.*no-share"),
    (lambda: PrefixTuned(_bert(), {7: PrefixLayer.build(32)}), "outside the backbone's 3 layers"),
])
def test_bad_options_name_the_fix(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_backbones_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json.*minilm"):
        backbone_path(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="'gpt2' model.*support bert"):
        backbone_path(tmp_path)


def test_a_hub_id_is_read_from_the_local_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="never downloads.*huggingface-cli download someone/tiny"):
        backbone_path("someone/tiny")
    repo = tmp_path / "models--someone--tiny"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"model_type": "bert"}')
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    assert backbone_path("someone/tiny") == snapshot


def test_norga_activations_are_the_papers():
    assert set(NORGA_ACTIVATIONS) == {"tanh", "sigmoid", "gelu", "identity"}


@needs_minilm
def test_real_minilm_without_prefix_equals_its_own_attention_in_float64():
    host, tokenizer = load_backbone(dtype=torch.float64)
    batch = tokenizer(["a dog is a domesticated carnivore", "the sloping land beside a body of water",
                       "an act"], padding=True, return_tensors="pt")
    host.set_attn_implementation("eager")
    want = host(**batch).last_hidden_state
    model = PrefixTuned(host, {i: PrefixLayer.build(384, length=0) for i in range(6)})
    got = model(**batch)
    keep = batch["attention_mask"].bool()
    assert (got - want)[keep].abs().max() <= 1e-10
    assert want.shape[-1] == 384 and len(host.encoder.layer) == 6
