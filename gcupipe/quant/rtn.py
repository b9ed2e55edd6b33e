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
        w = weight.reshape(n, k // group_size, group_size)
        return scale_offset_from_range(w.amin(dim=-1), w.amax(dim=-1), bits, symmetric)
    return scale_offset_from_range(
        weight.amin(dim=1, keepdim=True), weight.amax(dim=1, keepdim=True), bits, symmetric
    )


def quantize_weight(
    weight: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """Integer weight [n, k] for given (possibly grouped) scale/offset."""
    from gcupipe.quant.intmath import expand_groups

    k = weight.shape[1]
    return quantize(weight, expand_groups(scale, k), expand_groups(offset, k), bits)


# Elements per chunk: its fp32 temporaries (1 MB) stay in the CPU's L2 cache through the six
# passes over them; 8M-element chunks (32 MB) ran at half the speed on this repository's AMD
# EPYC (0.45 vs 0.8-1.0 GB/s of bf16 input, 2 threads).
_CHUNK_ELEMENTS = 256 << 10


def rtn_quantize(
    weight: torch.Tensor, bits: int, group_size: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q int8 [n, k], scale, offset) by round-to-nearest, chunked over rows so that a weight
    of any size and dtype (bf16 straight from the checkpoint) needs only its int8 output plus a
    small fp32 working set: what keeps streaming quantization's memory at about one layer."""
    import torch

    from gcupipe.quant.intmath import qrange

    n, k = weight.shape
    qmin, qmax = qrange(bits)
    groups = k // group_size if group_size else 1
    if group_size and k % group_size:
        raise ValueError(f"group size {group_size} does not divide input size {k}")
    q = torch.empty((n, k), dtype=torch.int8, device=weight.device)
    scale = torch.empty((n, groups), dtype=torch.float32, device=weight.device)
    offset = torch.empty((n, groups), dtype=torch.float32, device=weight.device)
    rows = max(1, _CHUNK_ELEMENTS // max(k, 1))
    for start in range(0, n, rows):
        chunk = weight[start : start + rows].to(torch.float32, copy=True)
        chunk = chunk.reshape(-1, groups, k // groups)
        low, high = torch.aminmax(chunk, dim=-1)
        s, o = scale_offset_from_range(low, high, bits, symmetric)
        chunk.div_(s.unsqueeze(-1))
        if not symmetric:
            chunk.add_(o.unsqueeze(-1))
        chunk.round_().clamp_(qmin, qmax)
        q[start : start + rows] = chunk.reshape(-1, k).to(torch.int8)
        scale[start : start + rows] = s
        offset[start : start + rows] = o
    return q, scale, offset


def rtn_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, spec: LayerSpec, method: str = "rtn"
) -> QuantizedLinear:
    """Quantize one weight by round-to-nearest with min-max ranges (any float dtype)."""
    q, scale, offset = rtn_quantize(weight, spec.bits, spec.group_size, spec.symmetric)
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
    """Round to nearest from each weight's min-max range: no calibration needed."""

    needs_calibration = False
    accepts_low_precision = True

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


class W8A16Method(RTNMethod):
    name = "w8a16"
    summary = "int8 weights per channel (RTN), float activations"


class W4A16Method(RTNMethod):
    name = "w4a16"
    summary = "int4 weights in groups of 64 (RTN), float activations"
    bits = 4
    group_size = 64
