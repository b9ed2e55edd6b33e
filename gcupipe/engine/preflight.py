"""`gcupipe plan --estimate` and the space check `gcupipe run` makes before it starts: each
stage that will run estimates itself (`Stage.estimate`, gcupipe/estimate.py) from the model its
upstream hands on (read from disk when that stage's result exists, else its own estimate)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gcupipe.engine.results import StageResult
from gcupipe.engine.runner import Runner
from gcupipe.errors import GcupipeError
from gcupipe.estimate import (
    Estimate,
    Machine,
    ModelShape,
    format_bytes,
    free_bytes,
    space_problem,
)
from gcupipe.recipe.resolve import preview_stage_config, resolve_stage_config
from gcupipe.stages.base import StageConfig


@dataclass(frozen=True)
class StageEstimate:
    stage_id: str
    status: str  # what plan says: run, cached, skipped
    estimate: Estimate | None
    error: str | None = None  # why the stage could not estimate itself


@dataclass(frozen=True)
class Preflight:
    run_dir: Path
    stages: list[StageEstimate]
    free_bytes: int
    memory_bytes: int

    @property
    def disk_bytes(self) -> int:
        """What the stages that will run write, in all (unknowns count as nothing)."""
        return sum(s.estimate.disk_bytes or 0 for s in self.stages if s.estimate is not None)

    @property
    def peak_rss_bytes(self) -> int:
        """The largest peak of one stage (stages run one at a time on a machine)."""
        peaks = [s.estimate.peak_rss_bytes or 0 for s in self.stages if s.estimate is not None]
        return max(peaks, default=0)

    def problem(self) -> str | None:
        """Why the run cannot fit this machine's disk, or None."""
        return space_problem(self.run_dir, self.disk_bytes)

    def lines(self) -> list[str]:
        lines = []
        for stage in self.stages:
            if stage.status != "run":
                continue
            if stage.estimate is not None:
                lines.append(f"  {stage.stage_id}: {stage.estimate.line()}")
            else:
                lines.append(f"  {stage.stage_id}: no estimate ({stage.error or 'unknown'})")
        lines.append(
            f"  total: disk {format_bytes(self.disk_bytes)} of {format_bytes(self.free_bytes)} "
            f"free at {self.run_dir}; peak RSS {format_bytes(self.peak_rss_bytes)} of "
            f"{format_bytes(self.memory_bytes)} RAM"
        )
        if self.peak_rss_bytes > self.memory_bytes:
            lines.append("  warning: a stage needs more memory than this machine has")
        return lines


def preflight(runner: Runner, results: list[StageResult], machine: Machine) -> Preflight:
    """Estimates for the stages `results` (runner.plan's) says will run."""
    recipe = runner.recipe
    status = {result.id: result.outcome for result in results}
    models: dict[str, ModelShape | None] = {}
    stages = []
    for stage in recipe.stages.values():
        outputs = runner.outputs.get(stage.id)
        if status.get(stage.id) != "run":
            model_dir = getattr(outputs, "model_dir", None) if outputs is not None else None
            models[stage.id] = _read(Path(model_dir)) if model_dir else None
            stages.append(StageEstimate(stage.id, status.get(stage.id, "skipped"), None))
            continue
        upstream = next((models[n] for n in stage.needs if models.get(n) is not None), None)
        try:
            config: StageConfig | None = (
                resolve_stage_config(stage, runner.outputs, recipe.positions)
                if all(name in runner.outputs for name in stage.needs)
                else preview_stage_config(stage, runner.outputs, recipe.positions)
            )
            estimate = (
                None if config is None else stage.stage_class().estimate(config, upstream, machine)
            )
        except (GcupipeError, OSError, ValueError) as exc:
            stages.append(StageEstimate(stage.id, "run", None, str(exc).splitlines()[0]))
            models[stage.id] = None
            continue
        models[stage.id] = estimate.model if estimate is not None else None
        error = None if estimate is not None else "the stage cannot tell before it runs"
        stages.append(StageEstimate(stage.id, "run", estimate, error))
    run_dir = runner.store.run_dir
    return Preflight(run_dir, stages, free_bytes(run_dir), machine.memory_bytes)


def _read(model_dir: Path) -> ModelShape | None:
    try:
        return ModelShape.read(model_dir)
    except (GcupipeError, OSError, ValueError):
        return None
