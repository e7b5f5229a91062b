"""DeWi (insect-pest classification, authors' code toannguyen1904/DeWi): a one-stage training
recipe for any classifier that alternates, batch by batch,

- (a) cross-entropy plus a triplet-margin loss on the features, with batch-hard mining
  (each anchor against its farthest positive and nearest negative in the batch,
  margin 0.2): "deep", discriminative features;
- (b) mixup cross-entropy (Zhang et al. 2018, alpha = 1): lam ~ Beta(alpha, alpha),
  x' = lam x_i + (1 - lam) x_j, loss lam CE(f(x'), y_i) + (1 - lam) CE(f(x'), y_j):
  "wide", better generalisation.

The classifier is ``features`` (inputs -> (B, F)) then ``head`` (features -> logits). The
authors' two projection heads, one on the features for the triplet loss and one before
the classifier, are optional (``DeWiHeads``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["batch_hard_triplet_loss", "mixup", "mixup_loss", "DeWiHeads", "dewi_loss"]


def batch_hard_triplet_loss(features: Tensor, labels: Tensor, margin: float = 0.2) -> Tensor:
    """mean over anchors a with a positive and a negative in the batch of
    relu(max_p d(a, p) - min_n d(a, n) + margin), d the Euclidean distance, p != a of a's
    label, n of another label (Hermans et al. 2017's batch-hard mining). 0 if no anchor has both."""
    dist = torch.cdist(features, features)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive = same & ~eye
    hardest_positive = dist.masked_fill(~positive, float("-inf")).amax(1)
    hardest_negative = dist.masked_fill(same, float("inf")).amin(1)
    valid = positive.any(1) & (~same).any(1)
    if not valid.any():
        return features.sum() * 0.0
    return F.relu(hardest_positive - hardest_negative + margin)[valid].mean()


def mixup(x: Tensor, labels: Tensor, alpha: float, generator: torch.Generator | None = None
          ) -> tuple[Tensor, Tensor, Tensor, float]:
    """(lam x + (1 - lam) x[perm], labels, labels[perm], lam) with lam ~ Beta(alpha, alpha)
    and perm a random permutation of the batch."""
    lam = _beta(alpha, generator)
    perm = torch.randperm(len(x), generator=generator, device=x.device)
    return lam * x + (1 - lam) * x[perm], labels, labels[perm], lam


def _beta(alpha: float, generator: torch.Generator | None) -> float:
    """One Beta(alpha, alpha) draw, seeded from ``generator`` (torch's Beta takes none)."""
    seed = int(torch.randint(2 ** 62, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def mixup_loss(logits: Tensor, y_a: Tensor, y_b: Tensor, lam: float) -> Tensor:
    """lam CE(logits, y_a) + (1 - lam) CE(logits, y_b)."""
    return lam * F.cross_entropy(logits, y_a) + (1 - lam) * F.cross_entropy(logits, y_b)


class DeWiHeads(nn.Module):
    """The authors' optional projection heads: ``triplet`` maps features to the embedding
    the triplet loss sees, ``classifier`` maps them before the linear head."""

    def __init__(self, features: int, width: int):
        super().__init__()
        self.triplet = nn.Sequential(nn.Linear(features, width), nn.ReLU(), nn.Linear(width, width))
        self.classifier = nn.Sequential(nn.Linear(features, width), nn.ReLU())


def dewi_loss(step: int, x: Tensor, labels: Tensor, features: Callable[[Tensor], Tensor],
              head: Callable[[Tensor], Tensor], *, margin: float = 0.2, alpha: float = 1.0,
              heads: DeWiHeads | None = None, generator: torch.Generator | None = None) -> Tensor:
    """The loss of training step ``step``: even steps CE + batch-hard triplet (a), odd steps
    mixup CE (b). With ``heads``, the triplet loss sees heads.triplet(features) and the head
    sees heads.classifier(features)."""
    def classify(f: Tensor) -> Tensor:
        return head(heads.classifier(f) if heads is not None else f)

    if step % 2 == 0:
        f = features(x)
        embedded = heads.triplet(f) if heads is not None else f
        return F.cross_entropy(classify(f), labels) + batch_hard_triplet_loss(embedded, labels, margin)
    mixed, y_a, y_b, lam = mixup(x, labels, alpha, generator)
    return mixup_loss(classify(features(mixed)), y_a, y_b, lam)
