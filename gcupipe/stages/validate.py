"""`uses: validate`: prove a quantized model is loadable and accurate before it is served.

Runs every structural rule (the serving-time KeyErrors, flag mistakes and loader rejections,
caught early), then compares the quantized model with its float source on the reference
runtime: perplexity, top-1 agreement where the float model is confident, per-layer SQNR. A
failed gate ends the run with exit code 3, names the rule and points at the report, which is
kept under the run directory even though a failed stage's output is discarded.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from gcupipe.errors import StageError
from gcupipe.stages.base import Problem, Stage, StageContext, StageOutputs, TargetedConfig
from gcupipe.validation.report import JSON_NAME, JUNIT_NAME, MARKDOWN_NAME, PLOT_NAME

if TYPE_CHECKING:
    from gcupipe.estimate import Estimate, Machine, ModelShape
    from gcupipe.formats.modeldir import ModelDir


class EvalConfig(BaseModel):
    """`eval:` — the text perplexity is measured on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text_file: Path | None = Field(
        default=None, description="UTF-8 text to score; default: a built-in English passage."
    )
    max_tokens: int = Field(default=2048, gt=1, description="Tokens of the text to score.")
    window: int = Field(default=512, gt=1, description="Tokens per perplexity window.")
    stride: int = Field(default=512, gt=0, description="Tokens the window advances by.")


class ValidateConfig(TargetedConfig):
    model: Path | None = Field(
        default=None,
        description="Quantized model directory; default: the upstream quantize stage's model_dir.",
    )
    reference: Path | None = Field(
        default=None,
        description="The float source model, for the numeric checks; default: "
        "the upstream stage's source_model_dir when it has one.",
    )
    quantization: str | None = Field(
        default=None,
        description="The `quantization` value the model will be served with; "
        "checked against the files. Default: the upstream stage's `quantization` output.",
    )
    max_ppl_increase: float | None = Field(
        default=0.05,
        ge=0,
        description="Largest allowed relative perplexity increase over "
        "float (0.05 = +5%); null turns the gate off.",
    )
    min_token_agreement: float | None = Field(
        default=0.9,
        ge=0,
        le=1,
        description="Smallest allowed share of the eval positions where the float model is "
        "confident (see agreement_margin) at which the quantized model predicts the same next "
        "token; null turns the gate off.",
    )
    agreement_margin: float = Field(
        default=1.0,
        ge=0,
        description="A position counts for token agreement when the float model's top-1 logit "
        "leads the runner-up by at least this much. Near-ties flip with float rounding "
        "(per-token int8 activations make that chaotic), so counting them measures the CPU, "
        "not the quantization.",
    )
    min_sqnr_db: float | None = Field(
        default=None,
        description="Smallest allowed per-layer output SQNR in dB; null = report "
        "the worst layers only.",
    )
    min_expert_tokens: int | None = Field(
        default=None,
        ge=0,
        description="Gate: every routed MoE expert saw at least this many calibration tokens "
        "(calibrated methods; the counts come from the upstream quantize stage).",
    )
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Perplexity text.")
    sqnr_tokens: int = Field(default=512, gt=0, description="Tokens run for per-layer SQNR.")
    worst_layers: int = Field(default=5, ge=0, description="Worst-SQNR layers to report.")
    kv_cache_int8: bool | None = Field(
        default=None,
        description="Require int8 KV-cache scales; default: what the upstream stage says it wrote.",
    )
    numeric: bool = Field(default=True, description="Run the numeric checks (needs reference).")
    layered: bool | None = Field(
        default=None,
        description="Run the numeric checks one decoder layer at a time, for "
        "models larger than memory (same metrics). Default: when the float reference in float32 "
        "needs more than 40% of physical memory.",
    )
    fail: bool = Field(
        default=True, description="Fail the run (exit 3) when a check fails; false only reports."
    )


class ValidateOutputs(StageOutputs):
    passed: bool = Field(description="Every rule and gate passed.")
    model_dir: Path = Field(description="The validated model directory (for serve).")
    format: str = Field(description="Its layout: modelslim, gcu, compressed-tensors or float.")
    target: str = Field(description="The target whose loaders judged the files.")
    quantization: str | None = Field(description="The `quantization` value the files need there.")
    failures: list[str] = Field(description="Names of the failed rules and gates.")
    report_json: Path = Field(description="Everything, machine-readable.")
    report_markdown: Path = Field(description="Summary for people.")
    junit: Path = Field(description="One JUnit test case per rule and gate.")
    sqnr_plot: Path | None = Field(description="PNG of per-layer SQNR (when measured).")
    ppl_float: float | None = Field(description="Perplexity of the float model.")
    ppl_quantized: float | None = Field(description="Perplexity of the quantized model.")
    ppl_increase: float | None = Field(description="Relative increase (0.01 = +1%).")
    token_agreement: float | None = Field(
        description="Top-1 agreement with float at the confident eval positions."
    )


class ValidateStage(Stage[ValidateConfig, ValidateOutputs]):
    """Structural rules + numeric gates + reports for a quantized model directory."""

    Config = ValidateConfig
    Outputs = ValidateOutputs
    version = "1"
    reports = frozenset({JSON_NAME, MARKDOWN_NAME, PLOT_NAME, JUNIT_NAME})

    def check(self, config: ValidateConfig) -> list[Problem]:
        problems = []
        if config.eval.stride > config.eval.window:
            problems.append(Problem("stride must not exceed window", "eval.stride"))
        if config.eval.text_file is not None and not config.eval.text_file.is_file():
            problems.append(Problem(f"no such file: {config.eval.text_file}", "eval.text_file"))
        return problems

    def describe(self, config: ValidateConfig, cache_dir: Path) -> str | None:
        gates = []
        if config.max_ppl_increase is not None:
            gates.append(f"perplexity at most +{config.max_ppl_increase:.1%}")
        if config.min_token_agreement is not None:
            gates.append(
                f"top-1 agreement >= {config.min_token_agreement:.0%} where float leads by "
                f">= {config.agreement_margin:g}"
            )
        if config.min_sqnr_db is not None:
            gates.append(f"every layer >= {config.min_sqnr_db:g} dB SQNR")
        rules = "structural rules" + (
            f" and {config.target}'s loaders" if config.target else " and the target's loaders"
        )
        if not config.numeric or not gates:
            return rules
        text = config.eval.text_file or "the built-in text"
        return (
            f"{rules}; against the float model on {config.eval.max_tokens} tokens of "
            f"{text}: {', '.join(gates)}"
        )

    def estimate(
        self, config: ValidateConfig, upstream: ModelShape | None, machine: Machine
    ) -> Estimate | None:
        from gcupipe.estimate import TORCH_PROCESS_BYTES, Estimate, model_shape
        from gcupipe.validation.api import LAYERED_RAM_SHARE

        model = model_shape(config.model, upstream)
        if model is None:
            return None
        reference = model_shape(config.reference, model.source)
        report = 1 << 20  # the report, its charts and the per-layer table
        if not config.numeric or reference is None:
            return Estimate(report, TORCH_PROCESS_BYTES, 10.0, model, "structural rules only")
        layered = config.layered
        if layered is None:
            layered = 4 * reference.params > LAYERED_RAM_SHARE * machine.memory_bytes
        tokens = config.eval.max_tokens
        vocab = int(reference.raw_config.get("vocab_size") or 0)
        activations = 4 * (3 * tokens * reference.hidden_size + 2 * config.eval.window * vocab)
        if layered:
            # validation/layered.py: embedding and lm_head in float32, one float32 layer and the
            # quantized one beside it, the hidden states of every window
            rss = 4 * reference.global_params + 4 * reference.largest_layer_params
            rss += model.largest_layer_bytes
            basis = "layer by layer"
        else:
            rss = 4 * reference.params + model.tensor_bytes  # both models whole
            basis = "both models whole"
        flops = 2 * 2 * tokens * reference.params + 2 * config.sqnr_tokens * reference.params
        seconds = machine.compute_seconds(flops)
        seconds += machine.io_seconds(reference.tensor_bytes + model.tensor_bytes)
        return Estimate(report, TORCH_PROCESS_BYTES + rss + activations, seconds, model, basis)

    def run(self, config: ValidateConfig, ctx: StageContext) -> ValidateOutputs:
        from gcupipe.formats.modeldir import ModelDir
        from gcupipe.validation.api import ValidationSettings, enforce, validate_model_dir

        upstream = _upstream_model(ctx)
        model_dir: Path | None = config.model or _path_output(upstream, "model_dir")
        if model_dir is None:
            raise StageError(
                "validate: no model to check: set `model:` or put a quantize stage in `needs:`"
            )
        reference = config.reference or _path_output(upstream, "source_model_dir")
        quantization = config.quantization
        check_flag = config.quantization is not None
        if not check_flag and upstream is not None and hasattr(upstream, "quantization"):
            quantization, check_flag = upstream.quantization, True
        target = config.target or getattr(upstream, "target", None)
        kv = config.kv_cache_int8
        if kv is None and upstream is not None and hasattr(upstream, "kv_cache_layers"):
            kv = bool(upstream.kv_cache_layers) or None
        if reference is None and config.numeric:
            ctx.log("validate: no float reference (`reference:`): numeric checks are skipped")
        settings = ValidationSettings(
            max_ppl_increase=config.max_ppl_increase,
            min_token_agreement=config.min_token_agreement,
            agreement_margin=config.agreement_margin,
            min_sqnr_db=config.min_sqnr_db,
            eval_text_file=config.eval.text_file,
            eval_tokens=config.eval.max_tokens,
            window=config.eval.window,
            stride=config.eval.stride,
            sqnr_tokens=config.sqnr_tokens,
            worst_layers=config.worst_layers,
            quantization=quantization,
            check_quantization=check_flag,
            kv_cache_int8=kv,
            target=target,
            numeric=config.numeric,
            layered=config.layered,
            expert_tokens=getattr(upstream, "expert_tokens", None),
            min_expert_tokens=config.min_expert_tokens,
        )
        result = validate_model_dir(
            Path(model_dir), reference, settings, ctx.output_dir, log=ctx.log
        )
        report = result.report
        if not report.passed and config.fail:
            # the engine discards a failed stage's output: keep the report where it can be read
            kept = ctx.run_dir / "reports" / ctx.stage_id
            if kept.exists():
                shutil.rmtree(kept)
            shutil.copytree(ctx.output_dir, kept, ignore=shutil.ignore_patterns("*.tmp"))
            result.paths = {kind: kept / path.name for kind, path in result.paths.items()}
            enforce(result)
        metrics = report.metrics
        return ValidateOutputs(
            passed=report.passed,
            model_dir=Path(model_dir),
            format=report.format,
            **_served_as(ModelDir(Path(model_dir)), target),
            failures=[r.rule for r in report.failures],
            report_json=result.paths["json"],
            report_markdown=result.paths["markdown"],
            junit=result.paths["junit"],
            sqnr_plot=result.paths.get("plot"),
            ppl_float=metrics.get("ppl_float"),
            ppl_quantized=metrics.get("ppl_quantized"),
            ppl_increase=metrics.get("ppl_increase"),
            token_agreement=metrics.get("token_agreement"),
        )


def _served_as(md: ModelDir, target_name: str | None) -> dict[str, Any]:
    """The target that judged the files and the `--quantization` they need there."""
    from gcupipe.formats.registry import format_of
    from gcupipe.targets.registry import target_for

    layout = format_of(md)
    target = target_for(target_name, layout)
    try:
        quantization = target.quantization(md, layout).value if layout is not None else None
    except StageError:  # the quantization-flag rule has reported it
        quantization = None
    return {"target": target.name, "quantization": quantization}


def _path_output(outputs: StageOutputs | None, name: str) -> Path | None:
    value = getattr(outputs, name, None) if outputs is not None else None
    return Path(value) if value is not None else None


def _upstream_model(ctx: StageContext) -> StageOutputs | None:
    """The upstream stage that produced a model: a quantize stage first, else any with a
    model_dir (download, a custom stage)."""
    from gcupipe.stages.quantize import QuantizeOutputs

    quantized = ctx.upstream_outputs(QuantizeOutputs)
    if len(quantized) > 1:
        raise StageError("validate: several quantize stages upstream: set `model:` to choose")
    if quantized:
        return quantized[0]
    with_model = [o for o in ctx.upstream.values() if hasattr(o, "model_dir")]
    return with_model[0] if len(with_model) == 1 else None
