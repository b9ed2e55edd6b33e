"""Cache keys and the decision to run or reuse a stage, with the reason said in words."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gcupipe.engine.digest import json_digest, stat_fingerprint
from gcupipe.engine.store import RunStore, StageRecord
from gcupipe.recipe.planned import PlannedStage
from gcupipe.stages.base import Stage, StageConfig


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
) -> CacheKey:
    """stage type + plugin version + resolved config + upstream output digests + input stats."""
    config_json = config.model_dump(mode="json")
    inputs = stat_fingerprint(instance.cache_inputs(config))
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
