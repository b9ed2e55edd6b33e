"""Run events and their sinks: JSON lines and JUnit XML (the rich view is in view.py)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO
from xml.etree import ElementTree

from gcupipe.secrets import redact


@dataclass
class Event:
    """kind: run_started, stage_started, stage_skipped, stage_finished, stage_failed,
    progress, log, run_finished."""

    kind: str
    stage: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)


class Sink(Protocol):
    def emit(self, event: Event) -> None: ...

    def close(self) -> None: ...


class Events:
    """Fans events out to every sink, with secrets redacted once here."""

    def __init__(self, sinks: list[Sink] | None = None):
        self.sinks = list(sinks or [])

    def emit(self, kind: str, stage: str | None = None, **data: Any) -> None:
        event = Event(kind, stage, redact(data))
        for sink in self.sinks:
            sink.emit(event)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class JsonLinesSink:
    """One JSON object per event (progress throttled to two a second per task)."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self._last_progress: dict[tuple[str | None, str], float] = {}

    def emit(self, event: Event) -> None:
        if event.kind == "progress" and not event.data.get("done"):
            key = (event.stage, str(event.data.get("description")))
            if event.time - self._last_progress.get(key, 0.0) < 0.5:
                return
            self._last_progress[key] = event.time
        self.stream.write(json.dumps(asdict(event), default=str) + "\n")
        self.stream.flush()

    def close(self) -> None:
        pass


class JUnitSink:
    """A JUnit XML file with one testcase per stage: cached = skipped, failed = failure."""

    def __init__(self, path: Path, suite_name: str):
        self.path = path
        self.suite_name = suite_name
        self.cases: dict[str, dict[str, Any]] = {}
        self._started: dict[str, float] = {}

    def emit(self, event: Event) -> None:
        if event.stage is None:
            return
        if event.kind == "stage_started":
            self._started[event.stage] = event.time
        elif event.kind in ("stage_skipped", "stage_finished", "stage_failed"):
            elapsed = event.time - self._started.get(event.stage, event.time)
            self.cases[event.stage] = {"kind": event.kind, "time": elapsed, **event.data}

    def close(self) -> None:
        failures = sum(1 for case in self.cases.values() if case["kind"] == "stage_failed")
        skipped = sum(1 for case in self.cases.values() if case["kind"] == "stage_skipped")
        suite = ElementTree.Element(
            "testsuite",
            name=self.suite_name,
            tests=str(len(self.cases)),
            failures=str(failures),
            skipped=str(skipped),
            errors="0",
        )
        for stage_id, case in self.cases.items():
            element = ElementTree.SubElement(
                suite,
                "testcase",
                classname=self.suite_name,
                name=stage_id,
                time=f"{case['time']:.3f}",
            )
            if case["kind"] == "stage_skipped":
                ElementTree.SubElement(element, "skipped", message=str(case.get("reason", "")))
            elif case["kind"] == "stage_failed":
                failure = ElementTree.SubElement(
                    element,
                    "failure",
                    message=str(case.get("message", "")),
                    type=str(case.get("error", "StageError")),
                )
                failure.text = str(case.get("message", ""))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        ElementTree.ElementTree(suite).write(self.path, encoding="utf-8", xml_declaration=True)
