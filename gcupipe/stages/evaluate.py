"""`uses: evaluate`: task accuracy of the quantized model against its float source, on
lm-eval-harness, gated on recovery (quantized score / float score) and on absolute drop."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import Field

from gcupipe.errors import GateFailed, StageError
from gcupipe.stages.base import Problem, Stage, StageConfig, StageContext, StageOutputs

REPORT_JSON = "evaluation.json"
REPORT_MARKDOWN = "evaluation.md"
CHART = "evaluation.png"
JUNIT = "evaluation-junit.xml"


class EvaluateConfig(StageConfig):
    tasks: list[str] = Field(
        default_factory=lambda: ["botchan_last_word"],
        min_length=1,
        description="lm-eval task names, local task directories (lm-eval's YAML task format, "
        "e.g. dataset_path: json with data_files), or botchan_last_word (built in, from PyPI "
        "data).",
    )
    model: Path | None = Field(
        default=None, description="Quantized model; default: the upstream stage's model_dir."
    )
    reference: Path | None = Field(
        default=None,
        description="Float model; default: the model the upstream chain was quantized from.",
    )
    engine: Literal["reference"] = Field(
        default="reference",
        description="reference: gcupipe's reference runtime (the integer math of the targets) "
        "through an lm-eval model adapter.",
    )
    limit: int | None = Field(
        default=200, ge=1, description="Documents per task (none: every document)."
    )
    min_recovery: float | None = Field(
        default=None,
        gt=0,
        description="Gate: quantized score >= this fraction of the float score (0.98).",
    )
    max_drop: float | None = Field(
        default=None, ge=0, description="Gate: float score - quantized score <= this."
    )
    fail: bool = Field(default=True, description="A failed gate fails the run (exit code 3).")


class TaskResult(StageOutputs):
    task: str
    metric: str
    float_score: float
    float_stderr: float | None
    quantized_score: float
    quantized_stderr: float | None
    recovery: float | None
    drop: float
    samples: int


class EvaluateOutputs(StageOutputs):
    passed: bool = Field(description="Every gate passed.")
    results: list[TaskResult] = Field(description="Per task: both scores, recovery, drop.")
    failures: list[str] = Field(description="Tasks whose gate failed.")
    report_json: Path = Field(description="Everything, machine-readable.")
    report_markdown: Path = Field(description="The table, for people and model cards.")
    chart: Path = Field(description="Float vs quantized per task with stderr bars (PNG).")
    junit: Path = Field(description="One JUnit test case per task.")


class EvaluateStage(Stage[EvaluateConfig, EvaluateOutputs]):
    """Scores float and quantized models on lm-eval tasks; gates on recovery."""

    Config = EvaluateConfig
    Outputs = EvaluateOutputs
    version = "1"

    def check(self, config: EvaluateConfig) -> list[Problem]:
        if config.min_recovery is not None and config.min_recovery > 1.5:
            return [Problem("min_recovery is a fraction (0.98), not a percentage", "min_recovery")]
        return []

    def describe(self, config: EvaluateConfig, cache_dir: Path) -> str | None:
        limit = f"{config.limit} documents each" if config.limit else "every document"
        return (
            f"lm-eval tasks {', '.join(config.tasks)} on the {config.engine} engine, {limit}, "
            f"float and quantized; gates: {_gates(config) or 'none (reports only)'}"
        )

    def run(self, config: EvaluateConfig, ctx: StageContext) -> EvaluateOutputs:
        from gcupipe.validation.harness import (
            BOTCHAN_TASK,
            build_botchan_last_word,
            reference_lm,
            run_tasks,
        )

        quantized = config.model or ctx.upstream_model_dir("evaluate")
        reference = config.reference or ctx.source_model_dir()
        if reference is None:
            raise StageError("evaluate: no float model: set `reference:`")
        names, include = [], []
        for task in config.tasks:
            if task == BOTCHAN_TASK:
                include.append(build_botchan_last_word(ctx.output_dir / "tasks"))
                names.append(task)
            elif Path(task).is_dir():
                include.append(Path(task))
                names.extend(p.stem for p in sorted(Path(task).glob("*.yaml")))
            else:
                names.append(task)
        scores = {}
        for label, model_dir in (("float", reference), ("quantized", quantized)):
            ctx.log(f"{label}: {', '.join(names)} on {model_dir}")
            scores[label] = run_tasks(reference_lm(model_dir), names, include, config.limit)
        results = []
        for f, q in zip(scores["float"], scores["quantized"], strict=True):
            recovery = q.value / f.value if f.value else None
            results.append(
                TaskResult(
                    task=f.task,
                    metric=f.metric,
                    float_score=f.value,
                    float_stderr=f.stderr,
                    quantized_score=q.value,
                    quantized_stderr=q.stderr,
                    recovery=recovery,
                    drop=f.value - q.value,
                    samples=q.samples,
                )
            )
        failures = [r.task for r in results if _fails(r, config)]
        paths = _write_reports(results, failures, config, ctx.output_dir)
        for result in results:
            ctx.log(_line(result))
        outputs = EvaluateOutputs(passed=not failures, results=results, failures=failures, **paths)
        if failures and config.fail:
            raise GateFailed(
                f"evaluate: {', '.join(failures)} below the gate "
                f"({_gates(config)}); report: {paths['report_markdown']}"
            )
        return outputs


def _fails(result: TaskResult, config: EvaluateConfig) -> bool:
    if config.min_recovery is not None and (result.recovery or 0.0) < config.min_recovery:
        return True
    return config.max_drop is not None and result.drop > config.max_drop


def _gates(config: EvaluateConfig) -> str:
    parts = []
    if config.min_recovery is not None:
        parts.append(f"min_recovery {config.min_recovery:g}")
    if config.max_drop is not None:
        parts.append(f"max_drop {config.max_drop:g}")
    return ", ".join(parts)


def _pm(value: float, stderr: float | None) -> str:
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def _line(result: TaskResult) -> str:
    recovery = f"{result.recovery:.2%}" if result.recovery is not None else "n/a"
    return (
        f"{result.task} ({result.metric}, {result.samples} docs): float "
        f"{_pm(result.float_score, result.float_stderr)}, quantized "
        f"{_pm(result.quantized_score, result.quantized_stderr)}, recovery {recovery}"
    )


def _write_reports(
    results: list[TaskResult], failures: list[str], config: EvaluateConfig, out: Path
) -> dict[str, Path]:
    from xml.etree import ElementTree

    paths = {
        "report_json": out / REPORT_JSON,
        "report_markdown": out / REPORT_MARKDOWN,
        "chart": out / CHART,
        "junit": out / JUNIT,
    }
    paths["report_json"].write_text(
        json.dumps(
            {
                "passed": not failures,
                "failures": failures,
                "gates": {"min_recovery": config.min_recovery, "max_drop": config.max_drop},
                "engine": config.engine,
                "results": [r.model_dump() for r in results],
            },
            indent=2,
        )
        + "\n"
    )
    lines = [
        "| task | metric | docs | float | quantized | recovery | drop |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        recovery = f"{r.recovery:.2%}" if r.recovery is not None else "n/a"
        lines.append(
            f"| {r.task} | {r.metric} | {r.samples} | {_pm(r.float_score, r.float_stderr)} | "
            f"{_pm(r.quantized_score, r.quantized_stderr)} | {recovery} | {r.drop:+.4f} |"
        )
    paths["report_markdown"].write_text("\n".join(lines) + "\n")
    _chart(results, paths["chart"])
    suite = ElementTree.Element(
        "testsuite", name="gcupipe.evaluate", tests=str(len(results)), failures=str(len(failures))
    )
    for r in results:
        case = ElementTree.SubElement(suite, "testcase", classname="gcupipe.evaluate", name=r.task)
        if r.task in failures:
            ElementTree.SubElement(case, "failure", message=_line(r)).text = _gates(config)
    ElementTree.ElementTree(suite).write(paths["junit"], encoding="utf-8", xml_declaration=True)
    return paths


def _chart(results: list[TaskResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(max(4.0, 1.6 * len(results) + 2), 3.2))
    xs = range(len(results))
    width = 0.38

    def err(values: list[float | None]) -> list[float]:
        return [v if v is not None and math.isfinite(v) else 0.0 for v in values]

    axes.bar(
        [x - width / 2 for x in xs],
        [r.float_score for r in results],
        width,
        yerr=err([r.float_stderr for r in results]),
        label="float",
        capsize=3,
    )
    axes.bar(
        [x + width / 2 for x in xs],
        [r.quantized_score for r in results],
        width,
        yerr=err([r.quantized_stderr for r in results]),
        label="quantized",
        capsize=3,
    )
    axes.set_xticks(list(xs), [f"{r.task}\n({r.metric})" for r in results])
    axes.set_ylabel("score")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
