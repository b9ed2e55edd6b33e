"""The dtype calibration forwards compute in.

Calibration runs every decoder layer over the calibration tokens once (GPTQ, AWQ: quantized
as the forward reaches each linear) or twice (capture, then the quantized pass); on CPU that is
most of a calibrated method's time. Where the hardware
multiplies bf16 natively, the layer runs under bf16 autocast: the master weights, the residual
stream, norms and softmax stay fp32, only the matmuls take bf16 operands (measured on SmolLM2,
GPTQ w4 g64, AMD EPYC with AVX-512 BF16: forwards 65 s -> 35 s, perplexity 41.07 -> 40.87 on
4,088 eval tokens, i.e. unchanged; GPTQ's asymmetric calibration gains less in bf16, see
quant/gptq.py). Without native bf16 a bf16 matmul is emulated and slower
than fp32, so `auto` stays fp32 there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

CalibrationDtype = Literal["auto", "float32", "bfloat16"]


def native_bf16(device: str) -> bool:
    """Whether `device` multiplies bf16 in hardware (CUDA; a CPU with AVX-512 BF16 or AMX)."""
    import torch

    if device.startswith("cuda"):
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def calibration_dtype(setting: CalibrationDtype, device: str) -> torch.dtype:
    """The compute dtype for `setting` on `device` (`auto`: bf16 where it is native)."""
    import torch

    if setting == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return torch.bfloat16 if setting == "bfloat16" else torch.float32
