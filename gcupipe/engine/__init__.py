"""The engine: stage selection, content-addressed cache, atomic outputs, events, run records."""

from gcupipe.engine.events import Event, Events, JsonLinesSink, JUnitSink
from gcupipe.engine.results import RunResult, StageResult
from gcupipe.engine.runner import Runner, default_run_dir, run_recipe
from gcupipe.engine.selection import Selection

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
