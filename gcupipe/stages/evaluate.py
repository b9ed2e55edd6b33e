"""`uses: evaluate`: task accuracy of the quantized model against its float source, on
lm-eval-harness, gated on recovery (quantized score / float score) and on absolute drop."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from gcupipe.errors import GateFailed, StageError
from gcupipe.stages.base import Problem, Stage, StageConfig, StageContext, StageOutputs
from gcupipe.validation.harness import (
    BOTCHAN_TASK,
    TaskScore,
    build_botchan_last_word,
    reference_lm,
    run_tasks,
    served_lm,
    served_model_name,
)

if TYPE_CHECKING:
    from gcupipe.estimate import Estimate, Machine, ModelShape

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
        default=None,
        description="Quantized model; default: every upstream stage's model_dir (each scored "
        "against one float run).",
    )
    reference: Path | None = Field(
        default=None,
        description="Float model; default: the model the upstream chain was quantized from.",
    )
    engine: Literal["reference", "served"] = Field(
        default="reference",
        description="reference: gcupipe's reference runtime (the integer math of the targets) "
        "through an lm-eval model adapter; served: vLLM's OpenAI server through lm-eval's "
        "local-completions.",
    )
    endpoint: str | None = Field(
        default=None,
        description="served: base URL of a server of the quantized model; default: the one an "
        "upstream serve stage left running (keep_alive), else one this stage starts. The float "
        "model is always served by this stage.",
    )
    concurrency: int = Field(default=4, ge=1, description="served: requests in flight.")
    max_length: int = Field(
        default=2048, gt=0, description="Context tokens per document (vLLM's max_model_len)."
    )
    start_timeout_s: float = Field(
        default=600, gt=0, description="served: wait this long for a server to be healthy."
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
    model: str
    model_dir: Path
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
    results: list[TaskResult] = Field(
        description="Per quantized model and task: both scores, recovery, drop."
    )
    failures: list[str] = Field(description="MODEL/TASK of each failed gate.")
    report_json: Path = Field(description="Everything, machine-readable.")
    report_markdown: Path = Field(description="The table, for people and model cards.")
    chart: Path = Field(description="Float vs quantized per task with stderr bars (PNG).")
    junit: Path = Field(description="One JUnit test case per model and task.")


class EvaluateStage(Stage[EvaluateConfig, EvaluateOutputs]):
    """Scores float and quantized models on lm-eval tasks; gates on recovery."""

    Config = EvaluateConfig
    Outputs = EvaluateOutputs
    version = "1"
    reports = frozenset({REPORT_JSON, REPORT_MARKDOWN, CHART, JUNIT, "tasks/"})

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

    def estimate(
        self, config: EvaluateConfig, upstream: ModelShape | None, machine: Machine
    ) -> Estimate | None:
        from gcupipe.estimate import (
            TORCH_PROCESS_BYTES,
            VLLM_PROCESS_BYTES,
            VLLM_START_S,
            Estimate,
            model_shape,
        )

        model = model_shape(config.model, upstream)
        reference = model_shape(config.reference, model.source if model is not None else None)
        if model is None or reference is None:
            return None
        # one model at a time: the reference runtime holds a float model in float32; a vLLM
        # server holds the weights as stored and 1 GiB of KV cache (serve's default)
        if config.engine == "reference":
            rss = TORCH_PROCESS_BYTES + max(4 * reference.params, model.tensor_bytes)
            start = 0.0
        else:
            rss = VLLM_PROCESS_BYTES + reference.tensor_bytes + (1 << 30)
            start = 2 * VLLM_START_S
        documents = (config.limit or 1000) * len(config.tasks)
        tokens = documents * min(config.max_length, 512)  # a document: up to ~512 tokens
        flops = 2 * tokens * (reference.params + model.params)
        seconds = start + machine.compute_seconds(flops)
        return Estimate(1 << 20, rss, seconds, None, f"{config.engine} engine, one model at a time")

    def run(self, config: EvaluateConfig, ctx: StageContext) -> EvaluateOutputs:
        models = _quantized_models(config, ctx)
        reference = config.reference or ctx.source_model_dir()
        if reference is None:
            raise StageError("evaluate: no float model: set `reference:`")
        if config.endpoint is not None and len(models) > 1:
            raise StageError("evaluate: `endpoint:` serves one model; several are upstream")
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
        tasks = (names, include, config.limit)
        # the float model is scored once, whatever the number of quantized models
        baseline = self._scores(config, ctx, "float", reference, None, tasks)
        results = []
        for label, model_dir in models.items():
            endpoint = config.endpoint or _upstream_endpoint(ctx, model_dir)
            scores = self._scores(config, ctx, label, model_dir, endpoint, tasks)
            for f, q in zip(baseline, scores, strict=True):
                results.append(
                    TaskResult(
                        model=label,
                        model_dir=model_dir,
                        task=f.task,
                        metric=f.metric,
                        float_score=f.value,
                        float_stderr=f.stderr,
                        quantized_score=q.value,
                        quantized_stderr=q.stderr,
                        recovery=q.value / f.value if f.value else None,
                        drop=f.value - q.value,
                        samples=q.samples,
                    )
                )
        failures = [f"{r.model}/{r.task}" for r in results if _fails(r, config)]
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

    def _scores(
        self,
        config: EvaluateConfig,
        ctx: StageContext,
        label: str,
        model_dir: Path,
        endpoint: str | None,
        tasks: tuple[list[str], list[Path], int | None],
    ) -> list[TaskScore]:
        ctx.log(f"{label}: {', '.join(tasks[0])} on {model_dir} ({config.engine} engine)")
        if config.engine == "reference":
            return run_tasks(reference_lm(model_dir, config.max_length), *tasks)
        if endpoint is not None:
            ctx.log(f"{label}: served at {endpoint}")
            return run_tasks(self._served_lm(config, endpoint, model_dir), *tasks)
        with self._server(config, ctx, label, model_dir) as base_url:
            return run_tasks(self._served_lm(config, base_url, model_dir), *tasks)

    def _served_lm(self, config: EvaluateConfig, base_url: str, model_dir: Path) -> Any:
        return served_lm(base_url, model_dir, config.concurrency, config.max_length)

    @contextmanager
    def _server(
        self, config: EvaluateConfig, ctx: StageContext, label: str, model_dir: Path
    ) -> Iterator[str]:
        """A vLLM server of `model_dir` for this stage only, set up as a serve stage would."""
        from gcupipe.serving.runner import running_server
        from gcupipe.stages.serve import ServeConfig, ServeStage

        serve = ServeConfig(
            model=model_dir, served_model_name=label, max_model_len=config.max_length
        )
        served = ServeStage().prepare(serve, ctx)
        log_path = ctx.output_dir / f"vllm-server-{label}.log"
        with running_server(served.args, served.env, log_path, config.start_timeout_s) as url:
            ctx.log(f"{label}: vLLM server at {url} (log: {log_path.name})")
            yield url


def _quantized_models(config: EvaluateConfig, ctx: StageContext) -> dict[str, Path]:
    """Label -> directory of each model to score: `model:`, else every upstream model_dir
    (labelled by the stage that made it)."""
    if config.model is not None:
        return {config.model.name: config.model}
    return {stages[0]: path for path, stages in ctx.upstream_model_dirs("evaluate").items()}


def _upstream_endpoint(ctx: StageContext, model_dir: Path) -> str | None:
    """The base URL an upstream serve stage left running for `model_dir`, if it still answers
    (a cached serve stage's server is long gone)."""
    for stage_id, outputs in ctx.upstream.items():
        endpoint = getattr(outputs, "endpoint", None)
        served = getattr(outputs, "model_dir", None)
        if not endpoint or served is None or Path(served).resolve() != model_dir.resolve():
            continue
        try:
            served_model_name(endpoint)
        except StageError:
            ctx.log(f"the server {stage_id} left at {endpoint} is gone; starting one")
            continue
        return str(endpoint)
    return None


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
        f"{result.model} {result.task} ({result.metric}, {result.samples} docs): float "
        f"{_pm(result.float_score, result.float_stderr)}, quantized "
        f"{_pm(result.quantized_score, result.quantized_stderr)}, recovery {recovery}"
    )


def results_table(results: list[dict[str, Any]]) -> list[str]:
    """The per-task table (Markdown lines) of evaluation.md and of the model card."""
    lines = [
        "| model | task | metric | docs | float | quantized | recovery | drop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        recovery = f"{r['recovery']:.2%}" if r["recovery"] is not None else "n/a"
        lines.append(
            f"| {r['model']} | {r['task']} | {r['metric']} | {r['samples']} | "
            f"{_pm(r['float_score'], r['float_stderr'])} | "
            f"{_pm(r['quantized_score'], r['quantized_stderr'])} | {recovery} | "
            f"{r['drop']:+.4f} |"
        )
    return lines


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
                "results": [r.model_dump(mode="json") for r in results],
            },
            indent=2,
        )
        + "\n"
    )
    table = results_table([r.model_dump(mode="json") for r in results])
    paths["report_markdown"].write_text("\n".join(table) + "\n")
    _chart(results, paths["chart"])
    suite = ElementTree.Element(
        "testsuite", name="gcupipe.evaluate", tests=str(len(results)), failures=str(len(failures))
    )
    for r in results:
        name = f"{r.model}/{r.task}"
        case = ElementTree.SubElement(suite, "testcase", classname="gcupipe.evaluate", name=name)
        if name in failures:
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
    axes.set_xticks(list(xs), [f"{r.model}\n{r.task}\n({r.metric})" for r in results])
    axes.set_ylabel("score")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
