"""The one in-memory form of a quantized linear layer, shared by methods, formats and runtimes.

Every quantization method (RTN, SmoothQuant, GPTQ, AWQ) produces a `QuantizedLinear`; every
format writer turns one into its own tensors and every format reader turns them back into one;
the reference runtime and the vLLM plugin compute with `dequantize()` (or the integer parts).
Keeping one representation is what lets a single quantization run be written as modelslim, gcu
or compressed-tensors without any method knowing about formats.

Conventions (DESIGN.md section 4), for every tensor here:

    q        = clamp(round(x / scale + offset), qmin, qmax)
    x_approx = (q - offset) * scale

- `weight` holds the integer values as int8 [n, k] (n = output features, k = input features),
  also for 4-bit weights (values in [-8, 7], kept unpacked; packing lives in quant/packing.py).
- Integers are SIGNED: int8 in [-128, 127], int4 in [-8, 7]. Symmetric quantization has
  offset 0. Asymmetric quantization keeps a (float, integral-valued) offset in the signed range,
  so `offset = -round(min/scale) - 2**(bits-1)`... formats that store unsigned zero points
  (GPTQ, AWQ) add 2**(bits-1) when packing.
- `weight_scale` / `weight_offset` are fp32 [n, 1] per output channel (group_size 0) or
  [n, k/g] per group of g consecutive input features.
- Activations: `ActivationScheme.NONE` (weight-only, W8A16/W4A16), `DYNAMIC` (symmetric int8
  per token, computed at run time: W8A8_DYNAMIC), or `STATIC` (per-tensor `input_scale` and
  `input_offset`, both [1], from calibration: W8A8).
- `smooth_scale` [k], if set, is the SmoothQuant factor already folded into the preceding op:
  the stored weight is W * smooth_scale (column-wise) and the input it expects is x / smooth_scale.
  It is kept for reports and for formats that carry it; the math below never re-applies it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class QuantType(enum.StrEnum):
    """Per-tensor type names of the modelslim description file (also used in reports)."""

    FLOAT = "FLOAT"
    W8A8 = "W8A8"
    W8A8_DYNAMIC = "W8A8_DYNAMIC"
    W8A16 = "W8A16"
    W4A16 = "W4A16"
    C8 = "C8"


# Strength order used for `model_quant_type` (the strongest type a model uses).
TYPE_STRENGTH = [
    QuantType.FLOAT,
    QuantType.W8A16,
    QuantType.W4A16,
    QuantType.W8A8_DYNAMIC,
    QuantType.W8A8,
]


class ActivationScheme(enum.StrEnum):
    NONE = "none"
    DYNAMIC = "dynamic"  # symmetric int8 per token, at run time
    STATIC = "static"  # per-tensor scale + offset from calibration


@dataclass
class QuantizedLinear:
    """One quantized nn.Linear. See the module docstring for the conventions."""

    weight: torch.Tensor  # int8 [n, k] (int4 values unpacked)
    weight_scale: torch.Tensor  # fp32 [n, 1] or [n, k/g]
    weight_offset: torch.Tensor  # fp32, same shape as weight_scale (zeros when symmetric)
    bits: int = 8
    group_size: int = 0  # 0 = per output channel
    symmetric: bool = True
    activation: ActivationScheme = ActivationScheme.NONE
    input_scale: torch.Tensor | None = None  # fp32 [1], STATIC only
    input_offset: torch.Tensor | None = None  # fp32 [1], STATIC only
    bias: torch.Tensor | None = None  # float [n]
    smooth_scale: torch.Tensor | None = None  # fp32 [k], already folded (informational)
    method: str = "rtn"  # which algorithm produced it (rtn, gptq, awq, smoothquant)
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def quant_type(self) -> QuantType:
        if self.activation is ActivationScheme.DYNAMIC:
            return QuantType.W8A8_DYNAMIC
        if self.activation is ActivationScheme.STATIC:
            return QuantType.W8A8
        return QuantType.W4A16 if self.bits == 4 else QuantType.W8A16

    def expanded_scale_offset(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and offset in fp32, one value per input feature (groups repeated along k) or
        [n, 1] per channel."""
        from gcupipe.quant.intmath import expand_groups

        k = self.in_features
        scale, offset = self.weight_scale.float(), self.weight_offset.float()
        return expand_groups(scale, k), expand_groups(offset, k)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight [n, k] this layer stands for: (q - offset) * scale, computed in
        `dtype` (default fp32; float64 keeps a float64 reference free of fp32 rounding)."""
        import torch

        dtype = dtype or torch.float32
        scale, offset = self.expanded_scale_offset()
        return (self.weight.to(dtype) - offset.to(dtype)) * scale.to(dtype)

    def divide_rows(self, factor: torch.Tensor) -> None:
        """Divide output channel i by factor[i], in place, through its scales (and bias): the
        integers stay, every row having scales of its own. How a per-channel factor found after
        a linear was quantized is folded into it (AWQ's up_proj -> down_proj)."""
        import torch

        factor = factor.to(self.weight_scale.device, torch.float32)
        self.weight_scale = self.weight_scale.float() / factor[:, None]
        if self.bias is not None:
            self.bias = self.bias.float() / factor

    def deq_scale(self) -> torch.Tensor:
        """W8A8 static: fp32 [n] = input_scale * weight_scale (per-channel weights only)."""
        assert self.input_scale is not None and self.group_size == 0
        return (self.input_scale.float() * self.weight_scale.float().reshape(-1)).float()

    def quant_bias(self) -> torch.Tensor:
        """W8A8 static: int32 [n] = round(bias / deq_scale - rowsum(Wq) * input_offset).

        With x_q = round(x/s_x + o_x), y = s_x*s_w*(Wq @ (x_q - o_x)) + b
        = deq_scale * (Wq @ x_q + quant_bias); symmetric weights (offset 0) make this exact."""
        import torch

        assert self.input_offset is not None
        deq = self.deq_scale()
        bias = self.bias.float() if self.bias is not None else torch.zeros_like(deq)
        rowsum = self.weight.to(torch.int64).sum(dim=1).float()
        return torch.round(bias / deq - rowsum * self.input_offset.float()).to(torch.int32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reference (fake-quant) forward: activations quantized as the scheme says."""
        import torch.nn.functional as functional

        from gcupipe.quant.intmath import compute_dtype, fake_quant_tensor, fake_quantize_per_token

        w = self.dequantize(compute_dtype(x)).to(x.dtype)
        if self.activation is ActivationScheme.DYNAMIC:
            x = fake_quantize_per_token(x)
        elif self.activation is ActivationScheme.STATIC:
            assert self.input_scale is not None and self.input_offset is not None
            x = fake_quant_tensor(x, self.input_scale, self.input_offset, bits=8)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return functional.linear(x, w, bias)


@dataclass
class KVCacheScale:
    """INT8 KV cache parameters of one attention layer (per-tensor, asymmetric allowed).

    q = round(x / scale + offset); the modelslim C8 layout repeats the value once per KV channel.
    """

    layer_index: int
    k_scale: float
    k_offset: float
    v_scale: float
    v_offset: float
