"""The integer arithmetic every quantized kernel shares, written once: the quantization methods,
the reference runtime and the vLLM plugin all call these.

Precision: activations are quantized in float32, or in float64 when the model runs in float64
(`compute_dtype`). A float64 run is how tests take float rounding out of a comparison, so no
step here may silently drop to float32 inside it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where the math runs: importing this module stays light
    import torch

INT8_MIN, INT8_MAX = -128, 127
MIN_SCALE = 1e-12
"""Smallest per-token scale: an all-zero token quantizes to zeros instead of dividing by 0."""


def qrange(bits: int) -> tuple[int, int]:
    """Signed integer range of `bits`: (-2**(bits-1), 2**(bits-1) - 1)."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, else float32 (half-precision inputs are quantized in fp32,
    as the targets' kernels do)."""
    import torch

    return torch.float64 if x.dtype == torch.float64 else torch.float32


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per-token quantization of x [..., k] (W8A8_DYNAMIC activations):
    int8 values and the scales [..., 1] (absmax / 127) in `compute_dtype(x)`."""
    import torch

    wide = x.to(compute_dtype(x))
    scale = torch.clamp(wide.abs().amax(dim=-1, keepdim=True) / INT8_MAX, min=MIN_SCALE)
    return torch.clamp(torch.round(wide / scale), INT8_MIN, INT8_MAX).to(torch.int8), scale


def fake_quantize_per_token(x: torch.Tensor) -> torch.Tensor:
    """`quantize_per_token` dequantized back to x's dtype: a float GEMM over these values and
    dequantized weights is the int8 GEMM (acc x token_scale x weight_scale) up to rounding."""
    q, scale = quantize_per_token(x)
    return (q.to(scale.dtype) * scale).to(x.dtype)


def fake_quant_tensor(
    x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int = 8
) -> torch.Tensor:
    """Quantize then dequantize, keeping x's dtype (how a static-activation kernel sees x);
    computed in float64 for float64 inputs, else float32."""
    import torch

    wide = compute_dtype(x)
    scale, offset = scale.to(wide), offset.to(wide)
    q = torch.clamp(torch.round(x.to(wide) / scale + offset), *qrange(bits))
    return ((q - offset) * scale).to(x.dtype)


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Static int8 activations: clamp(round(x / scale + offset)) with a calibrated per-tensor
    scale and offset, in `compute_dtype(x)`."""
    import torch

    wide = compute_dtype(x)
    q = torch.round(x.to(wide) / scale.to(wide) + offset.to(wide))
    return torch.clamp(q, INT8_MIN, INT8_MAX).to(torch.int8)


def int8_matmul(x_q: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """int8 [m, k] @ int8 [k, n] -> int32 [m, n], exactly.

    On a CPU with AVX-512, torch._int_mm (VNNI). Without it torch._int_mm has no fast kernel:
    on an AVX2-only AMD EPYC a [60, 576] @ [576, 1536] product took 48 ms against 3.5 ms for
    the same product in float64 BLAS, which is exact here (every partial sum is an integer
    below 128 * 128 * k, far under 2**53). Other devices: float32, exact below 2**24."""
    import torch

    if x_q.device.type != "cpu":
        return torch.matmul(x_q.float(), weight_t.float()).round().to(torch.int32)
    if torch.backends.cpu.get_cpu_capability() == "AVX512" and hasattr(torch, "_int_mm"):
        try:
            return torch._int_mm(x_q.contiguous(), weight_t)
        except RuntimeError:  # shape limits of the fast kernel
            pass
    return (x_q.double() @ weight_t.double()).to(torch.int32)


def expand_groups(values: torch.Tensor, in_features: int) -> torch.Tensor:
    """Per-group scales or offsets [..., k/g] broadcast to one value per input feature [..., k];
    per-channel ([..., 1]) and already expanded values are returned as they are."""
    groups = values.shape[-1]
    if groups in (1, in_features):
        return values
    return values.repeat_interleave(in_features // groups, dim=-1)
