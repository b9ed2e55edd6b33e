"""The rich live view of a run: one line per stage outcome, spinners and progress bars meanwhile."""

from __future__ import annotations

import time

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


class RichView:
    """A sink that draws the run for people; in a non-terminal it degrades to plain lines."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console()
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
        self.progress.stop()

    def _print(self, text: str) -> None:
        self.progress.console.print(text, highlight=False)

    def _on_run_started(self, event: Event) -> None:
        self.started = event.time
        self._print(
            f"[bold]gcupipe[/] run [cyan]{escape(event.data['recipe'])}[/] "
            f"in {escape(event.data['run_dir'])}"
        )
        if self.console.is_terminal:
            self.progress.start()

    def _on_stage_started(self, event: Event) -> None:
        self._print(
            f"[blue]▶[/] {escape(str(event.stage))} [dim]({event.data['uses']}: "
            f"{escape(event.data['reason'])})[/]"
        )
        self.tasks[(event.stage, "")] = self.progress.add_task(
            escape(str(event.stage)), total=None, detail=""
        )

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
        self.progress.update(task, completed=event.data.get("completed") or 0, total=total)
        if event.data.get("done"):
            self.progress.remove_task(self.tasks.pop(key))

    def _on_log(self, event: Event) -> None:
        self._print(f"  [dim]{escape(str(event.stage))}:[/] {escape(str(event.data['message']))}")

    def _finish_stage(self, stage: str | None) -> None:
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
        self.progress.stop()
        elapsed = event.time - self.started
        summary = ", ".join(f"{count} {kind}" for kind, count in self.counts.items()) or "nothing"
        colour = "green" if event.data["outcome"] == "ok" else "red"
        self._print(
            f"[{colour}]{event.data['outcome']}[/]: {summary} in {elapsed:.1f} s; "
            f"record: {escape(event.data['lock_file'])}"
        )
