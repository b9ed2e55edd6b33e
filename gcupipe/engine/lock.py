"""`gcupipe.lock.json`: one record per run of what ran, with which inputs, outputs and versions."""

from __future__ import annotations

import json
import platform
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gcupipe.engine.store import write_json_atomic
from gcupipe.secrets import redact
from gcupipe.versions import package_versions

if TYPE_CHECKING:
    from gcupipe.engine.results import StageResult
    from gcupipe.recipe.planned import Recipe

LOCK_NAME = "gcupipe.lock.json"


def write_lock(
    run_dir: Path,
    recipe: Recipe,
    results: list[StageResult],
    outcome: str,
    executor: str = "local",
) -> Path:
    path = run_dir / LOCK_NAME
    record: dict[str, Any] = {
        "lock_version": 1,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "outcome": outcome,
        "executor": executor,
        "recipe": {
            "name": recipe.name,
            "source": str(recipe.source) if recipe.source else None,
            "files": [composed.as_json() for composed in recipe.sources],
            "resolved": recipe.document,
            "stages": {
                stage.id: {
                    "uses": stage.uses,
                    "needs": stage.needs,
                    "with": stage.config,
                    "matrix": stage.matrix,
                }
                for stage in recipe.stages.values()
            },
        },
        "stages": [asdict(result) for result in results],
        "versions": package_versions(),
        "host": {
            "hostname": socket.gethostname(),
            "platform": platform.platform(),
            "machine": platform.machine(),
            "executable": sys.executable,
        },
    }
    write_json_atomic(path, redact(record))
    return path


def changed_files(run_dir: Path, recipe: Recipe) -> list[str]:
    """What `plan` says about the composed files against the last run's lock: each fragment
    whose content changed (or that is new), and the stages whose config it sets values of."""
    try:
        previous = json.loads((run_dir / LOCK_NAME).read_text())
        recorded = {entry["file"]: entry for entry in previous["recipe"]["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return []  # no earlier run, or one from before files were recorded
    lines = []
    for composed in recipe.sources:
        before = recorded.get(composed.name)
        if before is not None and before.get("sha256") == composed.sha256:
            continue
        touched = sorted(
            {
                str(path[1])
                for path, mark in recipe.positions.values.items()
                if len(path) > 2 and path[0] == "stages" and mark.source == composed.name
            }
        )
        what = "is new" if before is None else _change(before, composed.version, composed.sha256)
        sets = f"; it sets config of: {', '.join(touched)}" if touched else ""
        lines.append(f"{composed.name} {what} since the last run{sets}")
    current = {composed.name for composed in recipe.sources}
    lines += [f"{name} is no longer part of the recipe" for name in recorded if name not in current]
    return lines


def _change(before: dict[str, Any], version: str | None, sha256: str) -> str:
    if before.get("version") != version:
        return f"changed ({before.get('version')} -> {version})"
    return f"changed (sha256 {str(before.get('sha256'))[:12]} -> {sha256[:12]})"
