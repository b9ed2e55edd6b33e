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


def quantize_recording(method, path, out, tokens, spec, **kwargs):
    """Run the streaming quantizer with `method`, recording each job's (inputs, float inputs)
    and each result by full linear name; returns (seen, results)."""
    import json

    from gcupipe.formats.modelslim_io import ModelslimWriter
    from gcupipe.quant.streaming import quantize_model

    seen: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    results = {}
    quantize_linears = method.quantize_linears

    def recorded(jobs):
        names = {job.module: job.name for job in jobs}
        seen.update({job.name: (job.inputs, job.float_inputs) for job in jobs})
        for module, layer in quantize_linears(jobs):
            results[names[module]] = layer
            yield module, layer

    method.quantize_linears = recorded
    out.mkdir()
    writer = ModelslimWriter(out, path, json.loads((path / "config.json").read_text()), "q")
    quantize_model(path, writer, method, lambda n: spec, tokens, log=lambda m: None, **kwargs)
    writer.finish()
    return seen, results


@pytest.mark.parametrize("min_tokens_per_channel", [0.0, 10.0])
def test_float_targets_get_the_float_models_inputs_beside_the_quantized_ones(
    min_tokens_per_channel, tmp_path
):
    """A method with float_samples sees, per linear, the float model's inputs for the same
    tokens: equal to its own for the first linears of layer 0, different after;
    routed experts get none (the two models route tokens differently). With fewer calibration
    tokens per input channel than any linear needs (128 tokens, k >= 64), no float forward runs."""
    from gcupipe.quant.gptq import GPTQMethod, GPTQOptions
    from gcupipe.quant.methods import LayerSpec

    path = tiny_model("deepseek_v2", tmp_path / "model", num_hidden_layers=3)
    tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    options = GPTQOptions(
        asymmetric_calibration=0.2, min_tokens=1, asymmetric_min_tokens=min_tokens_per_channel
    )
    spec = LayerSpec(bits=4, group_size=32)
    seen, _ = quantize_recording(GPTQMethod(options), path, tmp_path / "out", tokens, spec)

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
        if name.startswith("model.layers.0.") and name.endswith(READS_LAYER_INPUT):
            assert torch.equal(float_inputs, inputs), name  # nothing is quantized before it
        elif not name.startswith("model.layers.0."):
            assert not torch.equal(float_inputs, inputs), name


READS_LAYER_INPUT = ("q_proj", "q_a_proj", "kv_a_proj_with_mqa")  # (its input norm's output)


def test_the_float_model_runs_on_the_first_samples_only(tmp_path):
    """Asymmetric calibration measures the drift on `asymmetric_tokens` tokens (whole samples,
    the first ones): the float inputs are the first rows of the quantized model's."""
    from gcupipe.quant.gptq import GPTQMethod, GPTQOptions
    from gcupipe.quant.methods import LayerSpec

    path = tiny_model("llama", tmp_path / "model", num_hidden_layers=1)
    tokens = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    method = GPTQMethod(GPTQOptions(min_tokens=1, asymmetric_min_tokens=0, asymmetric_tokens=40))
    assert method.float_samples(8, 16) == 3  # 40 tokens: 3 samples of 16
    spec = LayerSpec(bits=4, group_size=32)
    seen, _ = quantize_recording(method, path, tmp_path / "out", tokens, spec)
    inputs, float_inputs = seen["model.layers.0.self_attn.q_proj"]
    assert float_inputs is not None and float_inputs.shape[0] == 3 * 16
    assert torch.equal(float_inputs, inputs[: 3 * 16])


@pytest.mark.parametrize("method_name", ["gptq", "awq"])
def test_each_linear_is_quantized_on_the_inputs_it_reads_in_the_written_model(
    method_name, tmp_path
):
    """In-forward methods quantize each linear as the layer's one forward reaches it (the readers
    of one norm at once, when the norm's output appears): the inputs it was quantized on are
    those it reads in the written model (earlier linears of the layer quantized; AWQ's factors
    folded into the norms, and into the rows of v_proj and up_proj, quantized before o_proj's
    and down_proj's factors were known)."""
    from gcupipe.formats.registry import read_quantized
    from gcupipe.quant.awq import AWQMethod, AWQOptions
    from gcupipe.quant.gptq import GPTQMethod, GPTQOptions
    from gcupipe.quant.methods import LayerSpec
    from gcupipe.runtime.model import build_model

    gptq = GPTQOptions(min_tokens=1, asymmetric_calibration=0)
    method = (
        GPTQMethod(gptq)
        if method_name == "gptq"
        else AWQMethod(AWQOptions(min_tokens=1, gptq=gptq.model_dump()))
    )
    calls: list[int] = []
    quantize_linears = method.quantize_linears
    method.quantize_linears = lambda jobs: calls.append(len(jobs)) or quantize_linears(jobs)
    # as many KV heads as heads: v_proj's rows line up with o_proj's input (AWQ's v -> o chain)
    path = tiny_model("llama", tmp_path / "model", num_hidden_layers=2, num_key_value_heads=4)
    out = tmp_path / "out"
    tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    spec = LayerSpec(bits=4, group_size=32, symmetric=False)
    seen, results = quantize_recording(method, path, out, tokens, spec, compute_dtype="float32")

    checkpoint = read_quantized(out)
    model = build_model(load_config(out), checkpoint.float_tensors, checkpoint.linears)
    reads: dict[str, torch.Tensor] = {}
    for name in seen:
        module = model.get_submodule(name)
        module.register_forward_pre_hook(
            lambda m, args, name=name: reads.__setitem__(
                name, args[0].reshape(-1, args[0].shape[-1])
            )
        )
    with torch.no_grad():
        model(tokens)
    assert len(seen) == 2 * 7
    assert calls == [3, 1, 2, 1] * 2  # the readers of one norm together: q/k/v, o, gate/up, down
    if method_name == "awq":  # both kinds of producer took a factor: norms and linears
        scaled = {n.rsplit(".", 1)[1] for n, q in results.items() if q.extra["awq_scaled"]}
        assert scaled >= {"q_proj", "o_proj", "down_proj"}
    for name, (inputs, _float) in seen.items():
        torch.testing.assert_close(reads[name], inputs, rtol=1e-4, atol=1e-5, msg=name)
