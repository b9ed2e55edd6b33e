"""The quantization-method interface every algorithm implements, and the method registry.

How the streaming loop (quant/streaming.py) drives a method, once per decoder layer:

    layer = <decoder layer i as an nn.Module, float weights loaded lazily from the shards>
    calib = capture(layer, hidden_states)          # only if method.calibrated
    method.prepare_layer(layer_view, calib)        # optional: SmoothQuant folds scales
    for name, q in method.quantize_linears(jobs):  # one LinearJob per linear of the layer
        -> QuantizedLinear (quant/scheme.py); the loop writes it through the format writer
           and puts q.dequantize() back into the module (fake quant)
    hidden_states = layer(hidden_states)           # next layer sees the quantized outputs

A method with `in_forward` (GPTQ, AWQ) is driven by ONE forward per layer instead, over every
calibration sample at once: `prepare_layer(view, empty calib)` starts the layer, then each linear
is quantized by `quantize_linears` the moment the forward reaches it (the linears reading one
norm's output together, when it appears), on the inputs it receives there (the layer's earlier
linears already quantized: "true sequential"), and the forward goes on with its dequantized
weight. `scaling_groups` names (producer, readers) groups
whose shared input the method may rescale: when the group's input appears (the producer's
output, or a lone reader's input), `group_scale` returns a factor s or None; the loop folds it
(the producer's output channels / s, the readers' input columns * s: quant/folding.py, or
`QuantizedLinear.divide_rows` for a producer already quantized) and the readers receive x / s.

`quantize_linears` defaults to one `quantize_layer(name, weight, bias, inputs, spec)` per job; a
method overrides it to quantize several linears at once (GPTQ stacks the linears that read one
input). Uncalibrated layers call `quantize_layer` directly.

- `weight` is fp32 [n, k] (a copy: methods may modify it), `bias` fp32 [n] or None.
- `inputs` is [tokens, k] in the calibration forwards' dtype (fp32, or bf16 where they run in
  bf16: the stage's `calibration.dtype`): the activations this linear received in the forward
  pass of THIS layer with every earlier layer already quantized (what GPTQ needs for its
  Hessian). A method whose `float_samples` is not 0 also gets `LinearJob.float_inputs`: the
  inputs of this linear in the float model for the first tokens of `inputs` (those of the first
  `float_samples` calibration samples; GPTQ's asymmetric calibration).
  Methods upcast what they compute with. It is None when the method does not need
  calibration. For MoE experts it holds only the tokens routed to that expert (possibly zero
  rows: fall back to RTN and say so via `QuantizedLinear.extra["fallback"] = "rtn"`).
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

from collections.abc import Iterator
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
class LinearJob:
    """One linear of a calibrated layer, handed to `QuantMethod.quantize_linears`."""

    module: str  # name inside the layer ("self_attn.q_proj")
    name: str  # full checkpoint prefix ("model.layers.3.self_attn.q_proj")
    linear: Any  # the layer's torch.nn.Linear, float weights (after prepare_layer); read only
    inputs: torch.Tensor | None  # its calibration inputs (see the module docstring)
    spec: LayerSpec
    # the float model's inputs of this linear for the first tokens of `inputs` (float_samples)
    float_inputs: torch.Tensor | None = None

    def weight(self) -> torch.Tensor:
        """An fp32 copy of the weight [n, k]."""
        import torch

        return self.linear.weight.detach().to(torch.float32, copy=True)  # type: ignore[no-any-return]

    def bias(self) -> torch.Tensor | None:
        bias = self.linear.bias
        return None if bias is None else bias.detach().float()


@dataclass
class ScalingGroup:
    """Linears that read one input, and the op that produces it (a norm, or a linear whose
    output rows feed only these readers), in-layer names. `passive` readers (a float MoE router)
    read the input too: they take the factor but are not quantized by the method."""

    producer: str
    readers: list[str]
    passive: list[str] = field(default_factory=list)


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
    needs_calibration: ClassVar[bool] = False  # always runs calibration forwards
    # quantizes each linear as the layer's one calibration forward reaches it (module docstring)
    in_forward: ClassVar[bool] = False
    # takes the stage's smooth_alpha (SmoothQuant), whose factors come from calibration inputs
    smoothing: ClassVar[bool] = False
    default_smooth_alpha: ClassVar[float | None] = None  # used when calibration data is given
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

    @classmethod
    def calibration_needed(cls, smooth_alpha: float | None) -> bool:
        """Whether a run with this smooth_alpha needs calibration forwards."""
        return cls.needs_calibration or (cls.smoothing and bool(smooth_alpha))

    @property
    def calibrated(self) -> bool:
        """Whether this method, as configured, runs on calibration inputs."""
        return self.calibration_needed(self.smooth_alpha)

    def float_samples(self, samples: int, seq_len: int) -> int:
        """How many of the `samples` calibration samples (of `seq_len` tokens) this method, as
        configured, also needs in the float model (`LinearJob.float_inputs`): the streaming loop
        then carries the float model's activations of those samples beside the quantized
        model's, one more forward per layer over them. Default: none."""
        return 0

    def float_targets_for(self, tokens: int, in_features: int) -> bool:
        """Whether a linear reading `in_features` features, calibrated on `tokens` tokens, would
        use its float-model inputs (the streaming loop drops the float forward from the first
        layer where no linear would; decoder layers repeat their shapes). Default: no."""
        return False

    def scaling_groups(self, view: LayerView, linears: list[str]) -> list[ScalingGroup]:
        """In-forward methods: the groups of the layer (`linears`: its quantized linears) whose
        input `group_scale` may rescale, in forward order. Default: none."""
        return []

    def group_scale(
        self,
        group: ScalingGroup,
        inputs: torch.Tensor,
        float_inputs: torch.Tensor | None,
        weight: torch.Tensor,
        spec: LayerSpec,
    ) -> torch.Tensor | None:
        """In-forward methods: the factor s [k] the group's input `inputs` [tokens, k] (in the
        forwards' dtype; `float_inputs` as for a LinearJob) is divided by, given the readers'
        float weights stacked in `weight` [n, k]; None leaves the group alone. Default: None."""
        return None

    def prepare_layer(self, view: LayerView, calib: LayerCalibration) -> None:
        """Change float weights before quantization (SmoothQuant); in-forward methods: a new
        layer starts (calib empty). Default: nothing."""

    def quantize_layer(
        self,
        name: str,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        inputs: torch.Tensor | None,
        spec: LayerSpec,
    ) -> QuantizedLinear:
        raise NotImplementedError

    def quantize_linears(self, jobs: list[LinearJob]) -> Iterator[tuple[str, QuantizedLinear]]:
        """(job.module, result) for every job of one layer, in job order; the caller fake-
        quantizes each linear as its result arrives."""
        for job in jobs:
            yield (
                job.module,
                self.quantize_layer(job.name, job.weight(), job.bias(), job.inputs, job.spec),
            )


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
