"""The engine: stage selection, content-addressed cache, atomic outputs, events, run records."""

from gcupipe.engine.events import Event, Events, JsonLinesSink, JUnitSink
from gcupipe.engine.runner import (
    Runner,
    RunResult,
    Selection,
    StageResult,
    default_run_dir,
    run_recipe,
)

__all__ = [
    "Event",
    "Events",
    "JUnitSink",
    "JsonLinesSink",
    "RunResult",
    "Runner",
    "Selection",
    "StageResult",
    "default_run_dir",
    "run_recipe",
]
