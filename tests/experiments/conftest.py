"""What the experiment tests share: a tiny random BERT saved as a backbone folder."""

import shutil

import pytest


@pytest.fixture
def tiny_backbone(tmp_path, monkeypatch) -> str:
    """The folder of a tiny random BertModel (2 layers, d = 32) with MiniLM's tokenizer;
    the experiments' cache goes to tmp_path."""
    import torch
    from transformers import BertConfig, BertModel

    from gatelab.nn.backbone import backbone_path

    folder = tmp_path / "tiny-bert"
    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                         max_position_embeddings=64)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(backbone_path() / name, folder / name)
    monkeypatch.setenv("GATELAB_CACHE", str(tmp_path / "cache"))
    return str(folder)
