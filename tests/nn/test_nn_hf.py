"""gatelab.nn against Hugging Face transformers 5.x MoE blocks on the same weights."""

import pytest
import torch

import gatelab.nn as gn

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, MixtralConfig, Qwen2MoeConfig  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock  # noqa: E402

H = 16

BLOCKS = {
    "mixtral": lambda: MixtralSparseMoeBlock(MixtralConfig(
        hidden_size=H, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2)),
    "qwen2-moe": lambda: Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(
        hidden_size=H, moe_intermediate_size=24, shared_expert_intermediate_size=20,
        num_experts=8, num_experts_per_tok=3, norm_topk_prob=False)),
    "deepseek-v3": lambda: DeepseekV3MoE(DeepseekV3Config(
        hidden_size=H, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
        n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5,
        norm_topk_prob=True)),
}
TOLERANCES = {torch.float64: {"rtol": 0, "atol": 1e-10},
              torch.float32: {"rtol": 1e-4, "atol": 1e-5}}


def _block(name, dtype, seed=0):
    torch.manual_seed(seed)
    block = BLOCKS[name]()
    with torch.no_grad():
        for p in block.parameters():  # HF leaves expert weights uninitialised
            p.normal_(0, 0.3)
        for key, b in block.named_buffers():
            if "bias" in key:
                b.normal_(0, 0.1)  # a trained DeepSeek-V3 selection bias is not zero
    return block.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_from_hf_matches_outputs_and_input_gradients(name, dtype):
    block = _block(name, dtype)
    layer = gn.from_hf(block)
    x = torch.randn(3, 9, H, dtype=dtype, generator=torch.Generator().manual_seed(1))
    x_hf, x_gl = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = block(x_hf), layer(x_gl).output
    torch.testing.assert_close(got, want, **TOLERANCES[dtype])
    g = torch.randn_like(want)
    want.backward(g)
    got.backward(g)
    torch.testing.assert_close(x_gl.grad, x_hf.grad, **TOLERANCES[dtype])


def test_from_hf_expert_gradients_match_too():
    block = _block("mixtral", torch.float64)
    layer = gn.from_hf(block)
    x = torch.randn(20, H, dtype=torch.float64)
    block(x.view(1, 20, H)).sum().backward()
    layer(x).output.sum().backward()
    torch.testing.assert_close(layer.experts.gate_up_proj.grad, block.experts.gate_up_proj.grad)
    torch.testing.assert_close(layer.router.scores.beta1.grad, block.gate.weight.grad)


def test_swap_router_keeps_the_model_when_the_gate_is_the_same_and_changes_it_otherwise():
    block = _block("mixtral", torch.float64)
    x = torch.randn(1, 12, H, dtype=torch.float64)
    before = block(x)
    experts = block.experts.gate_up_proj.detach().clone()
    assert gn.swap_router(block, "softmax", router_dtype=torch.float32) == [""]
    assert isinstance(block.gate, gn.HFRouter)
    torch.testing.assert_close(block(x), before, rtol=0, atol=1e-12)
    gn.swap_router(block, "laplace", expanded=True)
    block.gate.double()
    after = block(x)
    assert not torch.allclose(after, before)
    after.sum().backward()
    assert block.gate.router.scores.W.grad.abs().sum() > 0  # the new router trains
    assert torch.equal(block.experts.gate_up_proj, experts)  # the experts are kept


def test_swap_router_in_a_whole_model():
    config = MixtralConfig(hidden_size=H, intermediate_size=24, num_local_experts=4,
                           num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, vocab_size=50)
    model = transformers.MixtralForCausalLM(config)
    names = gn.swap_router(model, "cosine", proj_dim=8, learn_temperature=True)
    assert names == ["model.layers.0.mlp", "model.layers.1.mlp"]
    seen = []
    for name in names:
        block = model.get_submodule(name)
        block.register_forward_hook(lambda m, args, out: seen.append((m, args[0], out)))
    logits = model(torch.randint(0, 50, (2, 5))).logits
    assert logits.shape == (2, 5, 50)
    assert len(seen) == 2
    for block, x, out in seen:  # each block mixes its own experts by the new router
        torch.testing.assert_close(out, _mixed_by_hand(block, x), rtol=1e-5, atol=1e-6)


def _mixed_by_hand(block, x_BTH):
    """sum over the router's assignments of weight * SwiGLU expert, token by token."""
    x = x_BTH.reshape(-1, x_BTH.shape[-1])
    routing = block.gate.router(x)
    out = torch.zeros_like(x)
    ex = block.experts
    for t, e, w in zip(routing.token_index.tolist(), routing.expert_index.tolist(), routing.weight):
        gate, up = (ex.gate_up_proj[e] @ x[t]).chunk(2)
        out[t] += w * (ex.down_proj[e] @ (torch.nn.functional.silu(gate) * up))
    return out.view_as(x_BTH)


def test_unsupported_blocks_and_missing_weights_get_clear_errors():
    with pytest.raises(TypeError, match="from_hf converts MixtralSparseMoeBlock"):
        gn.from_hf(torch.nn.Linear(3, 3))
    block = _block("qwen2-moe", torch.float32)
    del block.shared_expert_gate
    with pytest.raises(KeyError, match="no 'shared_expert_gate.weight'"):
        gn.from_hf(block)
    with pytest.raises(ValueError, match="No transformers MoE block"):
        gn.swap_router(torch.nn.Linear(3, 3))


# --- a swapped model trains and round-trips (issue 11, point 8) ------------------------------

def _small_mixtral(seed=0):
    torch.manual_seed(seed)
    config = MixtralConfig(hidden_size=H, intermediate_size=24, num_local_experts=4,
                           num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, vocab_size=50, output_router_logits=True)
    return transformers.MixtralForCausalLM(config)


def _captured_logits(model):
    """The logits every HFRouter returns in the next forward pass, in call order."""
    seen = []
    for module in model.modules():
        if isinstance(module, gn.HFRouter):
            module.register_forward_hook(lambda m, args, out: seen.append(out[0]))
    return seen


def test_a_swapped_model_trains_with_transformers_aux_loss():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    model = _small_mixtral()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    before = model(input_ids=ids, labels=ids)
    gn.swap_router(model, "softmax")              # the same router, as a gatelab Router
    same = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(same.aux_loss, before.aux_loss)
    gn.swap_router(model, "laplace")
    seen = _captured_logits(model)
    out = model(input_ids=ids, labels=ids)
    assert len(out.router_logits) == 2 and len(seen) == 2
    want = load_balancing_loss_func(tuple(seen), 4, 2, None)
    torch.testing.assert_close(out.aux_loss, want)
    out.aux_loss.backward()                       # the aux loss alone reaches the new routers
    assert model.model.layers[0].mlp.gate.router.scores.W.grad.abs().sum() > 0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.step()
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def test_save_pretrained_and_load_swapped_restore_the_router(tmp_path):
    import gatelab as gl
    model = _small_mixtral()
    gn.swap_router(model, gl.make_gate("laplace", expanded=True), router_dtype=torch.float32)
    with torch.no_grad():
        for p in model.model.layers[1].mlp.gate.parameters():
            p.add_(0.5)                          # "trained": away from any initialisation
    model.save_pretrained(tmp_path)
    loaded = gn.load_swapped(str(tmp_path))
    router = loaded.model.layers[1].mlp.gate
    assert isinstance(router, gn.HFRouter) and router.router.scores.gate == gl.make_gate(
        "laplace", expanded=True) and router.router.router_dtype == torch.float32
    for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(2))
    a, b = model(input_ids=ids, labels=ids), loaded(input_ids=ids, labels=ids)
    torch.testing.assert_close(b.logits, a.logits)
    torch.testing.assert_close(b.aux_loss, a.aux_loss)


def test_load_swapped_refuses_a_plain_checkpoint(tmp_path):
    _small_mixtral().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds no swapped router"):
        gn.load_swapped(str(tmp_path))
