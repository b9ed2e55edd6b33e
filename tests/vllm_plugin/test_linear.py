"""The plugin's linear methods outside a running engine: each modelslim type on vLLM's own
kernel where this platform has one, in plain torch where it has none, against the reference
runtime's linear on the same integers."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

import dataclasses  # noqa: E402

from gcupipe.quant.methods import LayerSpec  # noqa: E402
from gcupipe.quant.packing import pack_int4_modelslim  # noqa: E402
from gcupipe.quant.rtn import rtn_linear  # noqa: E402
from gcupipe.quant.scheme import ActivationScheme, QuantizedLinear  # noqa: E402
from gcupipe.runtime.linear import RuntimeLinear  # noqa: E402
from gcupipe.vllm_plugin.linear import linear_method  # noqa: E402

K, PARTS = 128, (96, 64)  # a fused layer (e.g. gate_up) of two parts
BF16_RTOL = 2e-2
"""vLLM's int8 and WNA16 CPU kernels take bf16 activations and give bf16 outputs: measured
against the fp32 reference, the worst error is <= 5e-3 of the largest output; a wrong scale or
layout is off by the size of the outputs themselves."""


@pytest.fixture(scope="module", autouse=True)
def single_process_group():  # type: ignore[no-untyped-def]
    """vLLM's parameters ask for their tensor-parallel rank: a group of one, on loopback."""
    import socket

    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with set_current_vllm_config(VllmConfig()):
        parallel_state.init_distributed_environment(
            world_size=1,
            rank=0,
            distributed_init_method=f"tcp://127.0.0.1:{port}",
            local_rank=0,
            backend="gloo",
        )
        parallel_state.initialize_model_parallel(1, 1)
        yield
        parallel_state.destroy_model_parallel()
        parallel_state.destroy_distributed_environment()


def _no_kernels() -> str | None:
    from gcupipe.vllm_plugin.linear import cpu_kernels_unusable

    return cpu_kernels_unusable()


ON_KERNELS = pytest.mark.skipif(_no_kernels() is not None, reason=str(_no_kernels()))


def _quantized(spec: LayerSpec, seed: int, bias: bool = False) -> list[QuantizedLinear]:
    """One quantized linear per part; static activations get a calibrated range of their own
    (the parts' ranges differ unless `seed` repeats)."""
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for index, n in enumerate(PARTS):
        weight = torch.randn(n, K, generator=generator) * 0.1
        b = torch.randn(n, generator=generator) * 0.1 if bias else None
        layer = rtn_linear(weight, b, spec)
        if spec.activation is ActivationScheme.STATIC:
            low, high = -2.0 - 0.5 * index * (seed % 2), 3.0
            scale = (high - low) / 255
            layer.input_scale = torch.tensor([scale])
            layer.input_offset = torch.tensor([float(round(-128 - low / scale))])
        layers.append(layer)
    return layers


def _vllm_layer(quant_type: str, parts: list[QuantizedLinear], dtype, group_size: int = 0):  # type: ignore[no-untyped-def]
    """The plugin's method for `quant_type`, its weights created as vLLM's loader creates them
    and filled with the modelslim tensors of `parts`, then processed for serving."""
    method = linear_method(quant_type, group_size, "model.layers.0.mlp.gate_up_proj")
    layer = torch.nn.Module()
    sizes = [p.weight.shape[0] for p in parts]
    layer.input_size, layer.output_size = K, sum(sizes)
    method.create_weights(layer, K, sizes, K, sum(sizes), dtype, weight_loader=lambda *a: None)
    tensors = {
        "weight": torch.cat(
            [pack_int4_modelslim(p.weight) if p.bits == 4 else p.weight for p in parts]
        ),
        "weight_scale": torch.cat([p.weight_scale for p in parts]),
        "weight_offset": torch.cat([p.weight_offset for p in parts]),
    }
    if quant_type == "W8A8":
        tensors["input_scale"] = torch.stack([p.input_scale for p in parts])
        tensors["input_offset"] = torch.stack([p.input_offset for p in parts])
        tensors["deq_scale"] = torch.cat([p.deq_scale() for p in parts])
        tensors["quant_bias"] = torch.cat([p.quant_bias() for p in parts])
    for name, value in tensors.items():
        param = getattr(layer, name)
        param.data.copy_(value.reshape(param.shape))
    from vllm.utils.torch_utils import set_default_torch_dtype

    with set_default_torch_dtype(dtype):  # as vLLM's loader, while it processes weights
        method.process_weights_after_loading(layer)
    return method, layer


def _reference(parts: list[QuantizedLinear], x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([RuntimeLinear(p)(x.float()) for p in parts], dim=-1)


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected).abs().max() / expected.abs().max())


def _inputs(dtype) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return torch.randn(5, K, generator=torch.Generator().manual_seed(7)).to(dtype)


def _kernel_name(method) -> str:  # type: ignore[no-untyped-def]
    kernel = method.kernel
    assert kernel is not None, "no vLLM kernel was chosen"
    assert type(kernel).__module__.startswith("vllm.model_executor.kernels.linear")
    return type(kernel).__name__


@ON_KERNELS
def test_w8a8_dynamic_runs_on_vllms_int8_gemm() -> None:
    parts = _quantized(LayerSpec(bits=8, activation=ActivationScheme.DYNAMIC), seed=1)
    method, layer = _vllm_layer("W8A8_DYNAMIC", parts, torch.bfloat16)
    assert _kernel_name(method) == "CPUInt8ScaledMMLinearKernel"
    x = _inputs(torch.bfloat16)
    got = method.apply(layer, x)
    assert got.dtype == torch.bfloat16
    assert _relative_error(got, _reference(parts, x)) < BF16_RTOL
    # sensitive: the reference with the parts' scales swapped is far outside the tolerance
    swapped = [parts[0], dataclasses.replace(parts[1], weight_scale=parts[1].weight_scale.flip(0))]
    assert _relative_error(got, _reference(swapped, x)) > 10 * BF16_RTOL


@pytest.mark.skipif(_no_kernels() is None, reason="vLLM's quantized CPU GEMMs are exact here")
def test_without_exact_cpu_kernels_the_layers_run_the_integer_math_in_torch() -> None:
    parts = _quantized(LayerSpec(bits=8, activation=ActivationScheme.DYNAMIC), seed=1)
    method, layer = _vllm_layer("W8A8_DYNAMIC", parts, torch.bfloat16)
    assert method.kernel is None
    x = _inputs(torch.bfloat16)
    assert _relative_error(method.apply(layer, x), _reference(parts, x)) < BF16_RTOL


def test_asymmetric_w8a8_dynamic_weights_run_in_torch() -> None:
    """vLLM's int8 GEMM has no weight zero point: such layers (the reference runtime refuses
    them; other modelslim producers write them) keep the torch path, which computes the
    definition: per-token int8 inputs times the dequantized weights."""
    from gcupipe.quant.intmath import quantize_per_token

    spec = LayerSpec(bits=8, activation=ActivationScheme.DYNAMIC, symmetric=False)
    parts = _quantized(spec, seed=2, bias=True)
    assert bool(parts[0].weight_offset.abs().max() > 0)
    method, layer = _vllm_layer("W8A8_DYNAMIC", parts, torch.float32)
    assert method.kernel is None
    x = _inputs(torch.float32)
    bias = torch.cat([p.bias for p in parts])
    x_q, token_scale = quantize_per_token(x)
    weight = torch.cat([(p.weight.double() - p.weight_offset) * p.weight_scale for p in parts])
    expected = (x_q.double() * token_scale) @ weight.t() + bias
    torch.testing.assert_close(
        method.apply(layer, x, bias).double(), expected, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("shared", [True, False], ids=["one-input-range", "two-input-ranges"])
@ON_KERNELS
def test_static_w8a8_runs_on_vllms_int8_gemm_when_the_parts_share_one_input_scale(
    shared: bool,
) -> None:
    """quant_bias (with the float bias and the zero point folded in) and deq_scale become the
    GEMM's bias and weight scale; parts calibrated to different input ranges keep the torch
    path, one quantized input per part."""
    spec = LayerSpec(bits=8, activation=ActivationScheme.STATIC)
    parts = _quantized(spec, seed=4 if shared else 3, bias=True)
    assert float(parts[0].input_offset) != 0  # asymmetric: a zero point the GEMM must apply
    assert bool(parts[0].input_scale == parts[1].input_scale) == shared
    dtype = torch.bfloat16 if shared else torch.float32
    method, layer = _vllm_layer("W8A8", parts, dtype)
    x = _inputs(dtype) * 2
    got = method.apply(layer, x)
    expected = _reference(parts, x)
    if shared:
        assert _kernel_name(method) == "CPUInt8ScaledMMLinearKernel"
        assert _relative_error(got, expected) < BF16_RTOL
    else:
        assert method.kernel is None
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("symmetric", [True, False], ids=["uint4b8", "uint4-zero-points"])
@ON_KERNELS
def test_w4a16_runs_on_vllms_weight_only_kernel_and_stays_int4(symmetric: bool) -> None:
    spec = LayerSpec(bits=4, group_size=64, symmetric=symmetric)
    parts = _quantized(spec, seed=5)
    method, layer = _vllm_layer("W4A16", parts, torch.bfloat16, group_size=64)
    assert _kernel_name(method) == "CPUWNA16LinearKernel"
    n = sum(PARTS)
    assert layer.weight_packed.dtype == torch.int32
    assert layer.weight_packed.numel() * 4 == n * K // 2  # 4 bits a weight, in memory too
    x = _inputs(torch.bfloat16)
    assert _relative_error(method.apply(layer, x), _reference(parts, x)) < BF16_RTOL
    # vLLM's MLA reads a layer's weights back through apply() with an fp32 identity
    eye = torch.eye(K)
    weights_t = method.apply(layer, eye)
    assert weights_t.dtype == torch.float32
    assert _relative_error(weights_t, _reference(parts, eye)) < BF16_RTOL


def test_w8a16_without_a_cpu_kernel_is_dequantized_once_at_load() -> None:
    """vLLM's CPU weight-only kernels take 4-bit weights only (CPUWNA16: uint4, uint4b8), so
    W8A16 takes the fallback: exactly the dequantized weight in a float GEMM."""
    parts = _quantized(LayerSpec(bits=8), seed=6)
    method, layer = _vllm_layer("W8A16", parts, torch.float32)
    assert method.kernel is None and layer.gcu_dequantized
    x = _inputs(torch.float32)
    torch.testing.assert_close(method.apply(layer, x), _reference(parts, x), rtol=1e-5, atol=1e-5)
