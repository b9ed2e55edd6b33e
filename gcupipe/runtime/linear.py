"""Linear layers that compute what the target's quantized kernels compute, from a QuantizedLinear.

- W8A8_DYNAMIC: activations quantized per token, symmetric int8 (scale = absmax / 127); int8 x
  int8 -> int32 matmul (exact) then y = acc * x_scale * weight_scale (+ bias).
- W8A8 (static): x_q = clamp(round(x / input_scale + input_offset)); acc = x_q @ Wq^T + quant_bias
  (int32); y = acc * deq_scale: the modelslim/Ascend formula of DESIGN.md 4.1, bias folded in.
- W8A16 / W4A16: weights dequantized on the fly, (q - offset) * scale per channel or group, in
  the activation dtype, then a float matmul (what weight-only kernels do).

The float steps run in float32, or in float64 inside a float64 model (quant/intmath.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gcupipe.errors import require

if TYPE_CHECKING:
    import torch

    from gcupipe.quant.scheme import QuantizedLinear


def _module_base() -> Any:
    return require("torch", "quant").nn.Module


class RuntimeLinear(_module_base()):  # type: ignore[misc]
    """An nn.Module stand-in for nn.Linear that runs one QuantizedLinear the target's way."""

    def __init__(self, layer: QuantizedLinear, name: str = ""):
        super().__init__()
        torch = require("torch", "quant")
        from gcupipe.quant.scheme import ActivationScheme

        self.name = name
        self.quant_type = layer.quant_type.value
        self.in_features = layer.in_features
        self.out_features = layer.out_features
        self.activation = layer.activation
        self.bits = layer.bits
        self.group_size = layer.group_size
        q = layer.weight.to(torch.int8)
        # SmoothQuant factor already folded in (kept so error metrics can map the input back)
        smooth = layer.smooth_scale.float() if layer.smooth_scale is not None else None
        self.register_buffer("smooth_scale", smooth, persistent=False)
        if layer.activation is ActivationScheme.NONE:
            scale, offset = layer.expanded_scale_offset()
            self.register_buffer("weight_q", q, persistent=False)
            self.register_buffer("scale", scale.float(), persistent=False)
            self.register_buffer("offset", offset.float(), persistent=False)
        else:
            if layer.group_size:
                raise ValueError(f"{name}: int8 activations need per-channel weights")
            if bool((layer.weight_offset != 0).any()):
                raise ValueError(f"{name}: int8 activations need symmetric weights (offset 0)")
            self.register_buffer("weight_t", q.t().contiguous(), persistent=False)
            self.register_buffer(
                "weight_scale", layer.weight_scale.float().reshape(1, -1), persistent=False
            )
        if layer.activation is ActivationScheme.STATIC:
            assert layer.input_scale is not None and layer.input_offset is not None
            self.register_buffer(
                "input_scale", layer.input_scale.float().reshape(()), persistent=False
            )
            self.register_buffer(
                "input_offset", layer.input_offset.float().reshape(()), persistent=False
            )
            self.register_buffer(
                "deq_scale", layer.deq_scale().float().reshape(1, -1), persistent=False
            )
            self.register_buffer(
                "quant_bias", layer.quant_bias().to(torch.int32).reshape(1, -1), persistent=False
            )
            self.bias = None
        else:
            bias = layer.bias.float() if layer.bias is not None else None
            self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from gcupipe.quant.intmath import (
            compute_dtype,
            int8_matmul,
            quantize_per_tensor,
            quantize_per_token,
        )
        from gcupipe.quant.scheme import ActivationScheme

        wide = compute_dtype(x)
        if self.activation is ActivationScheme.NONE:
            import torch.nn.functional as functional

            weight = (self.weight_q.to(wide) - self.offset.to(wide)) * self.scale.to(wide)
            bias = self.bias.to(x.dtype) if self.bias is not None else None
            return functional.linear(x, weight.to(x.dtype), bias)
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        y: torch.Tensor
        if self.activation is ActivationScheme.DYNAMIC:
            x_q, x_scale = quantize_per_token(flat)
            acc = int8_matmul(x_q, self.weight_t)
            y = acc.to(wide) * x_scale * self.weight_scale.to(wide)
            if self.bias is not None:
                y = y + self.bias.to(wide)
        else:
            x_q = quantize_per_tensor(flat, self.input_scale, self.input_offset)
            acc = int8_matmul(x_q, self.weight_t) + self.quant_bias
            y = acc.to(wide) * self.deq_scale.to(wide)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"{self.quant_type}, in={self.in_features}, out={self.out_features}{group}"


class ReferenceLinear(_module_base()):  # type: ignore[misc]
    """The straightforward dequantize-then-float forward of a QuantizedLinear (the yardstick the
    runtime's integer path is tested against)."""

    def __init__(self, layer: QuantizedLinear):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.forward(x)
