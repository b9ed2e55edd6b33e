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

A method owns its defaults (bits, group size, activation scheme, whether it needs calibration)
and its `options:` (a pydantic `Options` model, so a recipe's typo is a file:line:col error at
lint time). Methods are plugins of the `gcupipe.methods` entry-point group, built-ins included,
imported only when used (`METHODS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from gcupipe.plugins import Registry
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


class MethodOptions(BaseModel):
    """A method's `options:` (none by default). Fields are validated when the recipe loads;
    `check` adds what depends on the rest of the stage's settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def check(self, group_size: int) -> list[str]:
        """Problems of these options with this weight group size (empty when fine)."""
        return []


class QuantMethod:
    """Base of all methods; subclasses set the class attributes and implement `quantize_layer`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    bits: ClassVar[int] = 8  # default weight bits
    group_size: ClassVar[int] = 0  # default weight group size (0 = per output channel)
    activation: ClassVar[ActivationScheme] = ActivationScheme.NONE
    needs_calibration: ClassVar[bool] = False
    smoothing: ClassVar[bool] = False  # takes the stage's smooth_alpha (SmoothQuant)
    # True: the uncalibrated streaming path may pass weights in the checkpoint dtype (bf16)
    # instead of an fp32 copy, saving memory; the method must upcast as it needs.
    accepts_low_precision: ClassVar[bool] = False
    Options: ClassVar[type[MethodOptions]] = MethodOptions

    def __init__(
        self,
        options: MethodOptions | None = None,
        device: str = "cpu",
        smooth_alpha: float | None = None,
    ) -> None:
        self.options = options if options is not None else self.Options()
        self.device = _resolve_device(device)
        self.smooth_alpha = smooth_alpha

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


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


METHODS: Registry[type[QuantMethod]] = Registry(
    "gcupipe.methods",
    "quantization method",
    lambda obj: isinstance(obj, type) and issubclass(obj, QuantMethod),
    "known: {names}",
)
