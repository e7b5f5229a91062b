"""LoRA banks and PHATGOOSE routing (arXiv 2402.05859): each mode against its formula written
out by hand, the saturated-gate and one-adapter limits, frozen stages, and the hook into a
transformers BertModel."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gatelab.nn.adapters import LoRABank, add_lora, banks_of, set_mode


def bank(n_adapters: int = 3, d_in: int = 6, d_out: int = 5, seed: int = 0) -> LoRABank:
    torch.manual_seed(seed)
    b = LoRABank(nn.Linear(d_in, d_out), n_adapters, rank=2, alpha=3.0)
    with torch.no_grad():  # B starts at 0 (every adapter the identity change): give it values
        for p in b.B:
            p.normal_()
        b.gates.normal_()
    return b


def by_hand(b: LoRABank, x: torch.Tensor, e: int) -> torch.Tensor:
    return x @ b.A[e].T @ b.B[e].T * 3.0 / 2


def test_single_and_merged_are_the_low_rank_formulas():
    b, x = bank(), torch.randn(4, 7, 6)
    base = b.base(x)
    set_mode([b], "off")
    assert torch.equal(b(x), base)
    set_mode([b], "single", 1)
    torch.testing.assert_close(b(x), base + by_hand(b, x, 1))
    set_mode([b], "merged")
    a_bar, b_bar = sum(b.A) / 3, sum(b.B) / 3
    torch.testing.assert_close(b(x), base + x @ a_bar.T @ b_bar.T * 1.5)


def test_routed_weights_are_the_layer_norm_scores_top2_renormalised():
    b, x = bank(n_adapters=4), torch.randn(9, 6)
    scores = F.layer_norm(x, (6,), eps=0.0) @ F.layer_norm(b.gates, (6,), eps=0.0).T / 6 ** 0.5
    top = scores.topk(2, dim=-1)
    expected = torch.zeros(9, 4).scatter(1, top.indices, torch.softmax(top.values, -1))
    w = b.weights(x)
    torch.testing.assert_close(w, expected)
    assert torch.allclose(w.sum(-1), torch.ones(9)) and ((w > 0).sum(-1) == 2).all()
    set_mode([b], "routed")
    mixed = sum(w[:, e:e + 1] * by_hand(b, x, e) for e in range(4))
    torch.testing.assert_close(b(x), b.base(x) + mixed)


def test_one_adapter_routed_or_behind_a_saturated_gate_is_the_adapted_layer():
    b, x = bank(n_adapters=1), torch.randn(5, 6).abs()
    set_mode([b], "single", 0)
    adapted = b(x)
    set_mode([b], "routed")
    torch.testing.assert_close(b(x), adapted)  # the only adapter gets weight 1
    with torch.no_grad():
        b.gates.fill_(100.0)  # v . x >> 0 for positive x: sigmoid = 1
    set_mode([b], "gated", 0)
    torch.testing.assert_close(b(x), adapted)
    with torch.no_grad():
        b.gates.zero_()
    torch.testing.assert_close(b(x), b.base(x) + 0.5 * (adapted - b.base(x)))  # sigmoid(0) = 1/2


def test_modes_are_checked():
    b = bank()
    with pytest.raises(ValueError, match="mode"):
        set_mode([b], "average")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="adapter"):
        set_mode([b], "single", 3)


def tiny_bert():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    return BertModel(BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=24, vocab_size=50, max_position_embeddings=16)).eval()


def test_add_lora_wraps_every_encoder_linear_and_starts_as_the_backbone():
    model = tiny_bert()
    ids = torch.randint(0, 50, (3, 8))
    before = model(input_ids=ids).last_hidden_state
    banks = add_lora(model, 2, rank=2)
    assert len(banks) == 2 * 6  # query, key, value, attention output, intermediate, output per layer
    assert all(not p.requires_grad for p in model.parameters())
    for mode in ("off", "single", "merged", "routed"):
        set_mode(banks.values(), mode)  # type: ignore[arg-type]
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, before)  # B = 0
    with pytest.raises(ValueError, match="no nn.Linear"):
        add_lora(nn.Sequential(nn.ReLU()), 1, within="0")


def test_one_adapter_per_sample_is_each_sample_through_its_own_adapter():
    b, x = bank(n_adapters=3), torch.randn(4, 5, 6)
    owner = torch.tensor([2, 0, 2, 1])
    for mode in ("single", "gated"):
        set_mode([b], mode, owner)
        got = b(x)
        for i, e in enumerate(owner.tolist()):
            set_mode([b], mode, e)
            torch.testing.assert_close(got[i], b(x[i:i + 1])[0])
    with pytest.raises(ValueError, match=r"adapter indices must lie in \[0, 2\]"):
        set_mode([b], "single", torch.tensor([0, 3]))


def test_gate_training_leaves_adapters_and_backbone_untouched():
    from gatelab.experiments.phatgoose import train_gates
    from gatelab.experiments.text import GlossPool
    model = tiny_bert()
    banks = list(add_lora(model, 2, rank=2).values())
    with torch.no_grad():
        for b in banks:
            for p in b.B:
                p.normal_()
    ids = torch.randint(1, 50, (8, 6))
    pool = GlossPool(ids, torch.ones_like(ids), torch.tensor([0, 1] * 4), (), (), ("a", "b"), "k")
    head = nn.Linear(16, 2).requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    options = {"gate_lr": 0.1, "gate_steps": 3, "gate_batch": 4}
    train_gates(model, head, pool, [torch.arange(4), torch.arange(4, 8)], pool.labels, options,
                torch.Generator().manual_seed(0))
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.endswith("router.scores.beta1") for k in changed)
    for k in changed:  # both adapters' gate rows trained
        assert not torch.equal(after[k][0], before[k][0]) and not torch.equal(after[k][1], before[k][1])
    assert all(not p.requires_grad for p in model.parameters())
    assert banks_of(model) == banks
