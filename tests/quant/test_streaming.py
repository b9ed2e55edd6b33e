"""The streaming loop runs each decoder layer exactly as the full transformers model does."""

from __future__ import annotations

import pytest
import torch

from gcupipe.quant.checkpoint import CheckpointReader, layer_relative, load_config
from gcupipe.quant.layer_module import build_layer, rotary_embeddings
from gcupipe.testing.tiny_models import tiny_model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "deepseek_v2"])
def test_layer_by_layer_forward_matches_full_model(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    path = tiny_model(arch, tmp_path / arch, shards=2, num_hidden_layers=3)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True).hidden_states
    config = load_config(path)
    reader = CheckpointReader(path)
    hidden = torch.nn.functional.embedding(ids, reader.tensor("model.embed_tokens.weight"))
    position_embeddings = rotary_embeddings(config, ids.shape[1])
    with torch.no_grad():
        for index in range(2):  # the last hidden state of transformers is normed: skip it
            tensors = {layer_relative(n)[1]: reader.tensor(n) for n in reader.layers[index]}
            layer = build_layer(config, index, tensors)
            hidden = layer(hidden, attention_mask=None, position_embeddings=position_embeddings)
            assert torch.allclose(hidden, expected[index + 1], atol=1e-5), index
