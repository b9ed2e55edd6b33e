"""Round-to-nearest weight quantization: the baseline method and the fallback of the others."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gcupipe.quant.methods import LayerSpec, QuantMethod
from gcupipe.quant.observers import quantize, scale_offset_from_range
from gcupipe.quant.scheme import ActivationScheme, QuantizedLinear

if TYPE_CHECKING:
    import torch


def weight_qparams(
    weight: torch.Tensor, bits: int, group_size: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and offset of a weight [n, k]: [n, 1] per channel or [n, k/g] per group."""
    n, k = weight.shape
    if group_size:
        if k % group_size:
            raise ValueError(f"group size {group_size} does not divide input size {k}")
        w = weight.float().reshape(n, k // group_size, group_size)
        return scale_offset_from_range(w.amin(dim=-1), w.amax(dim=-1), bits, symmetric)
    w = weight.float()
    return scale_offset_from_range(
        w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True), bits, symmetric
    )


def quantize_weight(
    weight: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """Integer weight [n, k] for given (possibly grouped) scale/offset."""
    if group_size:
        scale = scale.repeat_interleave(group_size, dim=1)
        offset = offset.repeat_interleave(group_size, dim=1)
    return quantize(weight, scale, offset, bits)


def rtn_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, spec: LayerSpec, method: str = "rtn"
) -> QuantizedLinear:
    """Quantize one weight by round-to-nearest with min-max ranges."""
    scale, offset = weight_qparams(weight, spec.bits, spec.group_size, spec.symmetric)
    q = quantize_weight(weight, scale, offset, spec.bits, spec.group_size)
    return QuantizedLinear(
        weight=q,
        weight_scale=scale,
        weight_offset=offset,
        bits=spec.bits,
        group_size=spec.group_size,
        symmetric=spec.symmetric,
        activation=spec.activation,
        bias=None if bias is None else bias.float(),
        method=method,
    )


class RTNMethod(QuantMethod):
    """w8a16 / w8a8_dynamic / w4a16 RTN: weights only, no calibration needed."""

    name = "rtn"
    needs_calibration = False

    def quantize_layer(
        self,
        name: str,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        inputs: torch.Tensor | None,
        spec: LayerSpec,
    ) -> QuantizedLinear:
        if spec.activation is ActivationScheme.STATIC:
            raise ValueError("static activations need calibration: use method w8a8")
        return rtn_linear(weight, bias, spec)
