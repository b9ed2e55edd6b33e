"""The targets' kernels written from their loaders' sources, decoding the raw tensors of the
files on their own (nothing here uses gcupipe's format readers or quant/packing), in float64:
validate compares them with the float layer and with the reference runtime, so a layout slip
that gcupipe's writer and reader would share still shows.

Each function takes the module's tensors as the files hold them and returns a function of the
input x [tokens, k] (float64) to the output [tokens, n].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

Kernel = Callable[["torch.Tensor"], "torch.Tensor"]

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""AWQ gemm: nibble i of an int32 holds column 8c + AWQ_ORDER[i] (AutoAWQ's pack order, which
vLLM's awq_dequantize and vLLM-GCU's repack undo)."""


def _unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [r, c] holding 32/bits values per word along the rows -> [r * 32/bits, c]."""
    import torch

    per_word = 32 // bits
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    values = (words.unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << bits) - 1)
    return values.reshape(packed.shape[0] * per_word, packed.shape[1])


def _unpack_columns(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [r, c] holding 32/bits values per word along the columns -> [r, c * 32/bits]."""
    return _unpack_rows(packed.t().contiguous(), bits).t()


def gptq_v1(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None = None,
) -> Kernel:
    """GPTQ v1 (vLLM-GCU gptq.py / vLLM gptq.py): q [k, n] from qweight packed along k, zero
    points packed along n and stored minus one (v1), W[j] = (q[j] - (z[g_idx[j]] + 1)) * s."""
    import torch

    q = _unpack_rows(qweight, bits).double()
    zeros = _unpack_columns(qzeros, bits).double() + 1
    groups = g_idx.to(torch.int64)
    weight = (q - zeros[groups]) * scales.double()[groups]  # [k, n]
    return _linear(weight.t(), bias)


def awq_gemm(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> Kernel:
    """AWQ gemm (vLLM awq.py, vLLM-GCU awq.py): 8 nibbles per int32 along n in AWQ order, zero
    points likewise and not shifted, W[j] = (q[j] - z[j // g]) * s[j // g]."""
    import torch

    def unpack(packed: torch.Tensor) -> torch.Tensor:
        words = packed.to(torch.int64) & 0xFFFFFFFF
        out = torch.zeros(packed.shape[0], packed.shape[1] * 8, dtype=torch.int64)
        for nibble, column in enumerate(AWQ_ORDER):
            out[:, column::8] = (words >> (4 * nibble)) & 0xF
        return out

    q, zeros = unpack(qweight).double(), unpack(qzeros).double()
    groups = torch.arange(q.shape[0]) // group_size
    weight = (q - zeros[groups]) * scales.double()[groups]  # [k, n]
    return _linear(weight.t(), bias)


def int4_low_nibble_first(packed: torch.Tensor) -> torch.Tensor:
    """The modelslim W4A16 weight: int8 [n, k/2], two signed 4-bit values per byte along k, the
    low nibble the even index -> int [n, k]."""
    import torch

    byte = packed.to(torch.int64) & 0xFF
    low, high = byte & 0xF, byte >> 4
    signed = torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)
    return torch.where(signed > 7, signed - 16, signed)


def weight_only(
    q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bias: torch.Tensor | None
) -> Kernel:
    """(q - offset) * scale with per-channel [n, 1] or per-group [n, k/g] scales."""
    k = q.shape[1]
    groups = scale.shape[1]
    scale_k = scale.double().repeat_interleave(k // groups, dim=1)
    offset_k = offset.double().repeat_interleave(k // groups, dim=1)
    return _linear((q.double() - offset_k) * scale_k, bias)


def per_token_w8a8(
    weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> Kernel:
    """W8A8_DYNAMIC: x quantized per token (absmax / 127), int8 GEMM, times both scales."""
    import torch

    w = weight.double()
    s_w = weight_scale.double().reshape(1, -1)

    def run(x: torch.Tensor) -> torch.Tensor:
        s_x = (x.abs().amax(dim=-1, keepdim=True) / 127).clamp(min=1e-12)
        x_q = torch.clamp(torch.round(x / s_x), -128, 127)
        y = (x_q @ w.t()) * s_x * s_w
        return y if bias is None else y + bias.double()

    return run


def static_int8(
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor,
    input_zero_point: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> Kernel:
    """compressed-tensors static W8A8 (vLLM CompressedTensorsW8A8Int8): x_q = round(x / s) + zp,
    int8 GEMM, (x_q - zp) @ W^T times s and the per-channel weight scale."""
    import torch

    w = weight.double()
    s_w = weight_scale.double().reshape(1, -1)
    s = float(input_scale.reshape(-1)[0])
    zp = 0.0 if input_zero_point is None else float(input_zero_point.reshape(-1)[0])

    def run(x: torch.Tensor) -> torch.Tensor:
        x_q = torch.clamp(torch.round(x / s) + zp, -128, 127)
        y = ((x_q - zp) @ w.t()) * s * s_w
        return y if bias is None else y + bias.double()

    return run


def compressed_tensors_wna16(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bits: int,
    bias: torch.Tensor | None,
) -> Kernel:
    """compressed-tensors pack-quantized (vLLM CompressedTensorsWNA16): 32/bits values per int32
    along k, low bits first, stored unsigned (value + 2^(bits-1)); zero points packed the same
    way along n; W = (q - zp) * s per group."""
    offset = 1 << (bits - 1)
    q = _unpack_columns(weight_packed, bits).double() - offset  # [n, k]
    groups = weight_scale.shape[1]
    k = q.shape[1]
    scale = weight_scale.double().repeat_interleave(k // groups, dim=1)
    if weight_zero_point is None:
        zero = q.new_zeros(1)
    else:
        zero = _unpack_rows(weight_zero_point, bits).double() - offset  # [n, groups]
        zero = zero[: q.shape[0]].repeat_interleave(k // groups, dim=1)
    return _linear((q - zero) * scale, bias)


def gcu_w8a8(
    weight: torch.Tensor,
    out_scales: torch.Tensor,
    in_scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> Kernel:
    """vLLM-GCU W8A8LinearMethod.apply (w8a8.py): x_q = round(x / in_scales) (the static int8
    quant op takes the reciprocal of in_scales), dot_bias_quant(x_q, W) * out_scales + bias."""
    import torch

    w = weight.double()
    s_in = in_scales.double().reshape(-1)
    s_out = out_scales.double().reshape(1, -1)

    def run(x: torch.Tensor) -> torch.Tensor:
        x_q = torch.clamp(torch.round(x / s_in), -128, 127)
        y = (x_q @ w.t()) * s_out
        return y if bias is None else y + bias.double()

    return run


def static_w8a8_quant_bias(
    weight: torch.Tensor,
    input_scale: torch.Tensor,
    input_offset: torch.Tensor,
    deq_scale: torch.Tensor,
    quant_bias: torch.Tensor,
) -> Kernel:
    """vllm-ascend AscendW8A8LinearMethod (w8a8_static.py): x_q = round(x / s + o), then
    npu_quant_matmul: (x_q @ W^T + quant_bias) * deq_scale; an int64 deq_scale carries the fp32
    bits in its low word."""
    import torch

    w = weight.double()
    if deq_scale.dtype == torch.int64:
        deq_scale = (deq_scale & 0xFFFFFFFF).to(torch.int32).view(torch.float32)
    deq = deq_scale.double().reshape(1, -1)
    bias = quant_bias.double().reshape(1, -1)
    scale, offset = float(input_scale.reshape(-1)[0]), float(input_offset.reshape(-1)[0])

    def run(x: torch.Tensor) -> torch.Tensor:
        x_q = torch.clamp(torch.round(x / scale + offset), -128, 127)
        return (x_q @ w.t() + bias) * deq

    return run


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Kernel:
    """x @ W^T + b in float64."""
    w = weight.double()

    def run(x: torch.Tensor) -> torch.Tensor:
        y = x @ w.t()
        return y if bias is None else y + bias.double()

    return run
