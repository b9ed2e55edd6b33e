"""Runs a Recipe: stage selection, cache decisions, atomic outputs, events and the run record."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from gcupipe.engine.cache import CacheKey, Decision, cache_key, decide
from gcupipe.engine.digest import content_digest, json_digest, stat_fingerprint
from gcupipe.engine.events import Events
from gcupipe.engine.lock import write_lock
from gcupipe.engine.results import RunResult, StageResult
from gcupipe.engine.selection import Selection, matching, select_stages
from gcupipe.engine.store import OUTPUT_DIR_NAME, RunStore, StageRecord
from gcupipe.errors import GcupipeError, Interrupted, StageError, UsageError
from gcupipe.recipe.planned import PlannedStage, Recipe
from gcupipe.recipe.resolve import preview_stage_config, resolve_stage_config
from gcupipe.secrets import redact, register_secret
from gcupipe.stages.base import ProgressTask, StageContext, StageOutputs


class Runner:
    def __init__(self, recipe: Recipe, run_dir: Path, events: Events | None = None):
        self.recipe = recipe
        self.store = RunStore(run_dir.resolve())
        self.events = events or Events()
        self.outputs: dict[str, StageOutputs] = {}
        self.digests: dict[str, str] = {}

    def run(self, selection: Selection | None = None) -> RunResult:
        selection = selection or Selection()
        chosen = select_stages(self.recipe, selection)
        forced = {sid for name in selection.force for sid in matching(self.recipe, name)}
        self.store.open()
        results: list[StageResult] = []
        error: GcupipeError | None = None
        outcome = "ok"
        self.events.emit(
            "run_started",
            recipe=self.recipe.name,
            run_dir=str(self.store.run_dir),
            stages=list(self.recipe.stages),
        )
        try:
            for stage in self.recipe.stages.values():
                if error is not None:
                    results.append(
                        StageResult(stage.id, stage.uses, "not-run", "an earlier stage failed")
                    )
                    continue
                started = time.time()
                try:
                    results.append(self._stage(stage, stage.id in chosen, stage.id in forced))
                except KeyboardInterrupt:
                    error = Interrupted("interrupted")
                    outcome = "interrupted"
                    self.events.emit(
                        "stage_failed",
                        stage.id,
                        message="interrupted",
                        error="Interrupted",
                        exit_code=error.exit_code,
                    )
                    results.append(
                        StageResult(
                            stage.id,
                            stage.uses,
                            "interrupted",
                            "interrupted",
                            started_at=started,
                            duration_s=time.time() - started,
                        )
                    )
                except GcupipeError as exc:
                    error = exc
                    outcome = "failed"
                    self.events.emit(
                        "stage_failed",
                        stage.id,
                        message=str(exc),
                        error=type(exc).__name__,
                        exit_code=exc.exit_code,
                    )
                    results.append(
                        StageResult(
                            stage.id,
                            stage.uses,
                            "failed",
                            "failed",
                            started_at=started,
                            duration_s=time.time() - started,
                            message=str(exc),
                        )
                    )
        finally:
            write_lock(self.store.run_dir, self.recipe, results, outcome)
            self.store.close()
            self.events.emit(
                "run_finished",
                outcome=outcome,
                lock_file=str(self.store.run_dir / "gcupipe.lock.json"),
            )
        return RunResult(self.recipe.name, self.store.run_dir, results, outcome, error)

    def plan(self, selection: Selection | None = None) -> list[StageResult]:
        """What `run` would do and why, without running or writing anything."""
        selection = selection or Selection()
        chosen = select_stages(self.recipe, selection)
        forced = {sid for name in selection.force for sid in matching(self.recipe, name)}
        will_run: set[str] = set()
        results = []
        for stage in self.recipe.stages.values():
            record = self.store.read_record(stage.id)
            pending = [n for n in stage.needs if n in will_run]
            if stage.id not in chosen:
                reason = "not selected" + ("" if record else " (no previous result)")
                results.append(StageResult(stage.id, stage.uses, "skipped", reason))
                if record:
                    self._adopt(stage, record)
                continue
            note = None
            if pending:
                decision = Decision(True, f"upstream will run: {', '.join(pending)}")
                preview = preview_stage_config(stage, self.outputs, self.recipe.positions)
                if preview is not None:
                    note = stage.stage_class().describe(preview, self.store.cache_dir)
            else:
                config = resolve_stage_config(
                    stage, self._upstream_or_fail(stage), self.recipe.positions
                )
                note = stage.stage_class().describe(config, self.store.cache_dir)
                key = self._key(stage, config)
                decision = decide(stage, key, record, self.store, stage.id in forced)
                if not decision.run and record:
                    self._adopt(stage, record)
            if decision.run:
                will_run.add(stage.id)
            results.append(
                StageResult(
                    stage.id,
                    stage.uses,
                    "run" if decision.run else "cached",
                    decision.reason,
                    message=note,
                )
            )
        return results

    # -- one stage ---------------------------------------------------------------------------
    def _stage(self, stage: PlannedStage, selected: bool, forced: bool) -> StageResult:
        record = self.store.read_record(stage.id)
        if not selected:
            if record is not None:
                self._adopt(stage, record)
            self.events.emit("stage_skipped", stage.id, reason="not selected")
            return StageResult(stage.id, stage.uses, "skipped", "not selected")
        config = resolve_stage_config(stage, self._upstream_or_fail(stage), self.recipe.positions)
        key = self._key(stage, config)
        decision = decide(stage, key, record, self.store, forced)
        if not decision.run and record is not None:
            self._adopt(stage, record)
            self.events.emit("stage_skipped", stage.id, reason=decision.reason, cached=True)
            return StageResult(
                stage.id,
                stage.uses,
                "cached",
                decision.reason,
                key.key,
                record.outputs,
                record.outputs_digest,
                key.upstream,
            )
        return self._execute(stage, config, key, decision)

    def _execute(
        self, stage: PlannedStage, config: Any, key: CacheKey, decision: Decision
    ) -> StageResult:
        started = time.time()
        self.events.emit("stage_started", stage.id, uses=stage.uses, reason=decision.reason)
        folder, scratch = self.store.begin(stage.id, key.key)
        out_dir = folder / OUTPUT_DIR_NAME
        ctx = StageContext(
            stage_id=stage.id,
            output_dir=out_dir,
            scratch_dir=scratch,
            cache_dir=self.store.cache_dir,
            run_dir=self.store.run_dir,
            upstream={name: self.outputs[name] for name in stage.needs},
            log=lambda message: self.events.emit("log", stage.id, message=str(message)),
            progress_factory=self._progress_factory(stage.id),
            secrets=register_secret,
        )
        try:
            outputs = stage.stage_class().run(config, ctx)
            if not isinstance(outputs, stage.stage_class.Outputs):
                raise StageError(
                    f"stage '{stage.uses}' returned {type(outputs).__name__}, "
                    f"not {stage.stage_class.Outputs.__name__}"
                )
            final_out = self.store.output_dir(stage.id)
            relocated = _relocate(outputs.model_dump(mode="json"), str(out_dir), str(final_out))
            record = StageRecord(
                id=stage.id,
                uses=stage.uses,
                stage_version=stage.stage_class.version,
                cache_key=key.key,
                config=redact(key.config),
                upstream=key.upstream,
                outputs=relocated,
                outputs_digest=_outputs_digest(content_digest(out_dir), relocated, str(final_out)),
                outputs_fingerprint=stat_fingerprint([out_dir]),
                started_at=started,
                duration_s=time.time() - started,
            )
            self.store.commit(stage.id, folder, record)
        except BaseException as exc:
            self.store.discard(folder)
            kept = sum(f.stat().st_size for f in scratch.rglob("*") if f.is_file())
            if kept:
                self.events.emit(
                    "log",
                    stage.id,
                    message=f"kept {kept / 1e9:.2f} GB of finished work in {scratch}: the next "
                    f"run resumes from it (`gcupipe clean --stage {stage.id}` drops it)",
                )
            if isinstance(exc, KeyboardInterrupt | GcupipeError):
                raise
            raise StageError(f"stage '{stage.id}' crashed: {type(exc).__name__}: {exc}") from exc
        self._adopt(stage, record)
        self.events.emit(
            "stage_finished", stage.id, duration_s=record.duration_s, outputs=record.outputs
        )
        return StageResult(
            stage.id,
            stage.uses,
            "ran",
            decision.reason,
            key.key,
            record.outputs,
            record.outputs_digest,
            key.upstream,
            started,
            record.duration_s,
        )

    def _adopt(self, stage: PlannedStage, record: StageRecord) -> None:
        self.outputs[stage.id] = stage.stage_class.Outputs.model_validate(record.outputs)
        self.digests[stage.id] = record.outputs_digest

    def _upstream_or_fail(self, stage: PlannedStage) -> dict[str, StageOutputs]:
        missing = [name for name in stage.needs if name not in self.outputs]
        if missing:
            raise UsageError(
                f"stage '{stage.id}' needs {', '.join(repr(m) for m in missing)}, which "
                f"{'has' if len(missing) == 1 else 'have'} no result in {self.store.run_dir}; "
                "select it too (drop --only/--from) or run the whole recipe once"
            )
        return self.outputs

    def _key(self, stage: PlannedStage, config: Any) -> CacheKey:
        upstream = {name: self.digests[name] for name in stage.needs}
        return cache_key(stage, stage.stage_class(), config, upstream)

    def _progress_factory(self, stage_id: str):  # type: ignore[no-untyped-def]
        def factory(description: str, total: float | None, unit: str):  # type: ignore[no-untyped-def]
            state = {"total": total}

            def update(completed: float | None, new_total: float | None) -> None:
                if new_total is not None:
                    state["total"] = new_total
                self.events.emit(
                    "progress",
                    stage_id,
                    description=description,
                    completed=completed,
                    total=state["total"],
                    unit=unit,
                )

            task = ProgressTask(update)
            update(0.0, None)

            def finish() -> None:
                self.events.emit(
                    "progress",
                    stage_id,
                    description=description,
                    completed=task.completed,
                    total=state["total"],
                    unit=unit,
                    done=True,
                )

            return task, finish

        return factory


def _relocate(value: Any, old: str, new: str) -> Any:
    if isinstance(value, str) and (value == old or value.startswith(old + "/")):
        return new + value[len(old) :]
    if isinstance(value, dict):
        return {key: _relocate(item, old, new) for key, item in value.items()}
    if isinstance(value, list):
        return [_relocate(item, old, new) for item in value]
    return value


def _outputs_digest(files_digest: str, outputs: dict[str, Any], out_dir: str) -> str:
    """Digest of what downstream stages receive: the files plus the non-file output values."""
    portable = _relocate(outputs, out_dir, "<out>")
    return json_digest({"files": files_digest, "outputs": portable})


def run_recipe(
    recipe: Recipe, run_dir: Path, selection: Selection | None = None, events: Events | None = None
) -> RunResult:
    """Run a loaded recipe in `run_dir`; the Python API behind `gcupipe run`."""
    return Runner(recipe, run_dir, events).run(selection)


def default_run_dir(recipe: Recipe) -> Path:
    return Path("runs") / recipe.name


__all__ = [
    "RunResult",
    "Runner",
    "Selection",
    "StageResult",
    "default_run_dir",
    "run_recipe",
    "select_stages",
]
