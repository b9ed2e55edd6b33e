"""Folding a per-channel factor between an op and the linears that read its output (SmoothQuant,
AWQ): the float function is unchanged, the readers' weights carry the factor."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def fold_scale(producer: Any, readers: Sequence[Any], scale: torch.Tensor) -> None:
    """Divide the producer's output channels by `scale` [k] (a norm's gain, or a linear's rows
    and bias) and multiply each reader's input columns by it, in place, in the weights' dtype."""
    weight = producer.weight
    shape = (-1,) if weight.ndim == 1 else (-1, 1)
    weight.data = (weight.data.float() / scale.reshape(shape)).to(weight.dtype)
    bias = getattr(producer, "bias", None)
    if bias is not None:
        bias.data = (bias.data.float() / scale).to(bias.dtype)
    for reader in readers:
        reader.weight.data = (reader.weight.data.float() * scale).to(reader.weight.dtype)
