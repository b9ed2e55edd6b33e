"""`gcupipe.lock.json`: one record per run of what ran, with which inputs, outputs and versions."""

from __future__ import annotations

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
