"""Tiny checkpoints load in transformers with the weights that were written."""

from __future__ import annotations

import json

import pytest
import torch

from gcupipe.testing.tiny_models import tiny_model


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "deepseek_v2"])
def test_tiny_model_reloads_with_same_logits(arch, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    path = tiny_model(arch, tmp_path / arch, shards=2 if arch == "deepseek_v2" else 1)
    config = json.loads((path / "config.json").read_text())
    assert config["hidden_size"] % 64 == 0
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    logits = model(ids).logits
    again = AutoModelForCausalLM.from_pretrained(path)(ids).logits
    assert torch.equal(logits, again) and torch.isfinite(logits).all()
    if arch == "deepseek_v2":
        names = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
        assert "model.layers.1.mlp.experts.3.down_proj.weight" in names
        assert "model.layers.1.self_attn.q_a_proj.weight" in names
        assert "model.layers.1.mlp.shared_experts.up_proj.weight" in names
        # the reloaded fused expert tensor holds exactly the per-expert tensors written
        shard = path / names["model.layers.1.mlp.experts.3.down_proj.weight"]
        with safe_open(str(shard), "pt") as f:
            written = f.get_tensor("model.layers.1.mlp.experts.3.down_proj.weight")
        assert torch.equal(model.model.layers[1].mlp.experts.down_proj[3], written)
