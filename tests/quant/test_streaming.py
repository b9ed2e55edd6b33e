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


@pytest.mark.parametrize("min_tokens_per_channel", [0.0, 10.0])
def test_float_targets_get_the_float_models_inputs_beside_the_quantized_ones(
    min_tokens_per_channel, tmp_path
):
    """A method with float_targets sees, per linear, the float model's inputs for the same
    tokens: equal to its own in layer 0 (nothing is quantized before it), different after;
    routed experts get none (the two models route tokens differently). With fewer calibration
    tokens per input channel than any linear needs (128 tokens, k >= 64), no float forward runs."""
    import json

    from gcupipe.formats.modelslim_io import ModelslimWriter
    from gcupipe.quant.gptq import GPTQMethod, GPTQOptions
    from gcupipe.quant.methods import LayerSpec
    from gcupipe.quant.streaming import quantize_model

    seen: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    class Probe(GPTQMethod):
        def quantize_linears(self, jobs):
            for job in jobs:
                seen[job.name] = (job.inputs, job.float_inputs)
            yield from super().quantize_linears(jobs)

    path = tiny_model("deepseek_v2", tmp_path / "model", num_hidden_layers=3)
    out = tmp_path / "out"
    out.mkdir()
    raw = json.loads((path / "config.json").read_text())
    writer = ModelslimWriter(out, path, raw, "gptq")
    spec = LayerSpec(bits=4, group_size=32)
    tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    options = GPTQOptions(
        asymmetric_calibration=0.2, min_tokens=1, asymmetric_min_tokens=min_tokens_per_channel
    )
    quantize_model(path, writer, Probe(options), lambda name: spec, tokens, log=lambda m: None)
    writer.finish()

    dense = [n for n in seen if ".experts." not in n]
    routed = [n for n in seen if ".experts." in n]
    assert dense and routed
    assert all(seen[n][1] is None for n in routed)
    if min_tokens_per_channel:
        assert all(seen[n][1] is None for n in dense)
        return
    for name in dense:
        inputs, float_inputs = seen[name]
        assert float_inputs is not None and float_inputs.shape == inputs.shape, name
        if name.startswith("model.layers.0."):
            assert torch.equal(float_inputs, inputs), name
        elif name.startswith("model.layers.2."):
            assert not torch.equal(float_inputs, inputs), name
