"""`validate_model_dir`: every structural rule, then the numeric gates against the float model,
then the reports. The validate stage and `gcupipe validate DIR` both call it."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gcupipe.errors import GateFailed
from gcupipe.formats.modeldir import ModelDir, read_safetensors_header
from gcupipe.formats.registry import format_name
from gcupipe.formats.results import CheckOptions, Finding, RuleResult, outcome, skipped
from gcupipe.validation.numeric import NumericMetrics
from gcupipe.validation.report import ValidationReport, write_reports
from gcupipe.validation.rules import check_structure

# Used when no eval text is given: ordinary English prose, written for gcupipe, so the default
# check needs no download. A few hundred tokens: enough to see a broken model, cheap on a CPU.
BUILTIN_EVAL_TEXT = """\
The harbour town woke slowly in the winter. Fishing boats came back before the sun was high,
and the men who sailed them carried their catch up the stone steps to the market, where the
women had already laid out bread, onions, salt and the first oranges of the season. Children
ran between the stalls with messages and small coins, and the old schoolmaster walked past with
his hands behind his back, counting the gulls on the roof of the customs house as he did every
morning. Nobody knew why he counted them, and he had never said.

In the afternoon the wind turned to the north. The water in the bay grew dark and the ferry to
the island did not sail. People gathered in the tea house by the pier to wait for news of the
weather, talking about prices, about the new road the council had promised for years, and about
the engineer from the city who had arrived on the last train with three heavy boxes and a map.
He said he had come to measure the tides. He asked careful questions, wrote the answers in a
small notebook, and paid for everyone's tea before he left.

By evening the storm had passed. The lamps were lit along the harbour wall, the ferry captain
announced that he would sail at dawn, and the schoolmaster, passing the customs house once more,
counted the gulls again and smiled, because for the first time in eleven years there were
exactly as many as there had been the day he arrived.
"""


@dataclass(frozen=True)
class ValidationSettings:
    """What to check and the gates. Defaults are sized for a CPU: perplexity and top-1
    agreement on 2k tokens, 512 tokens of SQNR."""

    max_ppl_increase: float | None = 0.05
    min_token_agreement: float | None = 0.9
    agreement_margin: float = 1.0
    min_sqnr_db: float | None = None
    eval_text_file: Path | None = None
    eval_tokens: int = 2048
    window: int = 512
    stride: int = 512
    sqnr_tokens: int = 512
    worst_layers: int = 5
    quantization: str | None = None
    check_quantization: bool = False
    kv_cache_int8: bool | None = None
    target: str | None = None  # whose loaders judge the files (None: the layout's own)
    numeric: bool = True
    layered: bool | None = None  # None: layered when the float reference is too big for RAM
    # calibration tokens per routed MoE expert, from the quantize run (validation/coverage.py)
    expert_tokens: dict[str, int] | None = None
    min_expert_tokens: int | None = None


# Whole-model checks hold the float reference in float32 plus the quantized model: above this
# share of physical memory the reference alone is too big, so the checks go layer by layer.
LAYERED_RAM_SHARE = 0.4


@dataclass
class ValidationOutcome:
    report: ValidationReport
    paths: dict[str, Path] = field(default_factory=dict)


def validate_model_dir(
    model_dir: Path | str,
    reference_dir: Path | str | None = None,
    settings: ValidationSettings | None = None,
    report_dir: Path | str | None = None,
    log: Callable[[str], None] = print,
) -> ValidationOutcome:
    """Check `model_dir` (rules, then numerics against `reference_dir` when given) and write the
    reports into `report_dir` (none are written without one). Raises nothing on a failed check:
    call `enforce` to turn failures into GateFailed."""
    settings = settings or ValidationSettings()
    model_dir = Path(model_dir)
    reference = Path(reference_dir) if reference_dir is not None else None
    md = ModelDir(model_dir)
    options = CheckOptions(
        settings.quantization,
        settings.check_quantization,
        settings.kv_cache_int8,
        reference,
        settings.target,
    )
    report = ValidationReport(
        str(model_dir),
        str(reference) if reference else None,
        format_name(md),
        settings={k: v for k, v in asdict(settings).items() if k != "expert_tokens"},
    )
    started = time.perf_counter()
    report.rules = check_structure(md, options)
    report.metrics["structure_seconds"] = time.perf_counter() - started
    broken = [r.rule for r in report.rules if r.failed]
    log(
        f"structure: {len(report.rules) - len(broken)} of {len(report.rules)} rules pass"
        + (f"; failed: {', '.join(broken)}" if broken else "")
    )
    if not settings.numeric:
        report.gates = [skipped(g, s, "numeric checks turned off") for g, s in _GATES.items()]
    elif reference is None:
        report.gates = [
            skipped(g, s, "no float reference model given (`reference:`)")
            for g, s in _GATES.items()
        ]
    elif {"safetensors-integrity", "weights-complete"} & set(broken):
        report.gates = [
            skipped(g, s, "the directory is damaged (see the structural rules)")
            for g, s in _GATES.items()
        ]
    else:
        try:
            report.gates = _numeric_gates(model_dir, reference, settings, report, log)
        except Exception as exc:  # noqa: BLE001 - a model that cannot run is a failed check
            first_line = f"{exc.__class__.__name__}: {exc}".splitlines()[0]
            log(f"numeric checks could not run: {first_line}")
            report.gates = [
                RuleResult(
                    "model-runs",
                    "the quantized and float models load and run on the reference runtime",
                    "fail",
                    [
                        Finding(
                            f"the models could not be run: {first_line}",
                            "fix what the structural rules report; check "
                            "that `reference:` is the float source model",
                        )
                    ],
                )
            ]
    report.gates.append(_coverage(settings, report, log))
    paths = write_reports(report, Path(report_dir)) if report_dir is not None else {}
    return ValidationOutcome(report, paths)


def _coverage(
    settings: ValidationSettings, report: ValidationReport, log: Callable[[str], None]
) -> RuleResult:
    from gcupipe.validation.coverage import coverage_gate

    gate = coverage_gate(settings.expert_tokens, settings.min_expert_tokens)
    if gate.status != "skip":
        report.metrics["expert_coverage"] = gate.metrics
        m = gate.metrics
        log(
            f"expert coverage: {m['experts']} routed experts saw {m['min']} .. {m['max']} "
            f"calibration tokens (median {m['median']:g})"
            + (f"; {m['starved']} below min_expert_tokens" if m.get("starved") else "")
        )
    return gate


def enforce(result: ValidationOutcome) -> None:
    """GateFailed (exit code 3) naming the first failed rule and where the report is."""
    failures = result.report.failures
    if not failures:
        return
    first = failures[0]
    others = (
        f" (+{len(failures) - 1} more: {', '.join(f.rule for f in failures[1:])})"
        if len(failures) > 1
        else ""
    )
    where = result.paths.get("markdown") or result.paths.get("json")
    report = f"; report: {where}" if where else ""
    raise GateFailed(f"validation failed: {first.rule}: {first.message}{others}{report}")


_GATES = {
    "ppl-increase": "perplexity of the quantized model is within max_ppl_increase of float",
    "token-agreement": "where the float model is confident, the quantized model predicts the "
    "same next token at least min_token_agreement of the time",
    "layer-sqnr": "every quantized layer's output SQNR is at least min_sqnr_db",
}


def float32_bytes(model_dir: Path) -> int:
    """What a model's safetensors weights take in float32, from the file headers alone."""
    headers = (read_safetensors_header(file)[0] for file in model_dir.glob("*.safetensors"))
    return sum(4 * math.prod(info.shape) for infos in headers for info in infos.values())


def _physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system that reports it
        return None


def use_layered(
    settings: ValidationSettings, reference: Path, log: Callable[[str], None] = print
) -> bool:
    """settings.layered when set; else layered when the float reference in float32 needs more
    than LAYERED_RAM_SHARE of physical memory."""
    if settings.layered is not None:
        return settings.layered
    memory = _physical_memory_bytes()
    needed = float32_bytes(reference)
    if memory is None or needed <= LAYERED_RAM_SHARE * memory:
        return False
    log(
        f"layered numeric checks: the float reference needs {needed / 2**30:.1f} GiB in "
        f"float32, more than {LAYERED_RAM_SHARE:.0%} of {memory / 2**30:.1f} GiB RAM"
    )
    return True


def _numeric_gates(
    model_dir: Path,
    reference: Path,
    settings: ValidationSettings,
    report: ValidationReport,
    log: Callable[[str], None],
) -> list[RuleResult]:
    from gcupipe.formats.tokenizer import text_token_ids, tokenizer_dir
    from gcupipe.runtime.model import load_config

    started = time.perf_counter()
    text = (
        settings.eval_text_file.read_text(encoding="utf-8")
        if settings.eval_text_file
        else BUILTIN_EVAL_TEXT
    )
    tok_dir = tokenizer_dir(model_dir, reference)
    vocab = int(load_config(reference).vocab_size)
    ids = text_token_ids(text, tok_dir, vocab, settings.eval_tokens)
    layered = use_layered(settings, reference, log)
    report.metrics["layered"] = layered
    if layered:
        from gcupipe.validation.layered import layered_numeric

        metrics = layered_numeric(
            model_dir,
            reference,
            ids,
            settings.window,
            settings.stride,
            settings.agreement_margin,
            settings.sqnr_tokens,
            settings.worst_layers,
            log,
        )
    else:
        metrics = _whole_model_metrics(model_dir, reference, settings, report, ids)
    log(
        f"perplexity: float {metrics.ppl_float:.3f}, quantized {metrics.ppl_quantized:.3f} "
        f"({metrics.ppl_increase:+.2%}) on {metrics.scored_tokens} tokens"
    )
    log(f"token agreement: {agreement_text(metrics)}")
    if metrics.worst_layers:
        worst = metrics.worst_layers[0]
        log(f"worst layer: {worst} at {metrics.sqnr_db[worst]:.1f} dB SQNR")
    report.metrics.update(metrics.to_dict())
    report.metrics["numeric_seconds"] = time.perf_counter() - started
    return [
        _ppl_gate(metrics.ppl_increase, settings.max_ppl_increase),
        _agreement_gate(metrics, settings.min_token_agreement),
        _sqnr_gate(metrics.sqnr_db, metrics.worst_layers, settings.min_sqnr_db),
    ]


def _whole_model_metrics(
    model_dir: Path,
    reference: Path,
    settings: ValidationSettings,
    report: ValidationReport,
    ids: list[int],
) -> NumericMetrics:
    from gcupipe.runtime.load import load_model
    from gcupipe.runtime.perplexity import perplexity
    from gcupipe.validation.numeric import compare_scores, layer_sqnr

    started = time.perf_counter()
    quantized = load_model(model_dir)
    floating = load_model(reference)
    report.metrics["load_seconds"] = time.perf_counter() - started
    metrics = compare_scores(
        perplexity(floating.model, ids, settings.window, settings.stride),
        perplexity(quantized.model, ids, settings.window, settings.stride),
        settings.agreement_margin,
    )
    sqnr_ids = ids[: settings.sqnr_tokens]
    batches = [sqnr_ids[i : i + settings.window] for i in range(0, len(sqnr_ids), settings.window)]
    return layer_sqnr(quantized.model, floating.model, batches, settings.worst_layers, metrics)


def _ppl_gate(increase: float | None, limit: float | None) -> RuleResult:
    name = "ppl-increase"
    if limit is None or increase is None:
        return skipped(name, _GATES[name], "no max_ppl_increase set")
    findings = (
        []
        if increase <= limit
        else [
            Finding(
                f"perplexity rose by {increase:.2%}, more than max_ppl_increase {limit:.2%}",
                "keep sensitive layers in float (`ignore:`/`overrides:`), calibrate on more or "
                "closer data, try smooth_alpha or a per-group scheme",
            )
        ]
    )
    return outcome(name, _GATES[name], findings, ppl_increase=increase)


def agreement_text(metrics: NumericMetrics) -> str:
    """'99.5% of 829 positions where float leads by >= 1.0 logits' (or why there is none)."""
    where = f"where the float model's top-1 logit leads by >= {metrics.agreement_margin:g}"
    if metrics.token_agreement is None:
        return f"no eval position {where}"
    return f"{metrics.token_agreement:.1%} of {metrics.confident_positions} positions {where}"


def _agreement_gate(metrics: NumericMetrics, limit: float | None) -> RuleResult:
    name = "token-agreement"
    if limit is None:
        return skipped(name, _GATES[name], "no min_token_agreement set")
    if metrics.token_agreement is None:
        return skipped(name, _GATES[name], agreement_text(metrics))
    findings = []
    if metrics.token_agreement < limit:
        findings.append(
            Finding(
                f"top-1 predictions agree with the float model on {agreement_text(metrics)}, "
                f"below min_token_agreement {limit:.1%}",
                "look at the worst SQNR layers in the report and keep them in float or "
                "re-calibrate",
            )
        )
    return outcome(
        name,
        _GATES[name],
        findings,
        token_agreement=metrics.token_agreement,
        agreement_margin=metrics.agreement_margin,
        confident_positions=metrics.confident_positions,
    )


def _sqnr_gate(sqnr: dict[str, float], worst: list[str], limit: float | None) -> RuleResult:
    name = "layer-sqnr"
    if limit is None:
        return skipped(name, _GATES[name], "no min_sqnr_db set (worst layers are reported)")
    low = [p for p in worst if sqnr[p] < limit]
    findings = (
        []
        if not low
        else [
            Finding(
                f"{low[0]} has {sqnr[low[0]]:.1f} dB SQNR, below min_sqnr_db {limit}",
                f"keep {low[0]} in float (`ignore:`) or quantize it per group",
            )
        ]
    )
    return outcome(name, _GATES[name], findings)
