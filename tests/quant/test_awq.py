"""AWQ: the scale and clip searches, exact folding, MoE fallbacks, and the AWQ gemm layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gcupipe.quant.awq import (
    AWQMethod,
    AWQOptions,
    clip_qparams,
    fake_quantize,
    output_error,
    scaling_groups,
    search_scale,
    second_moment,
)
from gcupipe.quant.folding import fold_scale
from gcupipe.quant.methods import LayerCalibration, LayerSpec, LayerView
from gcupipe.quant.rtn import quantize_weight, weight_qparams
from gcupipe.quant.scheme import QuantizedLinear

GROUP = 64
SPEC = LayerSpec(bits=4, group_size=GROUP, symmetric=False)


def salient_inputs(tokens: int, k: int, seed: int = 0) -> torch.Tensor:
    """Activations with a few large channels, the situation AWQ is built for."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g)
    x[:, torch.randperm(k, generator=g)[: k // 32]] *= 20
    return x


@pytest.mark.parametrize(("group", "symmetric"), [(GROUP, False), (GROUP, True), (0, True)])
def test_fake_quantize_is_exactly_rtn_dequantized(group, symmetric):
    weight = torch.randn(48, 256, generator=torch.Generator().manual_seed(5))
    scale, offset = weight_qparams(weight, 4, group, symmetric)
    q = quantize_weight(weight, scale, offset, 4, group).float()
    layer = QuantizedLinear(q.to(torch.int8), scale, offset, 4, group, symmetric)
    assert torch.equal(fake_quantize(weight, 4, group, symmetric), layer.dequantize())


def test_scale_search_protects_salient_channels():
    g = torch.Generator().manual_seed(1)
    weight = 0.02 * torch.randn(128, 256, generator=g)
    x = salient_inputs(1024, 256)
    hessian = second_moment(x, "cpu")
    scale, ratio, relative = search_scale(weight, x.abs().mean(0), hessian, SPEC, grid=20)
    assert ratio >= 0 and relative < 0.8
    awq = fake_quantize(weight * scale, 4, GROUP, False) / scale
    rtn = fake_quantize(weight, 4, GROUP, False)
    assert output_error(weight - awq, hessian) < 0.8 * output_error(weight - rtn, hessian)


def test_scale_search_reports_the_error_of_the_scale_it_returns():
    """(scale, ratio, relative): relative is the returned scale's output error over plain RTN's,
    recomputed here with the RTN helpers; a chosen ratio (>= 0) must really beat RTN."""
    weight = 0.02 * torch.randn(32, 128, generator=torch.Generator().manual_seed(2))
    x = salient_inputs(512, 128, seed=3)
    hessian = second_moment(x, "cpu")
    scale, ratio, relative = search_scale(weight, x.abs().mean(0), hessian, SPEC, grid=20)

    def error_with(s: torch.Tensor) -> float:
        s_weight, s_offset = weight_qparams(weight * s, 4, GROUP, False)
        q = quantize_weight(weight * s, s_weight, s_offset, 4, GROUP).float()
        groups = torch.arange(128) // GROUP
        deq = (q - s_offset[:, groups]) * s_weight[:, groups] / s
        return output_error(weight - deq, hessian)

    assert ratio >= 0, "salient channels: some ratio beats plain RTN"
    assert relative == pytest.approx(error_with(scale) / error_with(torch.ones(128)), rel=1e-4)
    assert relative < 1.0


@pytest.mark.parametrize("seed", [6, 7, 8])
def test_scale_search_returns_a_ratio_no_grid_neighbour_beats(seed):
    """The coarse-to-fine search tries every ratio next to the one it returns: neither
    neighbour on the grid has a lower output error."""
    weight = 0.02 * torch.randn(64, 256, generator=torch.Generator().manual_seed(seed))
    x = salient_inputs(1024, 256, seed=seed)
    hessian, act_mean, grid = second_moment(x, "cpu"), x.abs().mean(0), 20
    scale, ratio, _relative = search_scale(weight, act_mean, hessian, SPEC, grid)
    assert ratio >= 0

    def error_at(step: int) -> float:
        r = step / grid
        w_abs = weight.abs().reshape(64, -1, GROUP)
        w_mean = (w_abs / w_abs.amax(-1, keepdim=True)).reshape(64, 256).mean(0)
        s = (act_mean.pow(r) / w_mean.pow(1 - r)).clamp(min=1e-4)
        s = s / torch.sqrt(s.max() * s.min())
        return output_error(weight - fake_quantize(weight * s, 4, GROUP, False) / s, hessian)

    step = round(ratio * grid)
    assert error_at(step) == pytest.approx(
        output_error(weight - fake_quantize(weight * scale, 4, GROUP, False) / scale, hessian)
    )
    for neighbour in (step - 1, step + 1):
        if 0 <= neighbour < grid:
            assert error_at(step) <= error_at(neighbour)


def test_scale_search_keeps_identity_when_no_scale_changes_anything():
    """Equal-magnitude weights and equal activation means make every candidate scale constant,
    i.e. RTN itself: the search must return the identity, not a tie."""
    signs = torch.randint(0, 2, (32, 128), generator=torch.Generator().manual_seed(4)) * 2 - 1
    weight = 0.02 * signs.float()
    x = torch.randn(512, 128, generator=torch.Generator().manual_seed(5))
    hessian = second_moment(x, "cpu")
    scale, ratio, relative = search_scale(weight, torch.ones(128), hessian, SPEC, grid=20)
    assert ratio == -1.0 and relative == 1.0
    assert torch.equal(scale, torch.ones(128))


def test_options_are_checked_by_their_model():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="alpha"):
        AWQOptions.model_validate({"alpha": 0.5})
    assert AWQOptions.model_validate({"grid": 10}).grid == 10
    with pytest.raises(ValidationError, match="clip_max_shrink"):
        AWQOptions.model_validate({"clip_max_shrink": 2.0})


def test_clip_search_never_increases_the_group_error():
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(4))
    weight[0, 3] = 8.0  # an outlier worth clipping
    hessian = second_moment(salient_inputs(512, 128, seed=5), "cpu")
    options = AWQOptions()
    for spec in (SPEC, LayerSpec(bits=4, group_size=GROUP, symmetric=True)):
        scale, offset = clip_qparams(weight, hessian, spec, options)
        plain_scale, plain_offset = weight_qparams(weight, 4, GROUP, spec.symmetric)
        assert bool((scale <= plain_scale + 1e-7).all())  # ranges only shrink

        def error(s: torch.Tensor, o: torch.Tensor, spec: LayerSpec = spec) -> float:
            q = quantize_weight(weight, s, o, 4, GROUP).float()
            deq = (q - o.repeat_interleave(GROUP, 1)) * s.repeat_interleave(GROUP, 1)
            return output_error(weight - deq, hessian)

        assert error(scale, offset) < error(plain_scale, plain_offset)


def capture_layer(arch: str, tmp_path: Path, **overrides: object):
    """Layer 1 of a tiny model, its calibration inputs (captured like the streaming loop does)
    and a function running it."""
    from gcupipe.quant.archs import arch_for
    from gcupipe.quant.checkpoint import CheckpointReader, layer_relative, load_config
    from gcupipe.quant.layer_module import build_layer, rotary_embeddings
    from gcupipe.testing.tiny_models import tiny_model

    path = tiny_model(arch, tmp_path / arch, **overrides)
    config, reader = load_config(path), CheckpointReader(path)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    hidden = torch.nn.functional.embedding(ids, reader.tensor("model.embed_tokens.weight"))
    position = rotary_embeddings(config, 32)
    layer = build_layer(
        config, 1, {layer_relative(n)[1]: reader.tensor(n) for n in reader.layers[1]}
    )
    arch_map = arch_for(config.model_type)
    calib = LayerCalibration()
    names = [n for n, _ in layer.named_modules() if n and arch_map.is_linear(n)]

    last: list[tuple[torch.Tensor, torch.Tensor]] = []  # q/k/v (gate/up) read one input

    def keep(name: str):
        def hook(module, args, output) -> None:
            if not last or last[0][0] is not args[0]:
                last[:] = [(args[0], args[0].reshape(-1, args[0].shape[-1]))]
            x = last[0][1]
            calib.inputs[name] = torch.cat([calib.inputs[name], x]) if name in calib.inputs else x

        return hook

    handles = [layer.get_submodule(n).register_forward_hook(keep(n)) for n in names]

    def run() -> torch.Tensor:
        with torch.no_grad():
            out = layer(hidden, attention_mask=None, position_embeddings=position)
        return out[0] if isinstance(out, tuple) else out

    before = run()
    for handle in handles:
        handle.remove()
    view = LayerView(module=layer, smooth_groups=list(arch_map.smooth_groups), layer_index=1)
    return view, calib, run, before


@pytest.mark.parametrize(
    ("arch", "overrides", "expected_producers"),
    [
        (
            "llama",
            {"num_key_value_heads": 4},
            {"input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"},
        ),
        ("qwen2", {}, {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"}),
        (
            "deepseek_v2",
            {},
            {
                "input_layernorm",
                "post_attention_layernorm",
                "mlp.shared_experts.up_proj",
                "mlp.experts.0.up_proj",
            },
        ),
    ],
)
def test_folded_scales_leave_the_float_layer_unchanged(
    arch, overrides, expected_producers, tmp_path
):
    view, calib, run, before = capture_layer(arch, tmp_path, **overrides)
    linears = list(calib.inputs)
    producers = {g.producer for g in scaling_groups(view, linears)}
    assert expected_producers <= producers
    if arch == "qwen2":  # grouped-query attention: v_proj rows do not line up with o_proj
        assert "self_attn.v_proj" not in producers
    method = AWQMethod(AWQOptions(min_tokens=8))
    scaled = fold_every_group(method, view, calib)
    assert scaled, "no group was scaled"
    if arch == "deepseek_v2":  # the float router reads the scaled norm: it takes the factor
        assert "mlp.gate" in scaled
    torch.testing.assert_close(run(), before, rtol=1e-4, atol=1e-5)


def fold_every_group(
    method: AWQMethod, view: LayerView, calib: LayerCalibration
) -> dict[str, torch.Tensor]:
    """What the streaming loop does with each group's factor: fold it (reader -> factor)."""
    module = view.module
    method.prepare_layer(view, LayerCalibration())
    scaled = {}
    for group in method.scaling_groups(view, list(calib.inputs)):
        inputs = max((calib.inputs[r] for r in group.readers), key=len)
        weight = torch.cat([module.get_submodule(r).weight.detach() for r in group.readers])
        s = method.group_scale(group, inputs, None, weight, SPEC)
        if s is not None:
            names = group.readers + group.passive
            fold_scale(
                module.get_submodule(group.producer), [module.get_submodule(n) for n in names], s
            )
            scaled.update(dict.fromkeys(names, s))
    return scaled


def test_readers_of_one_input_are_rounded_as_one_gptq_stack_with_the_same_result(
    tmp_path, monkeypatch
):
    """q/k/v (and gate/up) read one scaled input: AWQ hands them to GPTQ as one stack (one
    Hessian, one column loop); each row comes out as it does when its linear is rounded alone
    on its scaled input."""
    from gcupipe.quant import gptq
    from gcupipe.quant.gptq import GPTQMethod, hessian_of
    from gcupipe.quant.methods import LinearJob

    view, calib, _run, _before = capture_layer("llama", tmp_path, num_key_value_heads=4)
    method = AWQMethod(AWQOptions(min_tokens=8))
    products = []
    monkeypatch.setattr(gptq, "hessian_of", lambda x, device: products.append(x) or hessian_of(x))
    scaled = fold_every_group(method, view, calib)
    assert {"self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj"} <= set(scaled)
    jobs = [
        LinearJob(name, f"model.layers.1.{name}", view.module.get_submodule(name), x, SPEC)
        for name, x in calib.inputs.items()
    ]
    stacks = []
    quantize_stacked = GPTQMethod.quantize_stacked

    def counted(self, weights, *args, **kwargs):
        stacks.append(len(weights))
        return quantize_stacked(self, weights, *args, **kwargs)

    monkeypatch.setattr(GPTQMethod, "quantize_stacked", counted)
    stacked = dict(method.quantize_linears(jobs))
    assert sorted(stacks) == [1, 1, 2, 3]  # o, down, gate/up, q/k/v
    # one H per captured input, read by the scale search and by GPTQ on the scaled input
    assert len(products) == len({id(x) for x in calib.inputs.values()}) == 4
    for job in jobs:
        assert stacked[job.module].extra["awq_scaled"] == (job.module in scaled)
        inputs = job.inputs / scaled[job.module] if job.module in scaled else job.inputs
        alone = method.quantize_layer(job.name, job.weight(), job.bias(), inputs, SPEC)
        same = (stacked[job.module].weight == alone.weight).float().mean()
        assert same > 0.999, (job.module, float(same))  # BLAS blocking may flip a tie
        # (alone: H of x / s multiplied again, not S⁻¹ H S⁻¹: the refit scales move by ~1e-3)
        torch.testing.assert_close(
            stacked[job.module].dequantize(), alone.dequantize(), rtol=2e-3, atol=1e-4
        )


# ---- tiny models through the stage -------------------------------------------------------


def quantize(model: Path, out: Path, work: Path, **config: object) -> object:
    from gcupipe.stages.base import StageContext
    from gcupipe.stages.quantize import QuantizeConfig, QuantizeStage

    text = work / "calib.txt"
    if not text.exists():
        text.write_text("Pack my box with five dozen liquor jugs. " * 400)
    out.mkdir(parents=True)
    settings = {
        "model": model,
        "method": "awq",
        "symmetric": False,
        "calibration": {"text_file": text, "samples": 8, "seq_len": 64},
        **config,
    }
    return QuantizeStage().run(
        QuantizeConfig.model_validate(settings),
        StageContext("quantize", out, work / "scratch", work / "cache", work, log=lambda m: None),
    )


def unpack_awq_gemm(words: torch.Tensor) -> torch.Tensor:
    """Independent reading of the AWQ gemm layout: 8 nibbles per int32 along the output dim,
    nibble i (bits 4i..4i+3) holding column 8c + [0, 2, 4, 6, 1, 3, 5, 7][i]."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    as_unsigned = words.to(torch.int64) & 0xFFFFFFFF
    rows, packed_cols = words.shape
    out = torch.zeros(rows, packed_cols * 8, dtype=torch.int64)
    for i, column in enumerate(order):
        out[:, column::8] = (as_unsigned >> (4 * i)) & 0xF
    return out


def test_gcu_awq_layout_round_trips_and_matches_an_independent_unpacking(tmp_path):
    from safetensors import safe_open

    from gcupipe.formats.registry import read_quantized
    from gcupipe.runtime.model import build_model, load_config
    from gcupipe.testing.tiny_models import tiny_model

    model = tiny_model("llama", tmp_path / "llama")
    out = tmp_path / "gcu"
    outputs = quantize(model, out, tmp_path, format="gcu")
    assert outputs.quantization == "awq" and outputs.fallbacks == {}
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "awq" and config["bits"] == 4
    assert config["group_size"] == GROUP and config["zero_point"] is True
    assert config["version"] == "gemm"
    tensors: dict[str, torch.Tensor] = {}
    for file in out.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            tensors.update({n: handle.get_tensor(n) for n in handle.keys()})  # noqa: SIM118
    checkpoint = read_quantized(out)
    for prefix in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        q = unpack_awq_gemm(tensors[f"{prefix}.qweight"])  # [k, n]
        zeros = unpack_awq_gemm(tensors[f"{prefix}.qzeros"])  # [groups, n], unsigned, no -1
        scales = tensors[f"{prefix}.scales"].float()
        group_of = torch.arange(q.shape[0]) // GROUP
        dequantized = ((q - zeros[group_of]) * scales[group_of]).t()
        torch.testing.assert_close(
            dequantized, checkpoint.linears[prefix].dequantize(), rtol=0, atol=1e-6
        )
    # the norms in the files hold the folded factors, as the modelslim export of the same run
    # does (not the source's own norms), and both files run to the same logits (the gcu layout
    # stores fp16 scales: that rounding apart)
    from safetensors.torch import load_file

    source = load_file(str(model / "model.safetensors"))
    quantize(model, tmp_path / "modelslim", tmp_path, format="modelslim")
    modelslim = read_quantized(tmp_path / "modelslim")
    norms = [name for name in source if name.endswith("layernorm.weight")]
    assert any(not torch.equal(checkpoint.float_tensors[n], source[n]) for n in norms)
    for name in norms:
        torch.testing.assert_close(checkpoint.float_tensors[name], modelslim.float_tensors[name])
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        from_gcu = build_model(load_config(out), checkpoint.float_tensors, checkpoint.linears)
        from_modelslim = build_model(
            load_config(tmp_path / "modelslim"), modelslim.float_tensors, modelslim.linears
        )
        got, want = from_gcu(ids).logits, from_modelslim(ids).logits
    assert float((got - want).abs().max()) < 1e-3 * float(want.abs().max())


def logits_error(model_dir: Path, out: Path, ids: torch.Tensor) -> float:
    from transformers import AutoModelForCausalLM

    from gcupipe.formats.registry import read_quantized
    from gcupipe.runtime.model import build_model, load_config

    checkpoint = read_quantized(out)
    quantized = build_model(load_config(out), checkpoint.float_tensors, checkpoint.linears)
    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return float(((quantized(ids).logits - reference(ids).logits) ** 2).mean())


def test_awq_model_is_closer_to_float_than_rtn(tmp_path):
    from gcupipe.testing.tiny_models import tiny_model

    model = tiny_model("llama", tmp_path / "llama", num_key_value_heads=4)
    quantize(model, tmp_path / "awq", tmp_path, format="modelslim")
    quantize(model, tmp_path / "rtn", tmp_path, format="modelslim", method="w4a16")
    text = (tmp_path / "calib.txt").read_bytes()[:64]
    ids = torch.tensor([[b % 256 for b in text]])
    awq, rtn = (
        logits_error(model, tmp_path / "awq", ids),
        logits_error(model, tmp_path / "rtn", ids),
    )
    assert awq < rtn, (awq, rtn)


def test_rarely_routed_experts_fall_back_to_rtn_and_are_reported(tmp_path):
    from gcupipe.formats.registry import read_quantized
    from gcupipe.testing.tiny_models import tiny_model

    model = tiny_model("deepseek_v2", tmp_path / "ds")
    # 8 x 64 = 512 calibration tokens: every non-expert linear sees all 512, a routed expert
    # (top-2 of 4) far fewer, so min_tokens 500 sends exactly the routed experts to RTN.
    outputs = quantize(
        model, tmp_path / "out", tmp_path, format="modelslim", options={"min_tokens": 500}
    )
    assert outputs.fallbacks, "no expert fell back"
    assert all(".mlp.experts." in name for name in outputs.fallbacks)
    assert set(outputs.fallbacks.values()) == {"rtn"}
    checkpoint = read_quantized(tmp_path / "out")
    experts = [n for n in checkpoint.linears if ".mlp.experts." in n]
    assert len(experts) == 4 * 3  # layer 1 is MoE (first_k_dense_replace 1): all quantized
    assert all(checkpoint.linears[n].bits == 4 for n in experts)
    assert not [n for n in outputs.float_layers if ".experts." in n]


def test_gptq_rounding_of_the_scaled_weights_is_closer_to_float_than_rtn_rounding(tmp_path):
    """By default the AWQ-scaled weights are rounded by GPTQ on the scaled inputs (x / s): the
    folded model is closer to float than with RTN rounding (`options: {gptq: null}`)."""
    from gcupipe.testing.tiny_models import tiny_model

    model = tiny_model("llama", tmp_path / "llama", num_key_value_heads=4)
    quantize(model, tmp_path / "rtn", tmp_path, format="modelslim", options={"gptq": None})
    quantize(model, tmp_path / "gptq", tmp_path, format="modelslim")
    text = (tmp_path / "calib.txt").read_bytes()[:64]
    ids = torch.tensor([[b % 256 for b in text]])
    rtn, gptq = (logits_error(model, tmp_path / n, ids) for n in ("rtn", "gptq"))
    assert gptq < rtn, (gptq, rtn)
