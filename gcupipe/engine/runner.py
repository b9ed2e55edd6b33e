"""Runs a Recipe: stage selection, cache decisions, atomic outputs, events and the run record."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gcupipe.engine.cache import (
    CacheKey,
    Decision,
    cache_key,
    decide,
    localized,
    portable,
    relocate,
)
from gcupipe.engine.digest import content_digest, json_digest, stat_fingerprint
from gcupipe.engine.events import Events
from gcupipe.engine.executors import Executor, Finished, InlineExecutor, StageJob
from gcupipe.engine.lock import write_lock
from gcupipe.engine.remote_cache import Entry, RemoteCache
from gcupipe.engine.results import RunResult, StageResult
from gcupipe.engine.selection import Selection, matching, select_stages
from gcupipe.engine.store import OUTPUT_DIR_NAME, RunStore, StageRecord
from gcupipe.errors import (
    GcupipeError,
    Interrupted,
    StageError,
    UsageError,
    is_disk_full,
)
from gcupipe.estimate import disk_full_message
from gcupipe.recipe.planned import PlannedStage, Recipe
from gcupipe.recipe.resolve import preview_stage_config, resolve_stage_config
from gcupipe.secrets import redact
from gcupipe.stages.base import Provenance, StageOutputs
from gcupipe.stages.resources import Resources, describe_request


@dataclass
class _Attempt:
    """A stage submitted to the executor: what the driver needs to commit or retry it."""

    stage: PlannedStage
    config: Any
    key: CacheKey
    decision: Decision
    folder: Path
    scratch: Path
    number: int
    submitted_at: float


class Runner:
    """Runs a recipe's stages in dependency order; the executor decides where their bodies
    run (in this process, in local worker processes, on Ray), the runner keeps everything
    else: cache decisions, atomic outputs, retries, events and the lock file."""

    def __init__(
        self,
        recipe: Recipe,
        run_dir: Path,
        events: Events | None = None,
        executor: Executor | None = None,
        wait_s: float = 0.0,
    ):
        self.recipe = recipe
        self.wait_s = wait_s  # for another run holding the run directory
        self.store = RunStore(run_dir.resolve())
        self.events = events or Events()
        self.executor = executor or InlineExecutor()
        self.outputs: dict[str, StageOutputs] = {}
        self.digests: dict[str, str] = {}
        self.records: dict[str, StageRecord] = {}
        self._running: dict[str, _Attempt] = {}
        settings = recipe.remote_cache
        self.remote = (
            None
            if settings is None
            else RemoteCache(settings.url, settings.options, push=settings.push)
        )

    def run(self, selection: Selection | None = None) -> RunResult:
        selection = selection or Selection()
        chosen = select_stages(self.recipe, selection)
        forced = {sid for name in selection.force for sid in matching(self.recipe, name)}
        self.store.open(self.wait_s, lambda line: self.events.emit("log", "run", message=line))
        results: dict[str, StageResult] = {}
        error: GcupipeError | None = None
        outcome = "ok"
        self.events.emit(
            "run_started",
            recipe=self.recipe.name,
            run_dir=str(self.store.run_dir),
            stages=list(self.recipe.stages),
            executor=self.executor.name,
        )
        waiting = list(self.recipe.stages.values())
        try:
            while waiting or self._running:
                if error is not None:  # no new stage starts; the running ones finish
                    for stage in waiting:
                        results[stage.id] = StageResult(
                            stage.id, stage.uses, "not-run", "an earlier stage failed"
                        )
                    waiting.clear()
                for stage in self._ready(waiting, results):
                    if (
                        self.executor.slots is not None
                        and len(self._running) >= self.executor.slots
                    ):
                        break
                    waiting.remove(stage)
                    started = time.time()
                    try:
                        result = self._start(stage, stage.id in chosen, stage.id in forced)
                    except GcupipeError as exc:
                        error, outcome = exc, "failed"
                        results[stage.id] = self._failed(stage, exc, started)
                        break
                    if result is not None:
                        results[stage.id] = result
                if not self._running:
                    continue
                for finished in self.executor.wait(self.events.emit):
                    attempt = self._running.pop(finished.stage_id)
                    try:
                        result = self._finish(attempt, finished)
                    except GcupipeError as exc:
                        if error is None:
                            error, outcome = exc, "failed"
                        result = self._failed(
                            attempt.stage, exc, finished.started_at or attempt.submitted_at
                        )
                        result.node, result.attempt = finished.node, attempt.number
                    if result is not None:
                        results[attempt.stage.id] = result
        except KeyboardInterrupt:
            error, outcome = Interrupted("interrupted"), "interrupted"
            self.executor.close()
            for attempt in self._running.values():
                self._discard(attempt)
                results[attempt.stage.id] = self._failed(
                    attempt.stage, error, attempt.submitted_at, outcome="interrupted"
                )
            self._running.clear()
            for stage in waiting:
                results.setdefault(
                    stage.id, StageResult(stage.id, stage.uses, "not-run", "interrupted")
                )
        finally:
            self.executor.close()
            ordered = [results[sid] for sid in self.recipe.stages if sid in results]
            try:
                write_lock(self.store.run_dir, self.recipe, ordered, outcome, self.executor.name)
            except OSError as exc:  # the stage's own error, if any, is the one to report
                if not is_disk_full(exc):
                    raise
                if error is None:
                    message = disk_full_message(exc, self.store.run_dir)
                    error, outcome = StageError(f"the run's lock file: {message}"), "failed"
            finally:
                self.store.close()
            self.events.emit(
                "run_finished",
                outcome=outcome,
                lock_file=str(self.store.run_dir / "gcupipe.lock.json"),
            )
        return RunResult(self.recipe.name, self.store.run_dir, ordered, outcome, error)

    def _ready(
        self, waiting: list[PlannedStage], results: dict[str, StageResult]
    ) -> list[PlannedStage]:
        """Waiting stages whose upstream stages have all finished, in recipe order."""
        return [stage for stage in waiting if all(need in results for need in stage.needs)]

    def _failed(
        self, stage: PlannedStage, exc: GcupipeError, started: float, outcome: str = "failed"
    ) -> StageResult:
        self.events.emit(
            "stage_failed",
            stage.id,
            message=str(exc),
            error=type(exc).__name__,
            exit_code=exc.exit_code,
        )
        return StageResult(
            stage.id,
            stage.uses,
            outcome,
            outcome,
            started_at=started,
            duration_s=time.time() - started,
            message=None if outcome == "interrupted" else str(exc),
        )

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
            config: Any = None
            if pending:
                decision = Decision(True, f"upstream will run: {', '.join(pending)}")
                config = preview_stage_config(stage, self.outputs, self.recipe.positions)
                if config is not None:
                    note = stage.stage_class().describe(config, self.store.cache_dir)
            else:
                config = resolve_stage_config(
                    stage, self._upstream_or_fail(stage), self.recipe.positions
                )
                note = stage.stage_class().describe(config, self.store.cache_dir)
                key = self._key(stage, config)
                decision = decide(stage, key, record, self.store, stage.id in forced)
                if not decision.run and record:
                    self._adopt(stage, record)
                elif self.remote is not None and self._remote_usable(stage, stage.id in forced):
                    entry = self._remote_entry(stage.id, key.key)
                    if entry is not None:
                        decision = Decision(False, f"in the remote cache {self.remote.url}")
                        self._adopt(stage, self._local_record(stage, entry, ""))
            if decision.run:
                will_run.add(stage.id)
                asks = None if config is None else stage_resources(stage, config)
                if asks is not None and asks != Resources():
                    line = f"resources: {describe_request(asks.ray_request())}"
                    note = "\n".join(filter(None, [note, line]))
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
    def _start(self, stage: PlannedStage, selected: bool, forced: bool) -> StageResult | None:
        """The result of a stage that needs no run (skipped, cached), else None: submitted."""
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
            self._push(stage, record)
        elif self.remote is not None and self._remote_usable(stage, forced):
            record = self._restore(stage, key)
            if record is not None:
                decision = Decision(False, f"restored from the remote cache {self.remote.url}")
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
        self.events.emit("stage_started", stage.id, uses=stage.uses, reason=decision.reason)
        self._submit(stage, config, key, decision, 1)
        return None

    def _submit(
        self, stage: PlannedStage, config: Any, key: CacheKey, decision: Decision, number: int
    ) -> None:
        """One attempt: a fresh temp stage directory, and the stage body to the executor."""
        folder, scratch = self.store.begin(stage.id, key.key)
        attempt = _Attempt(stage, config, key, decision, folder, scratch, number, time.time())
        job = StageJob(
            stage_id=stage.id,
            stage_class=stage.stage_class,
            config=config,
            output_dir=folder / OUTPUT_DIR_NAME,
            scratch_dir=scratch,
            cache_dir=self.store.cache_dir,
            run_dir=self.store.run_dir,
            upstream={name: self.outputs[name] for name in stage.needs},
            lineage=self._lineage(stage),
            resources=stage_resources(stage, config),
            attempt=number,
        )
        try:
            self.executor.submit(job)
        except BaseException:
            self.store.discard(folder)
            raise
        self._running[stage.id] = attempt

    def _finish(self, attempt: _Attempt, finished: Finished) -> StageResult | None:
        """Commit a finished attempt; retry one whose worker was lost (None); raise the
        stage's error."""
        stage = attempt.stage
        if finished.outputs is None:
            self._discard(attempt)
            if finished.lost is not None:
                tries = stage.retries + 1
                if attempt.number < tries:
                    self.events.emit(
                        "stage_retry",
                        stage.id,
                        message=f"attempt {attempt.number} of {tries} failed: {finished.lost}; "
                        "running it again",
                        node=finished.node,
                        attempt=attempt.number + 1,
                    )
                    self._submit(
                        stage, attempt.config, attempt.key, attempt.decision, attempt.number + 1
                    )
                    return None
                raise StageError(
                    f"stage '{stage.id}' failed: {finished.lost} (attempt {attempt.number} of "
                    f"{tries}; `retries:` sets how many more)"
                )
            exc = finished.error
            if isinstance(exc, GcupipeError):
                raise exc
            if is_disk_full(exc):
                needed = self._disk_needed(stage, attempt.config)
                message = disk_full_message(exc, self.store.run_dir, needed)
                raise StageError(f"stage '{stage.id}': {message}") from exc
            raise StageError(f"stage '{stage.id}' crashed: {type(exc).__name__}: {exc}") from exc
        started = finished.started_at or attempt.submitted_at
        out_dir = attempt.folder / OUTPUT_DIR_NAME
        final_out = self.store.output_dir(stage.id)
        relocated = relocate(finished.outputs.model_dump(mode="json"), str(out_dir), str(final_out))
        record = StageRecord(
            id=stage.id,
            uses=stage.uses,
            stage_version=stage.stage_class.version,
            cache_key=attempt.key.key,
            config=redact(attempt.key.config),
            upstream=attempt.key.upstream,
            outputs=relocated,
            outputs_digest=self._outputs_digest(
                content_digest(out_dir, stage.stage_class.reports), relocated, stage.id
            ),
            outputs_fingerprint=stat_fingerprint([out_dir]),
            started_at=started,
            duration_s=time.time() - started,
        )
        self.store.commit(stage.id, attempt.folder, record)
        self._adopt(stage, record)
        self._push(stage, record)
        self.events.emit(
            "stage_finished", stage.id, duration_s=record.duration_s, outputs=record.outputs
        )
        return StageResult(
            stage.id,
            stage.uses,
            "ran",
            attempt.decision.reason,
            attempt.key.key,
            record.outputs,
            record.outputs_digest,
            attempt.key.upstream,
            started,
            record.duration_s,
            node=finished.node,
            attempt=attempt.number,
        )

    def _discard(self, attempt: _Attempt) -> None:
        """Drop an attempt's temp directory; say what it kept in its scratch for a resume."""
        self.store.discard(attempt.folder)
        kept = sum(f.stat().st_size for f in attempt.scratch.rglob("*") if f.is_file())
        if kept:
            self.events.emit(
                "log",
                attempt.stage.id,
                message=f"kept {kept / 1e9:.2f} GB of finished work in {attempt.scratch}: the "
                f"next run resumes from it (`gcupipe clean --stage {attempt.stage.id}` drops it)",
            )

    # -- the remote cache --------------------------------------------------------------------
    def _remote_usable(self, stage: PlannedStage, forced: bool) -> bool:
        """Whether a stage that must run may come from the remote cache instead: not when the
        recipe (`cache: false`) or --force says run it."""
        return stage.cache and not forced

    def _say(self, stage_id: str) -> Callable[[str], None]:
        def say(message: str) -> None:
            self.events.emit("log", stage_id, message=f"remote cache: {message}")

        return say

    def _remote_entry(self, stage_id: str, key: str) -> Entry | None:
        assert self.remote is not None
        try:
            return self.remote.entry(key)
        except Exception as exc:  # noqa: BLE001 - whatever the fsspec backend raises
            self._say(stage_id)(f"not reachable ({type(exc).__name__}: {exc})")
            return None

    def _local_record(self, stage: PlannedStage, entry: Entry, fingerprint: str) -> StageRecord:
        """The record of a remote entry as a result of this run directory."""
        local_out = self.store.output_dir(stage.id)
        return StageRecord.model_validate(
            {
                **entry.record,
                "outputs": localized(entry.record["outputs"], local_out, self.store.run_dir),
                "outputs_fingerprint": fingerprint,
            }
        )

    def _restore(self, stage: PlannedStage, key: CacheKey) -> StageRecord | None:
        """Unpack the remote entry of `key` as this stage's result; None: run the stage."""
        assert self.remote is not None
        say = self._say(stage.id)
        folder = self.store.new_folder(stage.id)
        out_dir = folder / OUTPUT_DIR_NAME
        try:
            entry = self.remote.fetch(key.key, out_dir, say)
            record = None
            if entry is not None:
                record = self._local_record(stage, entry, stat_fingerprint([out_dir]))
                if record.cache_key != key.key:
                    raise ValueError(f"the entry holds cache key {record.cache_key[:12]}")
        except Exception as exc:  # noqa: BLE001 - storage errors, a malformed entry
            say(f"not restored ({type(exc).__name__}: {exc}); running the stage")
            record = None
        if record is None:
            self.store.discard(folder)
            return None
        self.store.commit(stage.id, folder, record)
        return record

    def _push(self, stage: PlannedStage, record: StageRecord) -> None:
        """Upload a finished or locally cached stage the remote cache lacks; a failure is said,
        and the run goes on (the result here is complete either way)."""
        if self.remote is None or not self.remote.push_enabled or not stage.cache:
            return
        local_out = self.store.output_dir(stage.id)
        entry = record.model_dump(mode="json", exclude={"outputs_fingerprint"})
        entry["outputs"] = portable(record.outputs, local_out, self.store.run_dir)
        try:
            self.remote.push(record.cache_key, entry, local_out, self._say(stage.id))
        except Exception as exc:  # noqa: BLE001 - whatever the fsspec backend raises
            self._say(stage.id)(f"push failed ({type(exc).__name__}: {exc})")

    def _outputs_digest(self, files_digest: str, outputs: dict[str, Any], stage_id: str) -> str:
        """Digest of what downstream stages receive: the files plus the non-file output
        values, the same in every run directory."""
        values = portable(outputs, self.store.output_dir(stage_id), self.store.run_dir)
        return json_digest({"files": files_digest, "outputs": values})

    def _adopt(self, stage: PlannedStage, record: StageRecord) -> None:
        self.outputs[stage.id] = stage.stage_class.Outputs.model_validate(record.outputs)
        self.digests[stage.id] = record.outputs_digest
        self.records[stage.id] = record

    def _lineage(self, stage: PlannedStage) -> list[Provenance]:
        """The records of every stage `stage` depends on, directly or further up."""
        above: set[str] = set()
        pending = list(stage.needs)
        while pending:
            name = pending.pop()
            if name not in above:
                above.add(name)
                pending.extend(self.recipe.stages[name].needs)
        return [
            Provenance(
                sid,
                record.uses,
                record.config,
                record.outputs,
                record.cache_key,
                record.outputs_digest,
            )
            for sid in self.recipe.stages
            if sid in above and (record := self.records.get(sid)) is not None
        ]

    def _upstream_or_fail(self, stage: PlannedStage) -> dict[str, StageOutputs]:
        missing = [name for name in stage.needs if name not in self.outputs]
        if missing:
            raise UsageError(
                f"stage '{stage.id}' needs {', '.join(repr(m) for m in missing)}, which "
                f"{'has' if len(missing) == 1 else 'have'} no result in {self.store.run_dir}; "
                "select it too (drop --only/--from) or run the whole recipe once"
            )
        return self.outputs

    def _disk_needed(self, stage: PlannedStage, config: Any) -> int | None:
        """What the stage writes by its own estimate (for the disk-full message), or None."""
        from gcupipe.estimate import Machine, ModelShape

        model_dirs = [getattr(self.outputs.get(n), "model_dir", None) for n in stage.needs]
        try:
            upstream = next((ModelShape.read(Path(d)) for d in model_dirs if d), None)
            estimate = stage.stage_class().estimate(config, upstream, Machine.nominal())
        except Exception:  # noqa: BLE001 - an estimate is a courtesy here, never a new failure
            return None
        return estimate.disk_bytes if estimate is not None else None

    def _key(self, stage: PlannedStage, config: Any) -> CacheKey:
        upstream = {name: self.digests[name] for name in stage.needs}
        return cache_key(stage, stage.stage_class(), config, upstream, self.store.run_dir)


def stage_resources(stage: PlannedStage, config: Any) -> Resources:
    """What one run of the stage asks for: its type's defaults, the recipe's keys over them."""
    return stage.stage_class().resources(config).merged(stage.resources)


def run_recipe(
    recipe: Recipe,
    run_dir: Path,
    selection: Selection | None = None,
    events: Events | None = None,
    executor: Executor | None = None,
    wait_s: float = 0.0,
) -> RunResult:
    """Run a loaded recipe in `run_dir`; the Python API behind `gcupipe run`. `wait_s`: how long
    to wait for another run holding `run_dir` before refusing."""
    return Runner(recipe, run_dir, events, executor, wait_s).run(selection)


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
