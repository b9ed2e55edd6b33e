"""What a run or a plan reports per stage and in all (the lock file and the CLI read these)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gcupipe.errors import GcupipeError


@dataclass
class StageResult:
    id: str
    uses: str
    outcome: str  # ran | cached | skipped | failed | interrupted | not-run
    reason: str
    cache_key: str | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    outputs_digest: str | None = None
    upstream: dict[str, str] = field(default_factory=dict)
    started_at: float | None = None
    duration_s: float = 0.0
    message: str | None = None
    node: str | None = None  # where it ran: the host, or the Ray node id
    attempt: int = 1  # > 1 after its worker was lost and it was retried


@dataclass
class RunResult:
    recipe: str
    run_dir: Path
    stages: list[StageResult]
    outcome: str  # ok | failed | interrupted
    error: GcupipeError | None = None

    def outputs(self, stage_id: str) -> dict[str, Any]:
        return next(result.outputs for result in self.stages if result.id == stage_id)
