"""The view of a run for people: one line per stage outcome; in a terminal, spinners and
progress bars meanwhile; in a CI log, plain progress lines at a bounded rate.

Lines are never wrapped by the view (a path or a command stays one line, whatever the width);
when stdout is not a terminal, progress is printed at most every `GCUPIPE_PROGRESS_EVERY_S`
seconds (default 10) per task, and a stage that has printed nothing for three such intervals
gets a `still running` line, so a CI log is never silent for minutes.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from gcupipe.engine.events import Event

PROGRESS_ENV = "GCUPIPE_PROGRESS_EVERY_S"
DEFAULT_PROGRESS_EVERY_S = 10.0


def progress_interval_s() -> float:
    try:
        return max(0.1, float(os.environ.get(PROGRESS_ENV, DEFAULT_PROGRESS_EVERY_S)))
    except ValueError:
        return DEFAULT_PROGRESS_EVERY_S


class RichView:
    """A sink that draws the run for people; in a non-terminal it degrades to plain lines."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console()
        self.plain = not self.console.is_terminal
        self.interval_s = progress_interval_s()
        self._last_line = time.time()
        self._printed: dict[tuple[str | None, str], float] = {}
        self._running: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self.tasks: dict[tuple[str | None, str], TaskID] = {}
        self.counts: dict[str, int] = {}
        self.started = time.time()

    def emit(self, event: Event) -> None:
        handler = getattr(self, f"_on_{event.kind}", None)
        if handler is not None:
            handler(event)

    def close(self) -> None:
        self._stop.set()
        self.progress.stop()

    def _print(self, text: str) -> None:
        with self._lock:
            self.progress.console.print(text, highlight=False, soft_wrap=True)
            self._last_line = time.time()

    def _beat(self) -> None:
        """In a CI log: a line for the running stages when nothing was printed for a while."""
        quiet_s = 3 * self.interval_s
        while not self._stop.wait(self.interval_s):
            now = time.time()
            if now - self._last_line >= quiet_s:
                for stage, since in list(self._running.items()):
                    self._print(f"  [dim]{escape(stage)}:[/] still running, {now - since:.0f} s")

    def _on_run_started(self, event: Event) -> None:
        self.started = event.time
        self._print(
            f"[bold]gcupipe[/] run [cyan]{escape(event.data['recipe'])}[/] "
            f"in {escape(event.data['run_dir'])}"
        )
        if self.plain:
            self._heartbeat = threading.Thread(target=self._beat, daemon=True)
            self._heartbeat.start()
        else:
            self.progress.start()

    def _on_stage_started(self, event: Event) -> None:
        self._print(
            f"[blue]▶[/] {escape(str(event.stage))} [dim]({event.data['uses']}: "
            f"{escape(event.data['reason'])})[/]"
        )
        self._running[str(event.stage)] = event.time
        self.tasks[(event.stage, "")] = self.progress.add_task(
            escape(str(event.stage)), total=None, detail=""
        )

    def _on_stage_running(self, event: Event) -> None:
        """Where a stage runs, when that is not this process (a worker, a Ray node)."""
        if event.data.get("pid") != os.getpid():
            node = str(event.data["node"])
            node = escape(f"node {node[:12]}" if len(node) == 56 else node)  # a Ray node id
            self._print(
                f"  [dim]{escape(str(event.stage))}:[/] running on {node} (pid {event.data['pid']})"
            )

    def _on_stage_retry(self, event: Event) -> None:
        self._print(f"[yellow]↻ {escape(str(event.stage))}[/] {escape(event.data['message'])}")

    def _on_progress(self, event: Event) -> None:
        key = (event.stage, str(event.data["description"]))
        total = event.data.get("total")
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(
                f"  {escape(str(event.data['description']))}",
                total=total,
                detail=event.data.get("unit", ""),
            )
        task = self.tasks[key]
        completed = event.data.get("completed") or 0
        self.progress.update(task, completed=completed, total=total)
        if self.plain:
            self._plain_progress(event, key, completed, total)
        if event.data.get("done"):
            self.progress.remove_task(self.tasks.pop(key))

    def _plain_progress(
        self, event: Event, key: tuple[str | None, str], completed: float, total: float | None
    ) -> None:
        """`quantize: quantize layers 12/30, 41 s`, at most once an interval per task."""
        done = bool(event.data.get("done"))
        recent = event.time - self._printed.get(key, 0.0) < self.interval_s
        if not done and (not completed or recent):
            return
        self._printed[key] = event.time
        unit = event.data.get("unit", "")
        count = f"{completed:g}/{total:g}" if total else f"{completed:g}"
        elapsed = event.time - self._running.get(str(event.stage), event.time)
        self._print(
            f"  [dim]{escape(str(event.stage))}:[/] {escape(str(event.data['description']))} "
            f"{count}{' ' + escape(str(unit)) if unit else ''}, {elapsed:.0f} s"
        )

    def _on_log(self, event: Event) -> None:
        self._print(f"  [dim]{escape(str(event.stage))}:[/] {escape(str(event.data['message']))}")

    def _finish_stage(self, stage: str | None) -> None:
        self._running.pop(str(stage), None)
        for key in [k for k in self.tasks if k[0] == stage]:
            self.progress.remove_task(self.tasks.pop(key))

    def _on_stage_finished(self, event: Event) -> None:
        self._finish_stage(event.stage)
        self.counts["ran"] = self.counts.get("ran", 0) + 1
        seconds = event.data["duration_s"]
        self._print(f"[green]✓[/] {escape(str(event.stage))} [dim]done in {seconds:.1f} s[/]")

    def _on_stage_skipped(self, event: Event) -> None:
        kind = "cached" if event.data.get("cached") else "skipped"
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self._print(f"[dim]○ {escape(str(event.stage))} {escape(event.data['reason'])}[/]")

    def _on_stage_failed(self, event: Event) -> None:
        self._finish_stage(event.stage)
        self.counts["failed"] = self.counts.get("failed", 0) + 1
        self._print(f"[red]✗ {escape(str(event.stage))} failed[/]")

    def _on_run_finished(self, event: Event) -> None:
        self._stop.set()
        self.progress.stop()
        elapsed = event.time - self.started
        summary = ", ".join(f"{count} {kind}" for kind, count in self.counts.items()) or "nothing"
        colour = "green" if event.data["outcome"] == "ok" else "red"
        self._print(
            f"[{colour}]{event.data['outcome']}[/]: {summary} in {elapsed:.1f} s; "
            f"record: {escape(event.data['lock_file'])}"
        )


def plan_lines(
    recipe_name: str, run_dir: str, results: list[Any], needs: dict[str, list[str]]
) -> list[str]:
    """`gcupipe plan` as lines (rich markup): per stage, what happens and why, then what it will
    do (the stage's describe(): the quantize settings, the gates, the exact serve command)."""
    colours = {"run": "yellow", "cached": "green"}
    lines = [f"[bold]{escape(recipe_name)}[/] in {escape(run_dir)}"]
    for result in results:
        upstream = needs.get(result.id) or []
        after = f", after {escape(', '.join(upstream))}" if upstream else ""
        colour = colours.get(result.outcome, "dim")
        lines.append(
            f"[{colour}]{result.outcome:>7}[/] [bold]{escape(result.id)}[/] "
            f"[dim]({escape(result.uses)}{after}): {escape(result.reason)}[/]"
        )
        if result.message:
            lines += [f"         {escape(line)}" for line in result.message.splitlines()]
    return lines
