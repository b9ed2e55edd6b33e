"""Cache keys and the decision to run or reuse a stage, with the reason said in words."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gcupipe.engine.digest import json_digest, stat_fingerprint
from gcupipe.engine.store import RunStore, StageRecord
from gcupipe.recipe.planned import PlannedStage
from gcupipe.stages.base import Stage, StageConfig

RUN_PLACEHOLDER = "<run>"
OUT_PLACEHOLDER = "<out>"  # a stage's own output directory, in records that leave the run


def relocate(value: Any, old: str, new: str) -> Any:
    """`value` with every mention of the path `old` in its strings moved to `new`: whole
    values (`<old>/model`) and paths inside text (a command's `cat <old>/n.txt`), never a
    longer name (`<old>2`)."""
    if isinstance(value, str):
        return re.sub(re.escape(old) + r"(?![\w.-])", lambda _: new, value)
    if isinstance(value, dict):
        return {key: relocate(item, old, new) for key, item in value.items()}
    if isinstance(value, list):
        return [relocate(item, old, new) for item in value]
    return value


def portable(value: Any, out_dir: Path, run_dir: Path) -> Any:
    """A stage's outputs without the paths of this run: `<out>/...`, `<run>/...`."""
    return relocate(relocate(value, str(out_dir), OUT_PLACEHOLDER), str(run_dir), RUN_PLACEHOLDER)


def localized(value: Any, out_dir: Path, run_dir: Path) -> Any:
    """The inverse of `portable`, for the stage directory `out_dir` of `run_dir`."""
    return relocate(relocate(value, OUT_PLACEHOLDER, str(out_dir)), RUN_PLACEHOLDER, str(run_dir))


@dataclass(frozen=True)
class CacheKey:
    key: str
    config: dict[str, Any]
    upstream: dict[str, str]
    inputs_fingerprint: str


def cache_key(
    stage: PlannedStage,
    instance: Stage,  # type: ignore[type-arg]
    config: StageConfig,
    upstream: dict[str, str],
    run_dir: Path,
) -> CacheKey:
    """stage type + plugin version + resolved config + upstream output digests + input stats.

    Nothing of the run directory's own path enters it: paths into the run (an upstream's
    outputs) read as `<run>/...` and their content counts through the upstream digests, so
    equal work in two run directories, or on two machines, has one key (the remote cache)."""
    config_json = relocate(config.model_dump(mode="json"), str(run_dir), RUN_PLACEHOLDER)
    outside = [
        path for path in instance.cache_inputs(config) if not path.resolve().is_relative_to(run_dir)
    ]
    inputs = stat_fingerprint(outside)
    key = json_digest(
        {
            "uses": stage.uses,
            "version": stage.stage_class.version,
            "config": config_json,
            "upstream": upstream,
            "inputs": inputs,
        }
    )
    return CacheKey(key, config_json, upstream, inputs)


@dataclass(frozen=True)
class Decision:
    run: bool
    reason: str


def decide(
    stage: PlannedStage, key: CacheKey, record: StageRecord | None, store: RunStore, forced: bool
) -> Decision:
    if forced:
        return Decision(True, "forced with --force")
    if not stage.cache:
        return Decision(True, "cache: false")
    if record is None:
        return Decision(True, "no previous result")
    if record.cache_key != key.key:
        return Decision(True, _why_changed(stage, key, record))
    if stat_fingerprint([store.output_dir(stage.id)]) != record.outputs_fingerprint:
        return Decision(True, "previous outputs were modified or removed")
    return Decision(False, "cached: nothing changed")


def _why_changed(stage: PlannedStage, key: CacheKey, record: StageRecord) -> str:
    if record.stage_version != stage.stage_class.version:
        return f"stage '{stage.uses}' version {record.stage_version} -> {stage.stage_class.version}"
    changes = _diff(record.config, key.config, "with")
    if changes:
        shown = "; ".join(changes[:3]) + (
            f" (+{len(changes) - 3} more)" if len(changes) > 3 else ""
        )
        return f"config changed: {shown}"
    changed_upstream = sorted(
        name
        for name in set(record.upstream) | set(key.upstream)
        if record.upstream.get(name) != key.upstream.get(name)
    )
    if changed_upstream:
        return f"upstream changed: {', '.join(changed_upstream)}"
    return "input files changed"


def _diff(old: Any, new: Any, path: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        changes = []
        for key in sorted(set(old) | set(new), key=str):
            changes.extend(_diff(old.get(key), new.get(key), f"{path}.{key}"))
        return changes
    if old != new:
        return [f"{path} {_short(old)} -> {_short(new)}"]
    return []


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
