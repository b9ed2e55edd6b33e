"""The runtime's integer/dequant-on-the-fly linears match a dequantize-then-float forward."""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from gcupipe.errors import StageError  # noqa: E402
from gcupipe.quant.intmath import int8_matmul  # noqa: E402
from gcupipe.quant.methods import LayerSpec  # noqa: E402
from gcupipe.quant.rtn import rtn_linear  # noqa: E402
from gcupipe.quant.scheme import ActivationScheme, KVCacheScale  # noqa: E402
from gcupipe.runtime.kv_cache import kv_fake_quant  # noqa: E402
from gcupipe.runtime.linear import ReferenceLinear, RuntimeLinear  # noqa: E402
from gcupipe.runtime.model import build_model, load_config  # noqa: E402
from gcupipe.testing.tiny_models import tiny_model  # noqa: E402

SPECS = {
    "w8a16": LayerSpec(),
    "w8a16_g64_asym": LayerSpec(group_size=64, symmetric=False),
    "w4a16_g64": LayerSpec(bits=4, group_size=64, symmetric=False),
    "w8a8_dynamic": LayerSpec(activation=ActivationScheme.DYNAMIC),
    "w8a8_static": LayerSpec(activation=ActivationScheme.STATIC),
}


def _is_quantizable(name: str, tensor) -> bool:
    return name.endswith("_proj.weight") and tensor.dim() == 2


def split_checkpoint(state: dict, spec: LayerSpec) -> tuple[dict, dict]:
    """RTN-quantize every projection of a float checkpoint; static activations get a fixed
    asymmetric per-tensor range (what a calibration would produce, here picked by hand)."""
    linears, floats = {}, {}
    for name, tensor in state.items():
        if _is_quantizable(name, tensor):
            prefix = name.removesuffix(".weight")
            weight_spec = dataclasses.replace(spec, activation=ActivationScheme.NONE)
            layer = rtn_linear(tensor, state.get(f"{prefix}.bias"), weight_spec)
            layer = dataclasses.replace(layer, activation=spec.activation)
            if spec.activation is ActivationScheme.STATIC:
                layer = dataclasses.replace(
                    layer, input_scale=torch.tensor([0.03]), input_offset=torch.tensor([4.0])
                )
            linears[prefix] = layer
    for name, tensor in state.items():
        if name.removesuffix(".weight").removesuffix(".bias") not in linears:
            floats[name] = tensor
    return linears, floats


def assert_same_math(got, want) -> None:
    """Runtime vs dequantize-then-float, both in float64: no activation crosses a rounding
    boundary there, so the two agree to float64 rounding, with what the formats store in float32
    (static W8A8's deq_scale product) the largest term: 1e-6 of the largest logit. In float32 an
    int8 activation path would flip roundings instead and differ by percent-level noise."""
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("scheme", list(SPECS))
def test_each_linear_matches_its_fake_quant_forward_on_the_same_input(scheme):
    """Layer by layer, on identical inputs, the integer paths agree with fake quant to float
    rounding: nothing is lost in the int8 x int8 -> int32 path, quant_bias or deq_scale."""
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(96, 128, generator=gen) * 0.05
    bias = torch.randn(96, generator=gen) * 0.1
    spec = SPECS[scheme]
    layer = rtn_linear(weight, bias, dataclasses.replace(spec, activation=ActivationScheme.NONE))
    layer = dataclasses.replace(layer, activation=spec.activation)
    if spec.activation is ActivationScheme.STATIC:
        layer = dataclasses.replace(
            layer, input_scale=torch.tensor([0.02]), input_offset=torch.tensor([-5.0])
        )
    x = torch.randn(3, 17, 128, generator=gen)
    got, want = RuntimeLinear(layer)(x), layer.forward(x)
    assert got.shape == want.shape == (3, 17, 96)
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-5), float((got - want).abs().max())


@pytest.fixture(scope="module", params=["llama", "qwen2", "deepseek_v2"])
def tiny(request, tmp_path_factory):
    path = tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    state = load_file(str(path / "model.safetensors"))
    # non-zero biases (Qwen2 has q/k/v biases) so quant_bias is really exercised
    state = {
        n: t + 0.05 * torch.randn_like(t) if n.endswith(".bias") else t for n, t in state.items()
    }
    return path, state


@pytest.mark.parametrize("scheme", list(SPECS))
def test_runtime_logits_match_dequantize_then_float(tiny, scheme):
    path, state = tiny
    linears, floats = split_checkpoint(state, SPECS[scheme])
    config = load_config(path)
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(3))
    runtime = build_model(config, floats, linears, dtype="float64")
    reference = build_model(
        config,
        floats,
        linears,
        dtype="float64",
        linear_factory=lambda layer, name: ReferenceLinear(layer),
    )
    with torch.no_grad():
        got, want = runtime(ids).logits, reference(ids).logits
        floating = build_model(config, state, {})(ids).logits.double()  # fused MoE: no fp64
    assert_same_math(got, want)
    # and the quantized model is still the same model (not a wiring accident)
    assert (got - floating).abs().max() < 0.35 * floating.abs().max()
    assert any(isinstance(m, RuntimeLinear) for m in runtime.modules())


def test_int8_kv_cache_changes_logits_like_the_reference(tiny):
    path, state = tiny
    linears, floats = split_checkpoint(state, SPECS["w8a8_dynamic"])
    config = load_config(path)
    kv = [KVCacheScale(i, 0.02, 1.0, 0.01, -2.0) for i in range(config.num_hidden_layers)]
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(4))
    ref = lambda layer, name: ReferenceLinear(layer)  # noqa: E731
    with torch.no_grad():
        with_kv = build_model(config, floats, linears, kv, dtype="float64")(ids).logits
        with_kv_ref = build_model(config, floats, linears, kv, dtype="float64", linear_factory=ref)(
            ids
        ).logits
        without = build_model(config, floats, linears, dtype="float64")(ids).logits
    assert_same_math(with_kv, with_kv_ref)
    assert not torch.allclose(with_kv, without, atol=1e-6)


def test_kv_fake_quant_round_trip_per_tensor_and_per_channel():
    x = torch.linspace(-1, 1, 2 * 3 * 8).reshape(1, 2, 3, 8)
    out = kv_fake_quant(x, 1 / 127, 0.0)
    assert (out - x).abs().max() <= 0.5 / 127 + 1e-7
    scale = torch.full((16,), 1 / 100)
    out = kv_fake_quant(x, scale, torch.zeros(16))
    assert (out - x).abs().max() <= 0.5 / 100 + 1e-7
    clipped = kv_fake_quant(torch.full((1, 1, 1, 1), 10.0), 0.01, 0.0)
    assert float(clipped) == pytest.approx(1.27)


def test_int8_matmul_is_exact_where_fp32_is_not():
    a = torch.full((2, 2048), 127, dtype=torch.int8)
    b = torch.full((2048, 3), -128, dtype=torch.int8)
    b[0, 0] = -127
    exact = a.to(torch.int64) @ b.to(torch.int64)
    assert torch.equal(int8_matmul(a, b).to(torch.int64), exact)


def test_missing_tensor_is_named_like_the_serving_keyerror(tiny):
    path, state = tiny
    linears, floats = split_checkpoint(state, SPECS["w8a16"])
    floats.pop("model.norm.weight")
    with pytest.raises(StageError, match="model.norm.weight"):
        build_model(load_config(path), floats, linears)
