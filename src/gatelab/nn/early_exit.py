"""JEI-DNN, "Jointly-Learned Exit and Inference for a Dynamic Neural Network" (authors' code
networkslab/dynn): a classifier head on every layer of a backbone and a learned exit gate
after each but the last.

- Gate l sees features of layer l's logits, detached (the gates never train the heads):
  max probability, entropy, margin (top-1 minus top-2 probability). g_l = sigmoid(
  Linear(features)); the last layer always exits (g_L = 1).
- Exit probabilities: p_l = g_l prod_{j<l} (1 - g_j). At inference a sample exits at the
  first layer with g_l >= 1/2.
- Gate training target: the exit t = argmin_l (CE_l + lambda cost_l), cost_l = (l + 1) / L
  the share of layers computed; gates are trained on the cumulative one-hot of t (gate l's
  target is 1 for l >= t, 0 before) with binary cross-entropy.
- Classifier training: sum_l p_l CE_l with p_l detached (each head learns most on the
  samples that exit at it); gate and classifier steps alternate.

Shapes: L exits, B samples, C classes, D hidden size, F gate features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["EarlyExit", "exit_features", "exit_probabilities", "exit_targets", "cumulative_targets",
           "gate_loss", "classifier_loss", "first_exit", "at_exit", "N_FEATURES"]

N_FEATURES = 3


def exit_features(logits_LBC: Tensor) -> Tensor:
    """(L, B, 3): max probability, entropy and margin of each layer's softmax, detached."""
    probs = torch.softmax(logits_LBC.detach(), -1)
    top2 = probs.topk(min(2, probs.shape[-1]), dim=-1).values
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    margin = top2[..., 0] - (top2[..., 1] if top2.shape[-1] > 1 else 0)
    return torch.stack([top2[..., 0], entropy, margin], -1)


def exit_probabilities(gates_LB: Tensor) -> Tensor:
    """p_l = g_l prod_{j<l} (1 - g_j), the last gate taken as 1 (the rows sum to 1)."""
    g = torch.cat([gates_LB[:-1], torch.ones_like(gates_LB[-1:])])
    survive = torch.cumprod(torch.cat([torch.ones_like(g[:1]), 1 - g[:-1]]), 0)
    return g * survive


def exit_targets(ce_LB: Tensor, lam: float) -> Tensor:
    """(B,): argmin_l CE_l + lam (l + 1) / L, the exit each sample should take."""
    layers = ce_LB.shape[0]
    cost = torch.arange(1, layers + 1, dtype=ce_LB.dtype, device=ce_LB.device) / layers
    return (ce_LB + lam * cost[:, None]).argmin(0)


def cumulative_targets(target_B: Tensor, layers: int) -> Tensor:
    """(L - 1, B): gate l's target, 1 where l >= the sample's exit, else 0 (dynn's
    cumulative one-hot; the last layer has no gate)."""
    index = torch.arange(layers - 1, device=target_B.device)[:, None]
    return (index >= target_B[None, :]).to(torch.float32)


def gate_loss(gates_LB: Tensor, target_B: Tensor) -> Tensor:
    """Binary cross-entropy of the gates before the last against the cumulative targets."""
    cumulative = cumulative_targets(target_B, gates_LB.shape[0]).to(gates_LB.dtype)
    return F.binary_cross_entropy(gates_LB[:-1], cumulative)


def classifier_loss(logits_LBC: Tensor, labels_B: Tensor, gates_LB: Tensor) -> Tensor:
    """mean over samples of sum_l p_l CE_l, with p_l (``exit_probabilities``) detached."""
    ce = F.cross_entropy(logits_LBC.flatten(0, 1), labels_B.repeat(logits_LBC.shape[0]),
                         reduction="none").view(logits_LBC.shape[:2])
    return (exit_probabilities(gates_LB.detach()) * ce).sum(0).mean()


def first_exit(exits_LB: Tensor) -> Tensor:
    """(B,): the first layer whose ``exits_LB`` is True; the last layer when none is."""
    forced = torch.cat([exits_LB[:-1], torch.ones_like(exits_LB[-1:])]).to(torch.int8)
    return forced.argmax(0)  # argmax returns the first maximum


def at_exit(values_LB_: Tensor, layer_B: Tensor) -> Tensor:
    """Each sample's entry (B, ...) of ``values`` (L, B, ...) at its exit layer."""
    return values_LB_[layer_B, torch.arange(values_LB_.shape[1], device=layer_B.device)]


class EarlyExit(nn.Module):
    """Heads (one Linear(D, C) per layer) and gates (one Linear(3, 1) per layer but the last)
    on a backbone's per-layer features (L, B, D), e.g. mean-pooled hidden states."""

    def __init__(self, dim: int, classes: int, layers: int):
        super().__init__()
        if layers < 2:
            raise ValueError(f"Early exits need at least 2 layers; got {layers}.")
        self.heads = nn.ModuleList(nn.Linear(dim, classes) for _ in range(layers))
        self.gates = nn.ModuleList(nn.Linear(N_FEATURES, 1) for _ in range(layers - 1))

    def logits(self, features_LBD: Tensor) -> Tensor:
        """(L, B, C): each layer's head on its features."""
        return torch.stack([head(h) for head, h in zip(self.heads, features_LBD)])

    def gate_values(self, logits_LBC: Tensor) -> Tensor:
        """(L, B): g_l = sigmoid(Linear(exit_features)), the last row 1."""
        feats = exit_features(logits_LBC)
        g = [torch.sigmoid(gate(f)).squeeze(-1) for gate, f in zip(self.gates, feats)]
        return torch.stack(g + [torch.ones_like(g[0])])

    @torch.no_grad()
    def predict(self, features_LBD: Tensor) -> tuple[Tensor, Tensor]:
        """(probabilities (B, C) of the head each sample exits at, exit layer (B,)):
        the first layer with g_l >= 1/2."""
        logits = self.logits(features_LBD)
        layer = first_exit(self.gate_values(logits) >= 0.5)
        return torch.softmax(at_exit(logits, layer), -1), layer
