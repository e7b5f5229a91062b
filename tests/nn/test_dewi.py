"""DeWi's pieces: batch-hard triplet loss against a loop over anchors, mixup by hand, the
alternation of the two batch kinds, and the optional heads."""

import torch
import torch.nn.functional as F

from gatelab.nn.dewi import DeWiHeads, batch_hard_triplet_loss, dewi_loss, mixup, mixup_loss


def _triplet_loop(f, y, margin):
    losses = []
    for a in range(len(y)):
        pos = [(f[a] - f[p]).norm() for p in range(len(y)) if p != a and y[p] == y[a]]
        neg = [(f[a] - f[n]).norm() for n in range(len(y)) if y[n] != y[a]]
        if pos and neg:
            losses.append(torch.relu(max(pos) - min(neg) + margin))
    return torch.stack(losses).mean()


def test_batch_hard_triplet_loss_is_the_loop_over_anchors():
    torch.manual_seed(0)
    f = torch.randn(9, 4, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 0, 2, 3])  # class 3 has no positive: skipped as anchor
    torch.testing.assert_close(batch_hard_triplet_loss(f, y, 0.2), _triplet_loop(f, y, 0.2))
    far = torch.tensor([[0.0], [0.1], [10.0], [10.1]])
    assert batch_hard_triplet_loss(far, torch.tensor([0, 0, 1, 1]), 0.2) == 0  # separated by > margin
    assert batch_hard_triplet_loss(far, torch.tensor([0, 1, 2, 3]), 0.2) == 0  # no positives at all


def test_mixup_mixes_inputs_and_targets_with_one_lambda():
    x = torch.arange(12.0).view(4, 3)
    y = torch.tensor([0, 1, 2, 3])
    mixed, y_a, y_b, lam = mixup(x, y, 1.0, torch.Generator().manual_seed(3))
    assert 0 < lam < 1 and torch.equal(y_a, y)
    perm = [int((y == b).nonzero()) for b in y_b]
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[perm])
    logits = torch.randn(4, 4)
    want = lam * F.cross_entropy(logits, y_a) + (1 - lam) * F.cross_entropy(logits, y_b)
    torch.testing.assert_close(mixup_loss(logits, y_a, y_b, lam), want)
    again = mixup(x, y, 1.0, torch.Generator().manual_seed(3))
    assert again[3] == lam  # seeded


def test_steps_alternate_triplet_and_mixup_batches():
    torch.manual_seed(1)
    features, head = torch.nn.Linear(5, 6), torch.nn.Linear(6, 3)
    x, y = torch.randn(8, 5), torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    f = features(x)
    want = F.cross_entropy(head(f), y) + batch_hard_triplet_loss(f, y, 0.2)
    torch.testing.assert_close(dewi_loss(0, x, y, features, head), want)
    g = torch.Generator().manual_seed(5)
    mixed, y_a, y_b, lam = mixup(x, y, 1.0, torch.Generator().manual_seed(5))
    torch.testing.assert_close(dewi_loss(1, x, y, features, head, generator=g),
                               mixup_loss(head(features(mixed)), y_a, y_b, lam))
    heads = DeWiHeads(6, 6)
    loss = dewi_loss(2, x, y, features, head, heads=heads)
    loss.backward()
    assert all(p.grad is not None for p in heads.parameters())
