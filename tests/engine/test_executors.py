"""Stages on local worker processes (`--jobs N`): concurrency, a killed worker retried, errors."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from gcupipe.engine import Events
from gcupipe.engine.events import Event
from gcupipe.engine.executors import Executor, ProcessExecutor
from gcupipe.engine.results import RunResult, StageResult
from gcupipe.engine.runner import Runner
from gcupipe.errors import RecipeError
from gcupipe.recipe import load_recipe
from gcupipe.stages.resources import Resources
from gcupipe.stages.serve import ServeConfig, ServeStage

MATRIX = """\
version: 1
name: fan-out
stages:
  work:
    uses: command
    matrix:
      n: [1, 2]
    with:
      run: "echo started >> {log}; sleep {sleep}; echo ${{matrix.n}} > n.txt"
  gather:
    uses: command
    needs: [work]
    with:
      run: "cat ${{stages.work.outputs.output_dir}}/n.txt > gathered.txt"
"""


def write_recipe(folder: Path, text: str = MATRIX, **values: object) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(text.format(log=folder / "attempts.log", **values))
    return path


class Recorder:
    """An event sink that keeps every event and can act on one (kill a worker)."""

    def __init__(self, on_event=None):  # type: ignore[no-untyped-def]
        self.events: list[Event] = []
        self.on_event = on_event

    def emit(self, event: Event) -> None:
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)

    def close(self) -> None:
        pass


def run(recipe: Path, run_dir: Path, executor: Executor, sink: Recorder | None = None) -> RunResult:
    events = Events([sink] if sink else [])
    return Runner(load_recipe(recipe, [], environ={}), run_dir, events, executor).run()


def overlap(a: StageResult, b: StageResult) -> bool:
    assert a.started_at is not None and b.started_at is not None
    return a.started_at < b.started_at + b.duration_s and b.started_at < a.started_at + a.duration_s


def test_jobs_run_the_combinations_of_a_matrix_at_once(tmp_path: Path) -> None:
    result = run(write_recipe(tmp_path, sleep=2), tmp_path / "run", ProcessExecutor(2))
    assert result.outcome == "ok", result.error
    stages = {stage.id: stage for stage in result.stages}
    assert [stage.outcome for stage in result.stages] == ["ran"] * 4
    assert overlap(stages["work[n=1]"], stages["work[n=2]"])
    for n in (1, 2):  # each gather ran after its own combination, with its output
        gathered = Path(stages[f"gather[n={n}]"].outputs["output_dir"]) / "gathered.txt"
        assert gathered.read_text().strip() == str(n)
        assert stages[f"gather[n={n}]"].started_at >= stages[f"work[n={n}]"].started_at  # type: ignore[operator]
    lock = json.loads((tmp_path / "run" / "gcupipe.lock.json").read_text())
    assert {stage["node"] for stage in lock["stages"]} == {os.uname().nodename}
    assert all(stage["attempt"] == 1 for stage in lock["stages"])


def test_a_killed_worker_is_retried_and_leaves_no_half_output(tmp_path: Path) -> None:
    killed: list[int] = []

    def kill_first_worker(event: Event) -> None:
        if event.kind == "stage_running" and event.stage == "work[n=1]" and not killed:
            killed.append(event.data["pid"])
            os.kill(event.data["pid"], signal.SIGKILL)

    sink = Recorder(kill_first_worker)
    result = run(write_recipe(tmp_path, sleep=1), tmp_path / "run", ProcessExecutor(2), sink)
    assert result.outcome == "ok", result.error
    assert killed
    stages = {stage.id: stage for stage in result.stages}
    assert stages["work[n=1]"].attempt == 2 and stages["work[n=2]"].attempt == 1
    retries = [e for e in sink.events if e.kind == "stage_retry"]
    assert len(retries) == 1 and "exited with code -9" in retries[0].data["message"]
    assert (Path(stages["work[n=1]"].outputs["output_dir"]) / "n.txt").read_text() == "1\n"
    assert not list((tmp_path / "run" / ".tmp").glob("*"))  # the killed attempt's dir is gone


def test_a_worker_lost_more_often_than_retries_allows_fails_the_stage(tmp_path: Path) -> None:
    def kill_every_worker(event: Event) -> None:
        if event.kind == "stage_running" and event.stage == "work[n=1]":
            os.kill(event.data["pid"], signal.SIGKILL)

    recipe = write_recipe(tmp_path, sleep=1)
    text = recipe.read_text().replace(
        "    uses: command\n    matrix:", "    uses: command\n    retries: 2\n    matrix:"
    )
    recipe.write_text(text)
    sink = Recorder(kill_every_worker)
    result = run(recipe, tmp_path / "run", ProcessExecutor(2), sink)
    assert result.outcome == "failed"
    assert "attempt 3 of 3" in str(result.error) and "exited with code -9" in str(result.error)
    outcomes = {stage.id: stage.outcome for stage in result.stages}
    assert outcomes["work[n=1]"] == "failed" and outcomes["work[n=2]"] == "ran"
    assert outcomes["gather[n=1]"] == "not-run"


def test_a_stage_error_in_a_worker_is_the_run_error_and_not_retried(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, sleep=0)
    recipe.write_text(recipe.read_text().replace("sleep 0;", "test ${matrix.n} = 2 &&"))
    result = run(recipe, tmp_path / "run", ProcessExecutor(2))
    assert result.outcome == "failed"
    assert str(result.error).startswith("command exited with code 1")
    assert (tmp_path / "attempts.log").read_text().count("started") == 2  # no retry


def test_resources_come_from_the_stage_type_and_the_recipe_replaces_them_key_by_key(tmp_path):
    serve = ServeStage()
    assert serve.resources(ServeConfig(target="gcu", tensor_parallel_size=2)).ray_request() == {
        "CPU": 1,
        "GCU": 2,
    }
    assert serve.resources(ServeConfig(target="cuda", tensor_parallel_size=4)).ray_options() == {
        "num_cpus": 1,
        "num_gpus": 4,
    }
    assert serve.resources(ServeConfig(target="cpu")).ray_request() == {"CPU": 1}
    recipe = write_recipe(tmp_path, MATRIX, sleep=0)
    recipe.write_text(
        recipe.read_text().replace(
            "    uses: command\n    matrix:",
            "    uses: command\n    resources: {memory_gb: 2, GCU: 1}\n    matrix:",
        )
    )
    stage = load_recipe(recipe, [], environ={}).stages["work[n=1]"]
    merged = Resources(cpus=4).merged(stage.resources)
    assert merged.ray_request() == {"CPU": 4, "memory": 2 * 2**30, "GCU": 1}


def test_a_bad_resource_amount_is_a_recipe_error_at_its_line(tmp_path):
    recipe = write_recipe(tmp_path, MATRIX, sleep=0)
    recipe.write_text(
        recipe.read_text().replace(
            "    uses: command\n    matrix:",
            "    uses: command\n    resources: {GCU: many}\n    matrix:",
        )
    )
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe, [], environ={})
    message = str(caught.value)
    assert "recipe.yaml:6:" in message and "custom resource 'GCU' needs a number" in message


def test_plan_shows_what_a_stage_will_ask_for(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, MATRIX, sleep=0)
    recipe.write_text(
        recipe.read_text().replace(
            "    uses: command\n    matrix:",
            "    uses: command\n    resources: {GCU: 1}\n    matrix:",
        )
    )
    planned = Runner(load_recipe(recipe, [], environ={}), tmp_path / "run").plan()
    notes = {stage.id: stage.message or "" for stage in planned}
    assert notes["work[n=1]"].splitlines()[-1] == "resources: CPU=1, GCU=1"
    assert "resources" not in notes["gather[n=1]"]  # the default (one CPU) is not news
