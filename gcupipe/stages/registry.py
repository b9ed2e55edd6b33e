"""Finds stages through the `gcupipe.stages` entry-point group (built-ins register there too)."""

from __future__ import annotations

import difflib
from functools import cache
from importlib.metadata import EntryPoint, entry_points

from gcupipe.errors import UsageError
from gcupipe.stages.base import Stage

ENTRY_POINT_GROUP = "gcupipe.stages"


class StageLoadError(UsageError):
    """A registered stage plugin cannot be imported or is not a Stage subclass."""


@cache
def stage_entry_points() -> dict[str, EntryPoint]:
    """Registered stage names -> entry points, without importing any plugin."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def stage_names() -> list[str]:
    return sorted(stage_entry_points())


@cache
def load_stage(uses: str) -> type[Stage]:  # type: ignore[type-arg]
    """The Stage class registered as `uses`; UsageError (with a did-you-mean) if there is none."""
    entry_point = stage_entry_points().get(uses)
    if entry_point is None:
        raise UsageError(unknown_stage_message(uses))
    try:
        stage_class = entry_point.load()
    except Exception as exc:  # a broken third-party plugin must not look like a gcupipe crash
        raise StageLoadError(
            f"stage plugin '{uses}' ({entry_point.value}) failed to load: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not (isinstance(stage_class, type) and issubclass(stage_class, Stage)):
        raise StageLoadError(f"stage plugin '{uses}' ({entry_point.value}) is not a Stage class")
    return stage_class


def unknown_stage_message(uses: str) -> str:
    hint = did_you_mean(uses, stage_names())
    return f"unknown stage type '{uses}'{hint}; `gcupipe stages` lists the registered ones"


def did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
