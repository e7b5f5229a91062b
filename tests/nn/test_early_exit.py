"""JEI-DNN's exits: the exit-target rule and its cumulative targets against hand-computed tables,
exit probabilities, forced gates, the gate features, and the losses' weighting."""

import math

import pytest
import torch
import torch.nn.functional as F

from gatelab.nn.early_exit import (
    EarlyExit,
    at_exit,
    classifier_loss,
    cumulative_targets,
    exit_features,
    exit_probabilities,
    exit_targets,
    first_exit,
    gate_loss,
)


def test_exit_targets_by_hand():
    # three layers (cost 1/3, 2/3, 1), two samples
    ce = torch.tensor([[0.9, 2.0],
                       [0.5, 1.0],
                       [0.1, 0.2]])
    # lam = 0: the smallest CE, layer 2 for both
    assert exit_targets(ce, 0.0).tolist() == [2, 2]
    # lam = 1.5: sample 0: 0.9+0.5, 0.5+1.0, 0.1+1.5 = 1.4, 1.5, 1.6 -> 0;
    #            sample 1: 2.5, 2.0, 1.7 -> 2
    assert exit_targets(ce, 1.5).tolist() == [0, 2]
    # lam = 0.9: sample 0: 1.2, 1.1, 1.0 -> 2; sample 1: 2.3, 1.6, 1.1 -> 2
    assert exit_targets(ce, 0.9).tolist() == [2, 2]
    # lam = 6: sample 0: 2.9, 4.5, 6.1 -> 0; sample 1: 4.0, 5.0, 6.2 -> 0
    assert exit_targets(ce, 6.0).tolist() == [0, 0]


def test_cumulative_targets_by_hand():
    table = cumulative_targets(torch.tensor([0, 2, 1, 3]), 4)  # 4 layers: gates on layers 0-2
    assert table.tolist() == [[1, 0, 0, 0],
                              [1, 0, 1, 0],
                              [1, 1, 1, 0]]


def test_exit_probabilities_sum_to_one_and_follow_the_product():
    g = torch.tensor([[0.2, 0.9], [0.5, 0.0], [0.3, 0.7]])  # the last row is replaced by 1
    p = exit_probabilities(g)
    assert p[:, 0].tolist() == pytest.approx([0.2, 0.8 * 0.5, 0.8 * 0.5])
    assert p[:, 1].tolist() == pytest.approx([0.9, 0.0, 0.1])
    assert torch.allclose(p.sum(0), torch.ones(2))


def test_a_gate_forced_to_one_at_layer_l_gives_layer_ls_prediction():
    torch.manual_seed(0)
    model = EarlyExit(8, 5, 4)
    feats = torch.randn(4, 6, 8)
    logits = model.logits(feats)
    for layer in range(4):
        with torch.no_grad():
            for i, gate in enumerate(model.gates):
                gate.weight.zero_()
                gate.bias.fill_(50.0 if i == layer else -50.0)  # g = 1 at layer, 0 before and after
        probs, exits = model.predict(feats)
        assert exits.tolist() == [layer] * 6
        torch.testing.assert_close(probs, torch.softmax(logits[layer], -1))
    assert first_exit(torch.zeros(3, 2, dtype=torch.bool)).tolist() == [2, 2]  # nobody exits: the last


def test_gate_features_are_max_probability_entropy_and_margin():
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.2]]]))
    f = exit_features(logits.requires_grad_())
    entropy = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    assert f[0, 0].tolist() == pytest.approx([0.5, entropy, 0.2], abs=1e-6)
    assert not f.requires_grad  # detached: gates never train the heads


def test_losses_weight_by_exit_probability_and_bce_on_cumulative_targets():
    torch.manual_seed(1)
    logits = torch.randn(3, 4, 5, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3])
    g = torch.rand(3, 4, requires_grad=True)
    loss = classifier_loss(logits, labels, g)
    ce = torch.stack([F.cross_entropy(logits[i], labels, reduction="none") for i in range(3)])
    p = exit_probabilities(g.detach())
    torch.testing.assert_close(loss, (p * ce).sum(0).mean())
    loss.backward()
    assert g.grad is None  # the classifier step does not move the gates
    target = torch.tensor([0, 1, 2, 2])
    expected = F.binary_cross_entropy(g[:2], cumulative_targets(target, 3))
    torch.testing.assert_close(gate_loss(g, target), expected)
    values = torch.arange(12.0).view(3, 4)
    assert at_exit(values, torch.tensor([2, 0, 1, 2])).tolist() == [8.0, 1.0, 6.0, 11.0]
    with pytest.raises(ValueError, match="at least 2 layers"):
        EarlyExit(4, 2, 1)
