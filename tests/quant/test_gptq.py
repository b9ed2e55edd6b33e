"""GPTQ: the math on synthetic layers, then tiny models through the stage, writers and readers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gcupipe.quant.gptq import (
    GPTQMethod,
    GPTQOptions,
    HessianAccumulator,
    InputStatistics,
    drift_of,
    float_target,
    gptq_quantize,
    hessian_of,
)
from gcupipe.quant.methods import LayerSpec
from gcupipe.quant.rtn import rtn_linear
from gcupipe.quant.scheme import QuantizedLinear

GROUP = 64


def correlated_inputs(tokens: int, k: int, seed: int = 0) -> torch.Tensor:
    """Activations like a transformer's: low-rank structure, uneven channel magnitudes."""
    g = torch.Generator().manual_seed(seed)
    low_rank = torch.randn(tokens, 16, generator=g) @ torch.randn(16, k, generator=g)
    x = low_rank + 0.3 * torch.randn(tokens, k, generator=g)
    return x * (0.2 + 2 * torch.rand(k, generator=g))


def output_error(weight: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ weight.t() - x @ approx.t()) ** 2).mean())


def as_linear(result, bits: int, group: int, symmetric: bool) -> QuantizedLinear:
    return QuantizedLinear(
        weight=result.weight,
        weight_scale=result.scale,
        weight_offset=result.offset,
        bits=bits,
        group_size=group,
        symmetric=symmetric,
    )


def test_hessian_accumulated_in_batches_equals_one_pass():
    x = correlated_inputs(300, 64)
    acc = HessianAccumulator(64, chunk_rows=50)
    for part in x.split(70):
        acc.add(part)
    assert acc.rows == 300
    torch.testing.assert_close(acc.hessian, 2 * x.t() @ x / 300, rtol=1e-4, atol=1e-4)


def test_float_target_undoes_a_drift_of_the_inputs():
    """Inputs that drifted by a per-channel factor (the quantized model's X̃ = X D): at full
    strength the target maps X̃ back to the float outputs X Wᵀ; at half strength it is halfway."""
    x = correlated_inputs(4096, 64)
    drift = 0.5 + torch.rand(64, generator=torch.Generator().manual_seed(1))
    drifted = x * drift
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    hessian, moved = hessian_of(drifted), drift_of(drifted, x)
    full = float_target(weight, hessian, moved, damp_percent=1e-9, strength=1.0)
    torch.testing.assert_close(full, weight / drift, rtol=1e-3, atol=1e-3)
    assert output_error(weight, full, x) > 0.1  # on the float inputs it is another weight
    assert float(((drifted @ full.t() - x @ weight.t()) ** 2).mean()) < 1e-6
    half = float_target(weight, hessian, moved, damp_percent=1e-9, strength=0.5)
    torch.testing.assert_close(half, (weight + weight / drift) / 2, rtol=1e-3, atol=1e-3)


def test_float_target_is_the_weight_when_the_inputs_did_not_drift():
    x = correlated_inputs(2048, 64)
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    moved = drift_of(x, x.clone())
    assert not moved.any()
    target = float_target(weight, hessian_of(x), moved, damp_percent=1e-9, strength=1.0)
    torch.testing.assert_close(target, weight, rtol=1e-3, atol=1e-3)


def test_statistics_of_scaled_inputs_come_from_the_products_of_the_unscaled_ones():
    """AWQ's readers see x / s: their H and drift are S⁻¹ H S⁻¹ and S⁻¹ D S⁻¹ of the products
    already multiplied for x, equal to multiplying x / s afresh."""
    x = correlated_inputs(1024, 64)
    drifted = x * 1.1 + 0.01 * correlated_inputs(1024, 64, seed=5)
    s = 0.5 + torch.rand(64, generator=torch.Generator().manual_seed(6))
    stats = InputStatistics(drifted, x)
    scaled = stats.scaled(s)
    torch.testing.assert_close(scaled.hessian(), hessian_of(drifted / s), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scaled.drift(), drift_of(drifted / s, x / s), rtol=1e-4, atol=1e-4)
    assert scaled.products is stats.products  # multiplied once for both


def test_drift_in_bf16_is_rounded_relative_to_the_drift():
    """bf16 inputs: X − X̃ is subtracted in bf16 (one rounding of the small difference), so D
    stays close to its fp32 value although X and X̃ each carry bf16's rounding."""
    x = correlated_inputs(4096, 64).bfloat16()
    drifted = (x.float() * 1.01).bfloat16()
    exact = drift_of(drifted.double(), x.double()).float()
    relative = (drift_of(drifted, x) - exact).norm() / exact.norm()
    assert relative < 0.01, float(relative)


def test_asymmetric_calibration_needs_the_float_models_inputs_of_the_first_samples():
    assert GPTQMethod(GPTQOptions(asymmetric_calibration=0.0)).float_samples(64, 256) == 0
    method = GPTQMethod(GPTQOptions(asymmetric_calibration=0.2, asymmetric_tokens=2048))
    assert method.float_samples(64, 256) == 8
    assert method.float_samples(64, 300) == 7  # whole samples: 2,100 tokens
    assert method.float_samples(4, 256) == 4


def test_drift_over_the_first_tokens_is_that_of_those_tokens_alone():
    x = correlated_inputs(512, 64)
    drifted = x * 1.1
    torch.testing.assert_close(drift_of(drifted, x[:128]), drift_of(drifted[:128], x[:128]))
    stats = InputStatistics(drifted, x[:128])
    assert stats.has_drift and stats.tokens == 512  # H of every token, D of the first 128


@pytest.mark.parametrize(("tokens", "applied"), [(64 * 9, 0.0), (64 * 10, 0.2)])
def test_asymmetric_calibration_needs_ten_tokens_per_input_channel(tokens, applied):
    """Below asymmetric_min_tokens per channel the float target would fit the noise: plain GPTQ,
    which is then exactly what strength 0 gives."""
    x = correlated_inputs(tokens, 64)
    drifted = x * 1.1
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    spec = LayerSpec(bits=4, group_size=GROUP, symmetric=True)
    method = GPTQMethod(GPTQOptions(asymmetric_calibration=0.2))
    [layer] = method.quantize_stacked([weight], [None], InputStatistics(drifted, x), spec)
    assert layer.extra["asymmetric_calibration"] == applied
    [plain] = GPTQMethod(GPTQOptions(asymmetric_calibration=0.0)).quantize_stacked(
        [weight], [None], InputStatistics(drifted, x), spec
    )
    assert torch.equal(layer.weight, plain.weight) == (applied == 0)


@pytest.mark.parametrize(
    ("bits", "group", "symmetric", "act_order"),
    [
        (4, GROUP, True, True),
        (4, GROUP, False, True),
        (4, GROUP, True, False),
        (4, 0, True, True),
        (8, GROUP, True, False),
    ],
)
def test_gptq_output_error_is_below_rtn(bits, group, symmetric, act_order):
    g = torch.Generator().manual_seed(1)
    weight = 0.02 * torch.randn(96, 256, generator=g)
    x = correlated_inputs(2048, 256)
    options = GPTQOptions(act_order=act_order, static_groups=True)
    result = gptq_quantize(weight, hessian_of(x), bits, group, symmetric, options)
    gptq = as_linear(result, bits, group, symmetric)
    rtn = rtn_linear(weight, None, LayerSpec(bits=bits, group_size=group, symmetric=symmetric))
    assert gptq.weight.dtype == torch.int8
    assert int(gptq.weight.min()) >= -(2 ** (bits - 1)) and int(gptq.weight.max()) < 2 ** (bits - 1)
    assert gptq.weight_scale.shape == (96, 256 // group if group else 1)
    gptq_error = output_error(weight, gptq.dequantize(), x)
    rtn_error = output_error(weight, rtn.dequantize(), x)
    assert gptq_error < 0.6 * rtn_error, (gptq_error, rtn_error)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [True, False])
def test_refit_scales_keep_the_integers_and_lower_every_rows_error(symmetric, act_order):
    weight = 0.02 * torch.randn(96, 256, generator=torch.Generator().manual_seed(4))
    x = correlated_inputs(2048, 256, seed=5)
    hessian = hessian_of(x)
    plain, refit = (
        as_linear(
            gptq_quantize(
                weight,
                hessian,
                4,
                GROUP,
                symmetric,
                GPTQOptions(act_order=act_order, refit_scales=refit),
            ),
            4,
            GROUP,
            symmetric,
        )
        for refit in (False, True)
    )
    assert torch.equal(plain.weight, refit.weight)
    assert torch.equal(plain.weight_offset, refit.weight_offset)
    assert bool((refit.weight_scale > 0).all())

    def row_error(layer: QuantizedLinear) -> torch.Tensor:
        diff = weight - layer.dequantize()
        return torch.einsum("rk,kj,rj->r", diff, hessian, diff)

    # each row's least-squares problem in its scales is solved exactly
    assert bool((row_error(refit) <= row_error(plain) * (1 + 1e-5)).all())
    errors = [output_error(weight, q.dequantize(), x) for q in (plain, refit)]
    assert errors[1] < 0.97 * errors[0], errors


def test_dynamic_groups_follow_the_updated_weights_and_beat_rtn():
    weight = 0.02 * torch.randn(64, 192, generator=torch.Generator().manual_seed(2))
    x = correlated_inputs(1024, 192, seed=3)
    options = GPTQOptions(act_order=False, static_groups=False, clip_search=False)
    gptq = as_linear(
        gptq_quantize(weight, hessian_of(x), 4, GROUP, False, options), 4, GROUP, False
    )
    rtn = rtn_linear(weight, None, LayerSpec(bits=4, group_size=GROUP, symmetric=False))
    assert output_error(weight, gptq.dequantize(), x) < output_error(weight, rtn.dequantize(), x)


def test_act_order_with_dynamic_groups_is_refused_with_the_reason():
    from gcupipe.errors import StageError

    options = GPTQOptions(act_order=True, static_groups=False)
    method = GPTQMethod(options)
    x = correlated_inputs(128, 128)
    with pytest.raises(StageError, match="static_groups: true.*g_idx"):
        method.quantize_layer("l", torch.randn(8, 128), None, x, LayerSpec(4, GROUP))
    problems = options.check(GROUP)
    assert len(problems) == 1 and "vLLM-GCU" in problems[0]
    assert options.check(0) == []


def test_bad_options_are_refused_by_the_options_model():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="dampening"):
        GPTQOptions.model_validate({"dampening": 0.1})


def test_dead_columns_are_zero_and_finite():
    x = correlated_inputs(512, 128)
    x[:, 5] = 0.0
    x[:, 77] = 0.0
    weight = torch.randn(16, 128)
    result = gptq_quantize(weight, hessian_of(x), 4, GROUP, False, GPTQOptions())
    deq = as_linear(result, 4, GROUP, False).dequantize()
    assert torch.isfinite(deq).all()
    assert deq[:, [5, 77]].abs().max() == 0


def test_too_few_tokens_fall_back_to_rtn_and_say_so():
    method = GPTQMethod(GPTQOptions(min_tokens=32))
    spec = LayerSpec(bits=4, group_size=GROUP, symmetric=True)
    weight = torch.randn(8, 128)
    layer = method.quantize_layer("experts.3.up_proj", weight, None, torch.randn(5, 128), spec)
    assert (
        layer.extra["fallback"] == "rtn"
        and "5 calibration tokens" in layer.extra["fallback_reason"]
    )
    assert torch.equal(layer.weight, rtn_linear(weight, None, spec).weight)


def test_linears_reading_one_input_are_stacked_with_the_same_result_as_one_at_a_time():
    from gcupipe.quant.methods import LinearJob

    torch.manual_seed(0)
    x, other = correlated_inputs(256, 128), correlated_inputs(256, 128)
    spec, spec8 = LayerSpec(4, GROUP), LayerSpec(8, GROUP)
    linears = {
        n: torch.nn.Linear(128, rows, bias=n == "k")
        for n, rows in [("q", 32), ("k", 16), ("v", 16), ("o", 24)]
    }
    jobs = [
        LinearJob("q", "l.q", linears["q"], x, spec),
        LinearJob("k", "l.k", linears["k"], x, spec),
        LinearJob("v", "l.v", linears["v"], x, spec8),  # another spec: quantized on its own
        LinearJob("o", "l.o", linears["o"], other, spec),
    ]
    method = GPTQMethod()
    stacked = list(method.quantize_linears(jobs))
    assert [name for name, _ in stacked] == ["q", "k", "v", "o"]
    for (name, got), job in zip(stacked, jobs, strict=True):
        alone = method.quantize_layer(job.name, job.weight(), job.bias(), job.inputs, job.spec)
        assert got.weight.shape == (linears[name].out_features, 128)
        assert torch.equal(got.weight, alone.weight), name
        assert torch.allclose(got.weight_scale, alone.weight_scale), name
        assert got.extra["gptq_loss"] == pytest.approx(alone.extra["gptq_loss"], rel=1e-4)
        assert (got.bias is None) == (name != "k")


# ---- tiny models through the stage -------------------------------------------------------


def quantize(model: Path, out: Path, work: Path, **config: object) -> object:
    from gcupipe.stages.base import StageContext
    from gcupipe.stages.quantize import QuantizeConfig, QuantizeStage

    text = work / "calib.txt"
    if not text.exists():
        text.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    out.mkdir(parents=True)
    settings = {
        "model": model,
        "calibration": {"text_file": text, "samples": 8, "seq_len": 64},
        **config,
    }
    return QuantizeStage().run(
        QuantizeConfig.model_validate(settings),
        StageContext("quantize", out, work / "scratch", work / "cache", work, log=lambda m: None),
    )


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gcupipe.testing.tiny_models import tiny_model

    return tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")


def first_layer_inputs(model_dir: Path, work: Path) -> dict[str, torch.Tensor]:
    """Inputs of layer 0's linears in the float model on the stage's calibration tokens."""
    from transformers import AutoModelForCausalLM

    from gcupipe.stages.calibration import CalibrationConfig, calibration_tokens

    tokens = calibration_tokens(
        CalibrationConfig(text_file=work / "calib.txt", samples=8, seq_len=64), model_dir, 256
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    layer = model.model.layers[0]
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str):  # a forward hook returning None leaves the output alone
        def hook(module, args, output) -> None:
            captured[name] = args[0].reshape(-1, module.in_features)

        return hook

    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
        layer.get_submodule(name).register_forward_hook(keep(name))
    with torch.no_grad():
        model(tokens)
    return captured


def test_tiny_llama_layer_output_error_below_rtn(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    from gcupipe.formats.registry import read_quantized

    quantize(tiny_llama, tmp_path / "gptq", tmp_path, method="gptq", format="modelslim")
    quantize(tiny_llama, tmp_path / "rtn", tmp_path, method="w4a16", format="modelslim")
    gptq, rtn = read_quantized(tmp_path / "gptq"), read_quantized(tmp_path / "rtn")
    original = load_file(str(tiny_llama / "model.safetensors"))
    for name, x in first_layer_inputs(tiny_llama, tmp_path).items():
        prefix = f"model.layers.0.{name}"
        weight = original[f"{prefix}.weight"]
        gptq_error = output_error(weight, gptq.linears[prefix].dequantize(), x)
        rtn_error = output_error(weight, rtn.linears[prefix].dequantize(), x)
        assert gptq_error < rtn_error, (name, gptq_error, rtn_error)


def unpack_int32_words(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Independent reading of the GPTQ layout: value i of a word sits at bits [i*b, (i+1)*b),
    values of one word are consecutive along `dim` (k for qweight, n for qzeros)."""
    per_word = 32 // bits
    as_unsigned = words.to(torch.int64) & 0xFFFFFFFF
    parts = [(as_unsigned >> (bits * i)) & ((1 << bits) - 1) for i in range(per_word)]
    stacked = torch.stack(parts, dim=dim + 1)  # [.., words, per_word, ..]
    shape = list(words.shape)
    shape[dim] *= per_word
    return stacked.reshape(shape)


@pytest.mark.parametrize("symmetric", [True, False])
def test_gcu_gptq_layout_round_trips_and_matches_an_independent_unpacking(
    tiny_llama, tmp_path, symmetric
):
    from safetensors import safe_open

    from gcupipe.formats.registry import read_quantized

    out = tmp_path / "gcu"
    outputs = quantize(tiny_llama, out, tmp_path, method="gptq", format="gcu", symmetric=symmetric)
    assert outputs.quantization == "gptq"
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "gptq" and config["bits"] == 4
    assert config["group_size"] == GROUP and config["desc_act"] is False
    assert config["sym"] is symmetric
    assert json.loads((out / "quantize_config.json").read_text())["desc_act"] is False
    checkpoint = read_quantized(out)
    tensors: dict[str, torch.Tensor] = {}
    for file in out.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            tensors.update({n: handle.get_tensor(n) for n in handle.keys()})  # noqa: SIM118
    prefix = "model.layers.1.mlp.down_proj"
    qweight, qzeros = tensors[f"{prefix}.qweight"], tensors[f"{prefix}.qzeros"]
    scales, g_idx = tensors[f"{prefix}.scales"].float(), tensors[f"{prefix}.g_idx"]
    k = qweight.shape[0] * 8
    assert torch.equal(g_idx, torch.arange(k, dtype=torch.int32) // GROUP)  # contiguous
    q = unpack_int32_words(qweight, 4, 0)  # [k, n] unsigned
    zeros = unpack_int32_words(qzeros, 4, 1) + 1  # [groups, n], stored as zero - 1
    if symmetric:
        assert bool((zeros == 8).all())
    dequantized = ((q - zeros[g_idx.long()]) * scales[g_idx.long()]).t()
    layer = checkpoint.linears[prefix]
    torch.testing.assert_close(dequantized, layer.dequantize(), rtol=0, atol=1e-6)
    assert layer.method == "gptq" or checkpoint.method == "gptq"


def test_one_gptq_run_reads_back_the_same_from_every_format(tiny_llama, tmp_path):
    from gcupipe.formats.registry import read_quantized
    from gcupipe.runtime.model import build_model, load_config

    results = {}
    for fmt in ("modelslim", "gcu", "compressed-tensors"):
        out = tmp_path / fmt
        quantize(tiny_llama, out, tmp_path, method="gptq", format=fmt)
        results[fmt] = read_quantized(out)
    names = set(results["modelslim"].linears)
    assert len(names) == 2 * 7
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    logits = {}
    for fmt, checkpoint in results.items():
        assert set(checkpoint.linears) == names, fmt
        for name in names:
            a, b = results["modelslim"].linears[name], checkpoint.linears[name]
            assert torch.equal(a.weight, b.weight), (fmt, name)
            # gcu stores fp16 scales: the same numbers within fp16 precision
            torch.testing.assert_close(a.dequantize(), b.dequantize(), rtol=1e-3, atol=1e-5)
        model = build_model(
            load_config(tmp_path / fmt), checkpoint.float_tensors, checkpoint.linears
        )
        with torch.no_grad():
            logits[fmt] = model(ids).logits
    for fmt in ("gcu", "compressed-tensors"):
        torch.testing.assert_close(logits[fmt], logits["modelslim"], rtol=1e-2, atol=1e-3)
