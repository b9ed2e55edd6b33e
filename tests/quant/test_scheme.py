"""The shared math on hand-computable tensors: scale/offset conventions, W8A8 formulas, RTN."""

from __future__ import annotations

import torch

from gcupipe.quant.methods import LayerSpec
from gcupipe.quant.observers import (
    HistogramObserver,
    MinMaxObserver,
    observed_range,
    quantize,
    scale_offset_from_range,
)
from gcupipe.quant.rtn import rtn_linear
from gcupipe.quant.scheme import ActivationScheme, QuantizedLinear, QuantType


def test_symmetric_scale_is_absmax_over_qmax():
    scale, offset = scale_offset_from_range(torch.tensor([-2.54]), torch.tensor([1.0]), 8, True)
    assert torch.allclose(scale, torch.tensor([0.02]))
    assert offset.item() == 0
    assert quantize(torch.tensor([-2.54, 1.0]), scale, offset, 8).tolist() == [-127, 50]


def test_asymmetric_offset_maps_min_to_qmin():
    # range [-1, 1.55]: scale = 2.55 / 255 = 0.01, offset = -128 - round(-1 / 0.01) = -28
    scale, offset = scale_offset_from_range(torch.tensor([-1.0]), torch.tensor([1.55]), 8, False)
    assert torch.allclose(scale, torch.tensor([0.01]))
    assert offset.item() == -28
    q = quantize(torch.tensor([-1.0, 0.0, 1.55]), scale, offset, 8)
    assert q.tolist() == [-128, -28, 127]
    assert torch.allclose((q.float() - offset) * scale, torch.tensor([-1.0, 0.0, 1.55]))


def test_dequantize_per_group():
    layer = QuantizedLinear(
        weight=torch.tensor([[1, 2, -3, 4]], dtype=torch.int8),
        weight_scale=torch.tensor([[0.5, 2.0]]),
        weight_offset=torch.tensor([[1.0, 0.0]]),
        bits=4,
        group_size=2,
        symmetric=False,
    )
    assert layer.dequantize().tolist() == [[0.0, 0.5, -6.0, 8.0]]
    assert layer.quant_type is QuantType.W4A16


def test_w8a8_static_deq_scale_and_quant_bias():
    # y = s_x*s_w*(Wq @ (xq - o_x)) + b = deq * (Wq @ xq + quant_bias)
    wq = torch.tensor([[1, -2], [3, 4]], dtype=torch.int8)
    layer = QuantizedLinear(
        weight=wq,
        weight_scale=torch.tensor([[0.5], [0.25]]),
        weight_offset=torch.zeros(2, 1),
        activation=ActivationScheme.STATIC,
        input_scale=torch.tensor([0.1]),
        input_offset=torch.tensor([3.0]),
        bias=torch.tensor([0.2, -0.1]),
    )
    assert torch.allclose(layer.deq_scale(), torch.tensor([0.05, 0.025]))
    # rowsum = [-1, 7]; bias/deq = [4, -4]; quant_bias = [4 + 3, -4 - 21]
    assert layer.quant_bias().tolist() == [7, -25]
    assert layer.quant_bias().dtype == torch.int32
    xq = torch.tensor([5.0, -2.0])
    exact = 0.1 * (wq.float() * torch.tensor([[0.5], [0.25]])) @ (xq - 3.0) + layer.bias
    integer_path = layer.deq_scale() * (wq.float() @ xq + layer.quant_bias().float())
    assert torch.allclose(exact, integer_path, atol=1e-6)
    assert layer.quant_type is QuantType.W8A8


def test_rtn_round_trip_error_is_below_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    for spec in (LayerSpec(8, 0, True), LayerSpec(8, 64, False), LayerSpec(4, 64, True)):
        q = rtn_linear(w, None, spec)
        scale, _ = q.expanded_scale_offset()
        assert q.weight.dtype == torch.int8
        assert torch.all((q.dequantize() - w).abs() <= scale / 2 + 1e-6)
    dyn = rtn_linear(w, None, LayerSpec(activation=ActivationScheme.DYNAMIC))
    assert dyn.quant_type is QuantType.W8A8_DYNAMIC and dyn.weight_scale.shape == (64, 1)


def _range_mse(x: torch.Tensor, lo: float, hi: float, bits: int) -> float:
    scale, offset = scale_offset_from_range(torch.tensor(lo), torch.tensor(hi), bits, False)
    q = quantize(x, scale, offset, bits).float()
    return float(((q - offset) * scale - x).pow(2).mean())


def test_histogram_observer_clips_tails_when_it_lowers_the_error():
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((100_000,))
    mm, hist = MinMaxObserver(), HistogramObserver()
    for chunk in x.split(10_000):
        mm.observe(chunk)
        hist.observe(chunk)
    full = observed_range(mm, 1)
    assert full == (float(x.min()), float(x.max()))
    lo4, hi4 = observed_range(hist, 2, bits=4)
    assert hi4 - lo4 < 0.6 * (full[1] - full[0])  # 4 bits: clipping the tails pays
    assert _range_mse(x, lo4, hi4, 4) < _range_mse(x, *full, 4)
    lo8, hi8 = observed_range(hist, 2, bits=8)
    assert _range_mse(x, lo8, hi8, 8) <= _range_mse(x, *full, 8)
    assert observed_range(hist, 3, bits=4) == (lo4, hi4)  # auto clips when it matters
    uniform = HistogramObserver()
    uniform.observe(torch.rand(100_000) * 2 - 1)
    lo_u, hi_u = observed_range(uniform, 3)
    assert lo_u < -0.95 and hi_u > 0.95


def test_smoothing_keeps_the_layer_function_and_shrinks_outliers(tmp_path):
    """SmoothQuant folded into the norm and up_proj -> down_proj is exact in float."""
    from gcupipe.quant.archs import LLAMA
    from gcupipe.quant.checkpoint import CheckpointReader, layer_relative, load_config
    from gcupipe.quant.layer_module import build_layer, rotary_embeddings
    from gcupipe.quant.methods import LayerCalibration, LayerView
    from gcupipe.quant.smoothquant import apply_smoothing
    from gcupipe.testing.tiny_models import tiny_model

    path = tiny_model("llama", tmp_path / "m")
    config, reader = load_config(path), CheckpointReader(path)
    tensors = {layer_relative(n)[1]: reader.tensor(n) for n in reader.layers[0]}
    tensors["input_layernorm.weight"][:4] *= 30  # activation outlier channels
    layer = build_layer(config, 0, tensors)
    x = torch.randn(2, 16, 128)
    pos = rotary_embeddings(config, 16)
    captured: dict[str, list[torch.Tensor]] = {}
    hooks = [
        layer.get_submodule(n).register_forward_hook(
            lambda m, a, o, n=n: captured.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]))
        )
        for n in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    ]
    with torch.no_grad():
        before = layer(x, attention_mask=None, position_embeddings=pos)
    for h in hooks:
        h.remove()
    calib = LayerCalibration({n: torch.cat(v) for n, v in captured.items()})
    q_input = calib.inputs["self_attn.q_proj"]
    calib.inputs["self_attn.k_proj"] = calib.inputs["self_attn.v_proj"] = q_input
    outlier_ratio = float(q_input.abs().amax(0).max() / q_input.abs().amax(0).median())
    view = LayerView(layer, list(LLAMA.smooth_groups), 0, list(LLAMA.linear_pairs))
    moved = apply_smoothing(view, calib, 0.5)
    assert moved == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"]
    with torch.no_grad():
        after = layer(x, attention_mask=None, position_embeddings=pos)
    assert torch.allclose(before, after, atol=1e-4)
    smoothed = calib.inputs["self_attn.q_proj"]
    assert float(smoothed.abs().amax(0).max() / smoothed.abs().amax(0).median()) < outlier_ratio
