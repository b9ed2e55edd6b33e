"""The plugin's fused-MoE method outside a running engine: its activation rounding and its
refusal of expert types vLLM's fused path cannot serve."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from gcupipe.quant.intmath import fake_quantize_per_token  # noqa: E402
from gcupipe.quant.methods import LayerSpec  # noqa: E402
from gcupipe.quant.rtn import rtn_linear  # noqa: E402
from gcupipe.quant.scheme import ActivationScheme  # noqa: E402
from gcupipe.runtime.linear import RuntimeLinear  # noqa: E402
from gcupipe.vllm_plugin.description import DescriptionError  # noqa: E402
from gcupipe.vllm_plugin.moe import GcuFusedMoEMethod  # noqa: E402


def test_per_token_rounding_on_dequantized_weights_equals_the_int8_gemm() -> None:
    """What the plugin feeds vLLM's float expert kernel (rounded activations, dequantized
    weights) is the runtime's int8 x int8 GEMM up to fp32 rounding."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 64, generator=generator) * 0.05
    x = torch.randn(5, 64, generator=generator) * 3
    layer = rtn_linear(weight, None, LayerSpec(bits=8, activation=ActivationScheme.DYNAMIC))
    dequantized = layer.weight.float() * layer.weight_scale.float().reshape(-1, 1)
    emulated = torch.nn.functional.linear(fake_quantize_per_token(x), dequantized)
    exact = RuntimeLinear(layer)(x)
    torch.testing.assert_close(emulated, exact, rtol=1e-5, atol=1e-5)
    # and the rounding is real: unrounded activations give a different product
    assert (torch.nn.functional.linear(x, dequantized) - exact).abs().max() > 1e-3


def test_static_w8a8_experts_are_refused_with_the_reason() -> None:
    with pytest.raises(DescriptionError, match=r"model\.layers\.1\.mlp\.experts.*W8A8.*input"):
        GcuFusedMoEMethod(None, "W8A8", 0, "model.layers.1.mlp.experts")
