"""The validation report in four forms: JSON (everything, for machines), Markdown (for people),
a PNG of per-layer SQNR, and JUnit XML (one test case per rule and gate, for CI)."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gcupipe.formats.results import RuleResult

JSON_NAME = "validation.json"
MARKDOWN_NAME = "validation.md"
PLOT_NAME = "sqnr.png"
JUNIT_NAME = "junit.xml"


@dataclass
class ValidationReport:
    model_dir: str
    reference_dir: str | None
    format: str
    rules: list[RuleResult] = field(default_factory=list)  # structural
    gates: list[RuleResult] = field(default_factory=list)  # numeric
    metrics: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def failures(self) -> list[RuleResult]:
        return [r for r in self.rules + self.gates if r.failed]

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "model_dir": self.model_dir,
            "reference_dir": self.reference_dir,
            "format": self.format,
            "failures": [r.rule for r in self.failures],
            "rules": [r.to_dict() for r in self.rules],
            "gates": [r.to_dict() for r in self.gates],
            "metrics": _finite(self.metrics),
            "settings": _finite(self.settings),
        }


def _finite(value: Any) -> Any:
    """JSON has no inf/nan: a perfect SQNR (zero error) is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_reports(report: ValidationReport, out_dir: Path) -> dict[str, Path]:
    """Write every form of the report into `out_dir`; returns kind -> path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / JSON_NAME,
        "markdown": out_dir / MARKDOWN_NAME,
        "junit": out_dir / JUNIT_NAME,
    }
    paths["json"].write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    paths["junit"].write_bytes(junit_xml(report))
    sqnr = report.metrics.get("sqnr_db") or {}
    if sqnr:
        paths["plot"] = out_dir / PLOT_NAME
        plot_sqnr(
            sqnr,
            report.metrics.get("worst_layers") or [],
            paths["plot"],
            report.settings.get("min_sqnr_db"),
        )
    paths["markdown"].write_text(markdown(report, paths))
    return paths


def markdown(report: ValidationReport, paths: dict[str, Path]) -> str:
    verdict = "PASSED" if report.passed else "FAILED: " + ", ".join(r.rule for r in report.failures)
    lines = [
        f"# Validation of `{report.model_dir}`",
        "",
        f"**{verdict}**",
        "",
        f"- format: {report.format}",
        f"- float reference: {report.reference_dir or '(none: numeric checks skipped)'}",
        "",
    ]
    plot = paths["plot"].name if "plot" in paths else None
    lines += accuracy_sections(report.metrics, plot_name=plot)
    lines += ["## Rules", "", "| rule | status | details |", "|---|---|---|"]
    for result in report.rules + report.gates:
        status = {"pass": "pass", "fail": "**FAIL**", "skip": "skip"}[result.status]
        details = result.message.replace("|", "\\|") if result.status != "pass" else ""
        lines.append(f"| `{result.rule}` | {status} | {details} |")
    return "\n".join(lines) + "\n"


def accuracy_sections(
    metrics: dict[str, Any], heading_level: int = 2, plot_name: str | None = None
) -> list[str]:
    """Markdown of the accuracy metrics (perplexity, agreement, worst layers, expert coverage):
    the report's and the model card's."""
    heading = "#" * heading_level
    lines: list[str] = []
    if metrics.get("ppl_quantized") is not None:
        lines += [
            f"{heading} Accuracy",
            "",
            "| metric | value |",
            "|---|---|",
            f"| perplexity, float | {metrics['ppl_float']:.4f} |",
            f"| perplexity, quantized | {metrics['ppl_quantized']:.4f} |",
            f"| increase (relative) | {metrics['ppl_increase']:+.2%} |",
            f"| scored tokens | {metrics.get('scored_tokens', 0)} |",
        ]
        if metrics.get("mean_abs_logprob_delta") is not None:
            lines.append(f"| mean abs log-prob change | {metrics['mean_abs_logprob_delta']:.4f} |")
        if metrics.get("token_agreement") is not None:
            lines.append(
                f"| top-1 agreement, {metrics['confident_positions']} positions where float "
                f"leads by >= {metrics['agreement_margin']:g} | {metrics['token_agreement']:.2%} |"
            )
        lines.append("")
    worst = metrics.get("worst_layers") or []
    if worst:
        sqnr = metrics["sqnr_db"]
        lines += [f"{heading} Worst layers (SQNR, dB)", "", "| layer | SQNR |", "|---|---|"]
        lines += [f"| `{name}` | {_db(sqnr[name])} |" for name in worst]
        if plot_name:
            lines += ["", f"![per-layer SQNR]({plot_name})"]
        lines.append("")
    coverage = metrics.get("expert_coverage")
    if coverage:
        lines += [
            f"{heading} MoE experts: calibration tokens routed to each",
            "",
            f"{coverage['experts']} experts; tokens min {coverage['min']}, median "
            f"{coverage['median']:g}, max {coverage['max']}.",
            "",
            "| tokens | experts |",
            "|---|---|",
            *(f"| {bins} | {count} |" for bins, count in coverage["histogram"].items()),
            "",
            "Fewest: " + ", ".join(f"`{name}` {count}" for name, count in coverage["fewest"]),
            "",
        ]
    return lines


def _db(value: float | None) -> str:
    """An SQNR as written: JSON keeps a perfect one (no error at all) as null."""
    return "exact" if value is None or not math.isfinite(value) else f"{value:.1f}"


def junit_xml(report: ValidationReport) -> bytes:
    results = report.rules + report.gates
    suite = ET.Element(
        "testsuite",
        name="gcupipe.validate",
        tests=str(len(results)),
        failures=str(sum(r.failed for r in results)),
        skipped=str(sum(r.status == "skip" for r in results)),
    )
    for result in results:
        kind = "numeric" if result in report.gates else "structure"
        case = ET.SubElement(
            suite, "testcase", classname=f"gcupipe.validate.{kind}", name=result.rule
        )
        if result.failed:
            failure = ET.SubElement(case, "failure", message=result.message)
            failure.text = "\n".join(f"{f.message}\nfix: {f.fix}" for f in result.findings)
        elif result.status == "skip":
            ET.SubElement(case, "skipped", message=result.skip_reason)
    data: bytes = ET.tostring(suite, encoding="utf-8", xml_declaration=True)
    return data


def plot_sqnr(
    sqnr_db: dict[str, float], worst: list[str], path: Path, threshold_db: float | None = None
) -> None:
    """Per-layer SQNR in checkpoint order, worst layers marked and labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(sqnr_db)
    values = [sqnr_db[n] if math.isfinite(sqnr_db[n]) else float("nan") for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, min(0.06 * len(names), 24.0)), 3.6), dpi=100)
    ax.plot(range(len(names)), values, marker=".", linewidth=0.8, color="#3465a4")
    for rank, name in enumerate(worst):
        i = names.index(name)
        ax.scatter([i], [values[i]], color="#cc0000", zorder=3)
        ax.annotate(
            name.removeprefix("model.layers."),
            (i, values[i]),
            fontsize=7,
            textcoords="offset points",
            xytext=(4, -11 if rank % 2 == 0 else 5),
            color="#cc0000",
        )
    if threshold_db is not None:
        ax.axhline(threshold_db, color="#cc0000", linestyle="--", linewidth=0.8)
    ax.set_xlabel("quantized linear layer (checkpoint order)")
    ax.set_ylabel("SQNR (dB)")
    ax.set_title("Per-layer output SQNR of the quantized model")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
