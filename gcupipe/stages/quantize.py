"""`uses: quantize`: quantize a model directory layer by layer into a serving format."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gcupipe.errors import StageError
from gcupipe.formats.format import Combination, Format
from gcupipe.formats.registry import FORMATS
from gcupipe.quant.methods import METHODS, QuantMethod
from gcupipe.stages.base import Problem, Stage, StageContext, StageOutputs, TargetedConfig
from gcupipe.stages.calibration import CalibrationConfig
from gcupipe.targets.base import ModelFacts, Target
from gcupipe.targets.registry import target_for

if TYPE_CHECKING:
    from gcupipe.estimate import Estimate, Machine, ModelShape

DEFAULT_IGNORE = ["lm_head", r".*embed_tokens", r".*\.mlp\.gate"]


class KVCacheConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    dtype: Literal["int8"] = Field(description="KV-cache element type (int8: C8).")


class Override(BaseModel):
    """Per-module override, applied to modules whose full name matches the regex key."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    skip: bool = Field(default=False, description="Keep matching modules in float.")
    bits: int | None = Field(default=None, description="Weight bits (4 or 8).")
    group_size: int | None = Field(default=None, ge=0, description="0 = per output channel.")
    symmetric: bool | None = Field(default=None, description="Symmetric weight quantization.")


class QuantizeConfig(TargetedConfig):
    model: Path = Field(
        description="Model directory (safetensors + config.json), usually "
        "${stages.download.outputs.model_dir}."
    )
    method: str = Field(
        default="w8a8_dynamic",
        description="Quantization method: w8a8_dynamic, w8a8, w8a16, w4a16, gptq, awq, or one "
        "a plugin registers (`gcupipe.methods`).",
    )
    format: str = Field(
        default="modelslim",
        description="Output layout: modelslim, gcu, compressed-tensors, or one a plugin "
        "registers (`gcupipe.formats`).",
    )
    bits: int | None = Field(
        default=None, description="Weight bits; default: the method's (8; 4 for gptq, awq, w4a16)."
    )
    group_size: int | None = Field(
        default=None,
        ge=0,
        description="Weight group size; 0 = per output channel. Default: the method's (0; 64 "
        "for gptq, awq, w4a16).",
    )
    symmetric: bool = Field(default=True, description="Symmetric weight quantization.")
    act_method: Literal[1, 2, 3] = Field(
        default=1,
        description="Static activation observer: "
        "1 min-max, 2 histogram, 3 auto (seed tool vocabulary).",
    )
    smooth_alpha: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="SmoothQuant migration strength (w8a8, w8a8_dynamic), folded into the "
        "norms; its factors come from calibration data. Unset: w8a8_dynamic smooths with 0.65 "
        "when calibration data is given (perplexity +0.9% over float instead of +3.5% on "
        "SmolLM2), w8a8 does not smooth. 0 turns smoothing off.",
    )
    kv_cache: KVCacheConfig | None = Field(default=None, description="INT8 KV cache scales.")
    calibration: CalibrationConfig = Field(
        default_factory=CalibrationConfig, description="Calibration data."
    )
    ignore: list[str] = Field(
        default_factory=lambda: list(DEFAULT_IGNORE),
        description="Regexes (full match) of modules kept in float.",
    )
    overrides: dict[str, Override] = Field(
        default_factory=dict,
        description="Regex (full match) -> per-module settings; first match wins.",
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="The method's own options (e.g. damp_percent for gptq); checked against "
        "the method when the recipe loads.",
    )
    device: Literal["cpu", "cuda", "auto"] = Field(default="cpu", description="Compute device.")
    batch_size: int = Field(
        default=8,
        gt=0,
        description="Calibration sequences per forward where a layer's inputs are captured "
        "first (w8a8, w8a8_dynamic, kv_cache); gptq and awq run every sample in one forward.",
    )
    max_shard_size_mb: int = Field(
        default=512, gt=0, description="Output shard size (also bounds buffered output)."
    )

    @field_validator("method")
    @classmethod
    def _known_method(cls, name: str) -> str:
        if name not in METHODS:
            raise ValueError(METHODS.unknown_message(name))
        return name

    @field_validator("format")
    @classmethod
    def _known_format(cls, name: str) -> str:
        if name not in FORMATS:
            raise ValueError(FORMATS.unknown_message(name))
        return name

    @model_validator(mode="before")
    @classmethod
    def _seed_aliases(cls, data: Any) -> Any:
        """Accept the seed tool's w_bit / a_bit / is_dynamic vocabulary."""
        if not isinstance(data, dict) or not ({"w_bit", "a_bit", "is_dynamic"} & set(data)):
            return data
        data = dict(data)
        w_bit, a_bit = data.pop("w_bit", 8), data.pop("a_bit", 16)
        dynamic = data.pop("is_dynamic", False)
        if isinstance(dynamic, str):
            dynamic = dynamic.lower() == "true"
        table = {
            (8, 8, True): "w8a8_dynamic",
            (8, 8, False): "w8a8",
            (8, 16, False): "w8a16",
            (4, 16, False): "w4a16",
        }
        method = table.get((int(w_bit), int(a_bit), bool(dynamic) and int(a_bit) == 8))
        if method is None:
            raise ValueError(f"w_bit={w_bit} a_bit={a_bit} is_dynamic={dynamic} has no method")
        if "method" in data and data["method"] != method and data["method"] not in ("gptq", "awq"):
            raise ValueError(f"method {data['method']!r} contradicts w_bit/a_bit ({method})")
        data.setdefault("method", method)
        return data

    @property
    def method_class(self) -> type[QuantMethod]:
        return METHODS.get(self.method)

    @property
    def smoothing_alpha(self) -> float | None:
        """The SmoothQuant strength used: `smooth_alpha`, else the method's default where
        calibration data is given (0 = off)."""
        if self.smooth_alpha is not None:
            return self.smooth_alpha or None
        if self.calibration.has_source:
            return self.method_class.default_smooth_alpha
        return None

    @property
    def weight_bits(self) -> int:
        return self.bits or self.method_class.bits

    @property
    def weight_group_size(self) -> int:
        return self.group_size if self.group_size is not None else self.method_class.group_size

    @property
    def layout(self) -> Format:
        return FORMATS.get(self.format)

    @property
    def target_profile(self) -> Target:
        """The target written for: `target:`, else the one the format is made for."""
        return target_for(self.target, self.layout)

    def model_facts(self) -> ModelFacts | None:
        """What the source model's config.json says (None until the model is there)."""
        from gcupipe.formats.modeldir import ModelDir

        config = ModelDir(self.model).config if (self.model / "config.json").is_file() else None
        return None if config is None else ModelFacts.from_config(config)

    def combination(self) -> Combination:
        """What the format and the target are asked to hold; the linears kept in float are
        known once the model is there."""
        return Combination(
            self.method,
            self.weight_bits,
            self.weight_group_size,
            self.symmetric,
            self.method_class.activation,
            self.kv_cache is not None,
            tuple(_float_linears(self)),
        )


class QuantizeOutputs(StageOutputs):
    model_dir: Path = Field(description="The quantized model directory.")
    source_model_dir: Path = Field(
        description="The float model it was quantized from (validate's default reference)."
    )
    format: str = Field(description="Its layout (modelslim, gcu, compressed-tensors).")
    method: str = Field(description="The quantization method.")
    target: str = Field(description="The serving target it was written for.")
    quantization: str | None = Field(description="vLLM's --quantization value on that target.")
    quantized_layers: int = Field(description="Number of quantized linear layers.")
    float_layers: list[str] = Field(description="Linear layers kept in float (ignored).")
    fallbacks: dict[str, str] = Field(description="Layers quantized by a fallback, and why.")
    kv_cache_layers: int = Field(description="Attention layers with int8 KV-cache scales.")
    expert_tokens: dict[str, int] = Field(
        default_factory=dict,
        description="Calibrated MoE models: calibration tokens routed to each expert.",
    )


class QuantizeStage(Stage[QuantizeConfig, QuantizeOutputs]):
    """Streams the model through a quantization method into a serving format."""

    Config = QuantizeConfig
    Outputs = QuantizeOutputs
    version = "1"

    def check(self, config: QuantizeConfig) -> list[Problem]:
        from gcupipe.quant.plan import group_size_problems

        method = config.method_class
        combo = config.combination()
        problems = [Problem(msg, key) for key, msg in config.layout.problems(combo)]
        target = config.target_profile
        facts = config.model_facts()
        for key, message in target.problems(config.layout, combo, facts):
            problems.append(Problem(f"target {target.name}: {message}", key))
        if config.smooth_alpha is not None and not method.smoothing:
            problems.append(
                Problem(f"method {config.method} takes no smooth_alpha", "smooth_alpha")
            )
        calibrated = method.calibration_needed(config.smoothing_alpha)
        if (calibrated or config.kv_cache is not None) and not (config.calibration.has_source):
            problems.append(
                Problem(
                    f"method {config.method}{' with kv_cache' if config.kv_cache else ''} needs "
                    "calibration data: set calibration.text_file (or jsonl, dataset)",
                    "calibration",
                )
            )
        problems += _option_problems(config)
        for pattern in [*config.ignore, *config.overrides]:
            try:
                re.compile(pattern)
            except re.error as exc:
                problems.append(Problem(f"bad regex {pattern!r}: {exc}", "ignore"))
        if (config.model / "config.json").is_file():
            for message in group_size_problems(config.model, _resolver(config)):
                problems.append(Problem(message, "group_size"))
        return problems

    def describe(self, config: QuantizeConfig, cache_dir: Path) -> str | None:
        group = (
            f"groups of {config.weight_group_size}" if config.weight_group_size else ("per channel")
        )
        symmetry = "symmetric" if config.symmetric else "asymmetric"
        activations = {
            "w8a8_dynamic": "int8 activations per token at run time",
            "w8a8": "int8 activations per tensor from calibration",
        }.get(config.method, "float activations")
        parts = [
            f"{config.method} -> {config.format}: int{config.weight_bits} weights {group} "
            f"({symmetry}), {activations}" + (", int8 KV cache" if config.kv_cache else "")
        ]
        if config.smoothing_alpha:
            parts.append(f"SmoothQuant alpha {config.smoothing_alpha} folded into the norms")
        calibration = config.calibration
        source = calibration.text_file or calibration.jsonl or calibration.dataset
        if source is not None:
            parts.append(
                f"calibration {calibration.samples} x {calibration.seq_len} tokens from {source}"
            )
        elif (
            config.method_class.calibration_needed(config.smoothing_alpha)
            or config.kv_cache is not None
        ):
            parts.append("calibration: none given")
        else:
            parts.append("no calibration")
        return "; ".join(parts + self.lint_notes(config))

    def lint_notes(self, config: QuantizeConfig) -> list[str]:
        from gcupipe.serving.args import VllmArgs

        target, combo = config.target_profile, config.combination()
        facts = config.model_facts()

        def flags(moe: bool) -> str:
            try:
                planned = target.planned_quantization(config.layout, combo, moe)
            except StageError as exc:
                return f"not servable there ({exc})"
            if planned is None:
                return "the --quantization the written files name"
            kv = target.kv_cache_dtype() if combo.kv_cache else None
            args = VllmArgs(model="<model_dir>", quantization=planned.value, kv_cache_dtype=kv)
            return " ".join(args.cli()[2:]) or "no quantization flags (vLLM reads config.json)"

        line = (
            f"for {target.name} ({target.summary}): serve with {flags(bool(facts and facts.moe))}"
        )
        if facts is None and flags(True) != flags(False):
            line += f"; a MoE model: {flags(True)}"
        return [line]

    def estimate(
        self, config: QuantizeConfig, upstream: ModelShape | None, machine: Machine
    ) -> Estimate | None:
        from gcupipe.estimate import TORCH_PROCESS_BYTES, Estimate, model_shape, numel

        source = model_shape(config.model, upstream)
        if source is None:
            return None
        output = _quantized_shape(source, config)
        # streaming (quant/streaming.py): one layer's input tensors (mapped pages), its
        # quantized form, the output shard being filled, one weight in float32 while it is
        # quantized; never the whole model
        quantized = {t.name for t in output.tensors if t.dtype == "I8"}
        largest = max((numel(t) for t in source.tensors if t.name in quantized), default=0)
        rss = TORCH_PROCESS_BYTES + source.largest_layer_bytes + output.largest_layer_bytes
        rss += min(config.max_shard_size_mb << 20, output.tensor_bytes) + 2 * 4 * largest
        seconds = machine.io_seconds(source.tensor_bytes + output.tensor_bytes)
        basis = "streamed layer by layer"
        calibration = config.calibration
        if config.method_class.calibration_needed(config.smoothing_alpha) or config.kv_cache:
            # each layer also runs as a float32 module on the calibration activations (its
            # inputs, its outputs and what its linears saw: about four copies)
            tokens = calibration.samples * calibration.seq_len
            rss += 4 * source.largest_layer_params + 4 * 4 * tokens * source.hidden_size
            passes = 1 if config.method_class.in_forward else 2  # (quant/methods.py)
            flops = passes * 2 * tokens * (source.params - source.global_params)
            seconds += machine.compute_seconds(flops)
            basis += f", calibrated on {tokens} tokens"
        return Estimate(output.total_bytes, rss, seconds, output, basis)

    def run(self, config: QuantizeConfig, ctx: StageContext) -> QuantizeOutputs:
        from gcupipe.formats.modeldir import ModelDir
        from gcupipe.quant.checkpoint import load_raw_config
        from gcupipe.quant.resume import LayerCheckpoints
        from gcupipe.quant.streaming import quantize_model
        from gcupipe.stages.calibration import calibration_tokens

        problems = self.check(config)
        if problems:
            raise StageError(f"{problems[0].key}: {problems[0].message}")
        raw = load_raw_config(config.model)
        target = config.target_profile
        method = config.method_class(
            config.method_class.Options.model_validate(config.options),
            device=config.device,
            smooth_alpha=config.smoothing_alpha,
        )
        tokens = None
        if method.calibrated or config.kv_cache is not None:
            vocab = int(raw.get("vocab_size") or raw.get("text_config", {}).get("vocab_size"))
            tokens = calibration_tokens(config.calibration, config.model, vocab, ctx.cache_dir)
        layout = config.layout
        checkpoints = LayerCheckpoints(ctx.scratch_dir / "layers")
        writer = layout.writer()(
            ctx.output_dir,
            config.model,
            raw,
            config.method,
            max_shard_bytes=config.max_shard_size_mb << 20,
            options=target.write_options(layout.name, ModelFacts.from_config(raw)),
            parts_dir=checkpoints.parts_dir,
        )
        with ctx.progress("quantize layers", total=None, unit="layers") as bar:

            def on_layer(index: int, total: int) -> None:
                bar.set_total(total)
                bar.advance(1)

            report = quantize_model(
                config.model,
                writer,
                method,
                _resolver(config),
                tokens,
                kv_cache=config.kv_cache is not None,
                kv_symmetric=target.kv_cache_symmetric(layout.name, config.method),
                batch_size=config.batch_size,
                on_layer=on_layer,
                log=ctx.log,
                device=config.device,
                checkpoints=checkpoints,
                compute_dtype=config.calibration.dtype,
            )
        writer.finish(report.float_linears)
        checkpoints.clear()
        return QuantizeOutputs(
            model_dir=ctx.output_dir,
            source_model_dir=config.model,
            format=config.format,
            method=config.method,
            target=target.name,
            quantization=target.quantization(ModelDir(ctx.output_dir), layout).value,
            quantized_layers=len(report.layer_types),
            float_layers=report.float_linears,
            fallbacks=report.fallbacks,
            kv_cache_layers=report.kv_cache_layers,
            expert_tokens=report.expert_tokens,
        )


def _option_problems(config: QuantizeConfig) -> list[Problem]:
    """`options:` checked against the method's Options model: one problem per bad key, at that
    key (an unknown key names the ones the method takes)."""
    options_model = config.method_class.Options
    try:
        options = options_model.model_validate(config.options)
    except ValidationError as exc:
        known = ", ".join(options_model.model_fields) or "none"
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"])
            message = error["msg"]
            if error["type"] == "extra_forbidden":
                message = f"{config.method} has no option '{where}' (its options: {known})"
            problems.append(Problem(message, f"options.{where}" if where else "options"))
        return problems
    return [Problem(message, "options") for message in options.check(config.weight_group_size)]


def _resolver(config: QuantizeConfig) -> Any:
    """Full module name -> LayerSpec (None = keep float), from method, ignore and overrides."""
    from gcupipe.quant.methods import LayerSpec
    from gcupipe.quant.scheme import ActivationScheme

    ignore = [re.compile(p) for p in config.ignore]
    overrides = [(re.compile(p), o) for p, o in config.overrides.items()]
    activation = config.method_class.activation
    layout = config.layout
    base = LayerSpec(
        bits=config.weight_bits,
        group_size=config.weight_group_size,
        symmetric=config.symmetric if activation is ActivationScheme.NONE else True,
        activation=activation,
        act_method=config.act_method,
        act_symmetric=layout.symmetric_activations
        or config.target_profile.static_activations_symmetric(layout.name),
    )

    def resolve(name: str) -> LayerSpec | None:
        if any(p.fullmatch(name) for p in ignore):
            return None
        for pattern, override in overrides:
            if pattern.fullmatch(name):
                if override.skip:
                    return None
                return LayerSpec(
                    bits=override.bits or base.bits,
                    group_size=base.group_size
                    if override.group_size is None
                    else override.group_size,
                    symmetric=base.symmetric if override.symmetric is None else override.symmetric,
                    activation=base.activation,
                    act_method=base.act_method,
                    act_symmetric=base.act_symmetric,
                )
        return base

    return resolve


def _quantized_shape(source: ModelShape, config: QuantizeConfig) -> ModelShape:
    """The tensors `config` makes of `source`: each quantized linear's weight at its bits, plus
    a float32 scale and offset per output channel or group (the formats name and arrange these
    differently; their sizes differ by well under 1% of the weights); the rest as it is."""
    from dataclasses import replace

    from gcupipe.formats.modeldir import TensorInfo
    from gcupipe.quant.archs import ARCHS
    from gcupipe.quant.checkpoint import layer_relative

    arch = ARCHS.get(str(source.raw_config.get("model_type")))
    resolve = _resolver(config)
    tensors = []
    for tensor in source.tensors:
        relative = layer_relative(tensor.name)
        module = tensor.name.removesuffix(".weight")
        linear = arch is not None and relative is not None and arch.is_linear(relative[1][:-7])
        spec = resolve(module) if linear and tensor.name.endswith(".weight") else None
        if spec is None or len(tensor.shape) != 2:
            tensors.append(tensor)
            continue
        n, k = tensor.shape
        groups = k // spec.group_size if spec.group_size else 1
        tensors.append(TensorInfo(tensor.name, "I8", (n, k * spec.bits // 8), ""))
        tensors.append(TensorInfo(f"{module}.weight_scale", "F32", (n, groups), ""))
        tensors.append(TensorInfo(f"{module}.weight_offset", "F32", (n, groups), ""))
    return replace(source, tensors=tuple(tensors), source=source)


def _float_linears(config: QuantizeConfig) -> list[str]:
    """The model's linears that `ignore` / `overrides` keep in float (none while the model is
    not there yet)."""
    from gcupipe.formats.layout import linear_shapes
    from gcupipe.formats.modeldir import ModelDir

    if not (config.model / "config.json").is_file():
        return []
    try:
        resolve = _resolver(config)
    except re.error:  # check() reports the pattern
        return []
    return [prefix for prefix in linear_shapes(ModelDir(config.model)) if resolve(prefix) is None]
