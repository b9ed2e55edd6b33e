"""The quantization-method interface every algorithm implements, and the method registry.

How the streaming loop (quant/streaming.py) drives a method, once per decoder layer:

    layer = <decoder layer i as an nn.Module, float weights loaded lazily from the shards>
    calib = capture(layer, hidden_states)          # only if method.needs_calibration
    method.prepare_layer(layer_view, calib)        # optional: SmoothQuant / AWQ fold scales
    for each linear `name` of the layer (arch module map, minus ignored):
        q = method.quantize_layer(name, weight, bias, calib.inputs.get(name), spec)
        -> QuantizedLinear (quant/scheme.py); the loop writes it through the format writer
           and puts q.dequantize() back into the module (fake quant)
    hidden_states = layer(hidden_states)           # next layer sees the quantized outputs

- `weight` is fp32 [n, k] (a copy: methods may modify it), `bias` fp32 [n] or None.
- `inputs` is fp32 [tokens, k]: the calibration activations this linear received in the
  forward pass of THIS layer with every earlier layer already quantized (what GPTQ needs for
  its Hessian). It is None when the method does not need calibration. For MoE experts it holds
  only the tokens routed to that expert (possibly zero rows: fall back to RTN and say so via
  `QuantizedLinear.extra["fallback"] = "rtn"`).
- `spec` is the resolved `LayerSpec` (per-module overrides already applied).
- `prepare_layer(view, calib)` may change float weights in place before quantization, e.g.
  fold smoothing factors into the preceding norm (view.smooth_groups lists (norm or previous
  linear, [linears that read its output])). Default: nothing.

Methods are registered as data ("name" -> "module:Class"), imported only when used, so
`gptq`/`awq` live in their own modules (quant/gptq.py, quant/awq.py) without this file
importing them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from gcupipe.quant.scheme import ActivationScheme, QuantizedLinear

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class LayerSpec:
    """How one linear is quantized (after `overrides:` are applied)."""

    bits: int = 8
    group_size: int = 0  # 0 = per output channel
    symmetric: bool = True
    activation: ActivationScheme = ActivationScheme.NONE
    act_method: int = 1  # activation observer: 1 min-max, 2 histogram, 3 auto
    act_symmetric: bool = False  # static activations: symmetric (gcu w8a8) or asymmetric
    options: dict[str, Any] = field(default_factory=dict, hash=False)  # method-specific


@dataclass
class LayerCalibration:
    """Calibration data captured for one decoder layer."""

    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # linear name -> [tokens, k]
    tokens: int = 0


@dataclass
class LayerView:
    """What `prepare_layer` may touch: the module and the architecture's smoothing groups."""

    module: Any  # torch.nn.Module of the decoder layer
    smooth_groups: list[tuple[str, tuple[str, ...]]]  # (norm, reader regexes), in-layer names
    layer_index: int = 0
    linear_pairs: list[tuple[str, str]] = field(default_factory=list)  # (producer re, reader)


class QuantMethod:
    """Base of all methods; subclasses set `name` and implement `quantize_layer`."""

    name: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False
    # True: the uncalibrated streaming path may pass weights in the checkpoint dtype (bf16)
    # instead of an fp32 copy, saving memory; the method must upcast as it needs.
    accepts_low_precision: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        self.options = options

    @classmethod
    def check_options(cls, options: dict[str, Any], group_size: int) -> list[str]:
        """Lint-time problems of the recipe's `options:` for this group size (empty when fine).
        Methods with options override this; the others take none."""
        if not options:
            return []
        return [f"method takes no options (got {', '.join(sorted(options))})"]

    def prepare_layer(self, view: LayerView, calib: LayerCalibration) -> None:
        """Change float weights before quantization (SmoothQuant, AWQ scaling). Default: none."""

    def quantize_layer(
        self,
        name: str,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        inputs: torch.Tensor | None,
        spec: LayerSpec,
    ) -> QuantizedLinear:
        raise NotImplementedError


# Method name -> "module:Class"; extended by plugins through `register_method`.
METHODS: dict[str, str] = {
    "rtn": "gcupipe.quant.rtn:RTNMethod",
    "w8a16": "gcupipe.quant.rtn:RTNMethod",
    "w8a8_dynamic": "gcupipe.quant.rtn:RTNMethod",
    "w4a16": "gcupipe.quant.rtn:RTNMethod",
    "w8a8": "gcupipe.quant.smoothquant:StaticW8A8Method",
    "gptq": "gcupipe.quant.gptq:GPTQMethod",
    "awq": "gcupipe.quant.awq:AWQMethod",
}


def register_method(name: str, target: str) -> None:
    METHODS[name] = target


def method_class(name: str) -> type[QuantMethod]:
    """The class registered under `name`."""
    if name not in METHODS:
        raise KeyError(f"unknown quantization method {name!r}; known: {sorted(METHODS)}")
    module_name, _, class_name = METHODS[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)  # type: ignore[no-any-return]


def load_method(name: str, **options: Any) -> QuantMethod:
    """Instantiate the method registered under `name` with its options."""
    return method_class(name)(**options)
