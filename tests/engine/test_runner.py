"""The engine on the four-stage example: caching, reruns, selection, atomic outputs, records."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from xml.etree import ElementTree

import pytest

from gcupipe.engine import Events, JsonLinesSink, JUnitSink, Selection, run_recipe
from gcupipe.engine.runner import Runner
from gcupipe.recipe import load_recipe

EXAMPLE = Path(__file__).parents[2] / "examples" / "four-stage.yaml"
STAGES = ["fetch", "shout", "measure", "report"]


def run(run_dir: Path, overrides: list[str] | None = None, **selection: object):
    return run_recipe(
        load_recipe(EXAMPLE, overrides or [], environ={}), run_dir, Selection(**selection)
    )  # type: ignore[arg-type]


def outcomes(result) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {stage.id: stage.outcome for stage in result.stages}


def test_second_run_executes_nothing(tmp_path: Path) -> None:
    first = run(tmp_path)
    assert first.outcome == "ok" and set(outcomes(first).values()) == {"ran"}
    report = Path(first.outputs("report")["stdout_file"]).read_text()
    assert report.strip() == "THE QUICK BROWN FOX! has 21 bytes"
    second = run(tmp_path)
    assert set(outcomes(second).values()) == {"cached"}
    assert all(stage.reason == "cached: nothing changed" for stage in second.stages)


def test_set_on_stage_two_reruns_two_to_four(tmp_path: Path) -> None:
    run(tmp_path)
    result = run(tmp_path, ["stages.shout.with.env.MARK=?"])
    assert outcomes(result) == {
        "fetch": "cached",
        "shout": "ran",
        "measure": "ran",
        "report": "ran",
    }
    assert result.stages[1].reason == "config changed: with.env.MARK '!' -> '?'"
    assert result.stages[2].reason == "upstream changed: shout"


def test_same_output_does_not_rerun_downstream(tmp_path: Path) -> None:
    run(tmp_path)
    # a different command that writes the same bytes: shout reruns, its digest is unchanged
    result = run(tmp_path, ["stages.shout.with.run=echo 'THE QUICK BROWN FOX!' > upper.txt"])
    assert outcomes(result) == {
        "fetch": "cached",
        "shout": "ran",
        "measure": "cached",
        "report": "cached",
    }


def test_modified_outputs_are_not_reused(tmp_path: Path) -> None:
    run(tmp_path)
    (tmp_path / "stages" / "measure" / "out" / "size.txt").write_text("999\n")
    result = run(tmp_path)
    assert result.stages[2].outcome == "ran"
    assert result.stages[2].reason == "previous outputs were modified or removed"


def test_selection_only_from_to_force(tmp_path: Path) -> None:
    run(tmp_path)
    assert outcomes(run(tmp_path, force=["measure"])) == {
        "fetch": "cached",
        "shout": "cached",
        "measure": "ran",
        "report": "cached",
    }
    assert outcomes(run(tmp_path, only=["shout"], force=["shout"])) == {
        "fetch": "skipped",
        "shout": "ran",
        "measure": "skipped",
        "report": "skipped",
    }
    assert outcomes(run(tmp_path, ["vars.text=hi"], to_stage="shout")) == {
        "fetch": "ran",
        "shout": "ran",
        "measure": "skipped",
        "report": "skipped",
    }
    assert outcomes(run(tmp_path, ["vars.text=hi"], from_stage="measure")) == {
        "fetch": "skipped",
        "shout": "skipped",
        "measure": "ran",
        "report": "ran",
    }


def test_only_without_cached_upstream_is_a_clear_error(tmp_path: Path) -> None:
    result = run(tmp_path, only=["measure"])
    assert result.outcome == "failed"
    assert "needs 'shout', which has no result" in str(result.error)


def test_failing_stage_leaves_no_output_and_exit_code(tmp_path: Path) -> None:
    result = run(tmp_path, ["stages.measure.with.run=echo half > size.txt; exit 3"])
    assert outcomes(result) == {
        "fetch": "ran",
        "shout": "ran",
        "measure": "failed",
        "report": "not-run",
    }
    assert result.error is not None and result.error.exit_code == 1
    assert "command exited with code 3" in str(result.error)
    assert not (tmp_path / "stages" / "measure").exists()
    assert not any((tmp_path / ".tmp").iterdir()) if (tmp_path / ".tmp").exists() else True


def test_cache_false_always_runs(tmp_path: Path) -> None:
    run(tmp_path)
    result = run(tmp_path, ["stages.report.cache=false"])
    assert outcomes(result)["report"] == "ran" and result.stages[3].reason == "cache: false"


def test_lock_file_records_the_run(tmp_path: Path) -> None:
    run(tmp_path)
    lock = json.loads((tmp_path / "gcupipe.lock.json").read_text())
    assert lock["outcome"] == "ok"
    assert [stage["id"] for stage in lock["stages"]] == STAGES
    first = lock["stages"][0]
    assert len(first["cache_key"]) == 64 and len(first["outputs_digest"]) == 64
    assert lock["stages"][1]["upstream"] == {"fetch": first["outputs_digest"]}
    assert lock["recipe"]["resolved"]["vars"] == {"text": "the quick brown fox"}
    for name in ("gcupipe", "python", "torch", "transformers", "vllm"):
        assert name in lock["versions"]
    assert lock["host"]["hostname"]


def test_json_lines_and_junit(tmp_path: Path) -> None:
    import io

    stream = io.StringIO()
    junit = tmp_path / "junit.xml"
    recipe = load_recipe(EXAMPLE, environ={})
    events = Events([JsonLinesSink(stream), JUnitSink(junit, recipe.name)])
    run_recipe(recipe, tmp_path / "run", events=events)
    events.close()
    events = Events([JUnitSink(junit, recipe.name)])
    run_recipe(
        load_recipe(EXAMPLE, ["stages.report.with.run=exit 1"], environ={}),
        tmp_path / "run",
        events=events,
    )
    events.close()
    kinds = [json.loads(line)["kind"] for line in stream.getvalue().splitlines()]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
    assert kinds.count("stage_finished") == 4
    suite = ElementTree.parse(junit).getroot()
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert list(cases) == STAGES
    assert cases["fetch"].find("skipped") is not None
    assert "command exited with code 1" in cases["report"].find("failure").get("message")
    assert suite.get("failures") == "1" and suite.get("skipped") == "3"


def test_plan_has_no_side_effects(tmp_path: Path) -> None:
    recipe = load_recipe(EXAMPLE, environ={})
    results = Runner(recipe, tmp_path / "run").plan()
    assert [(r.outcome, r.reason) for r in results] == [
        ("run", "no previous result"),
        ("run", "upstream will run: fetch"),
        ("run", "upstream will run: shout"),
        ("run", "upstream will run: measure, shout"),
    ]
    assert not (tmp_path / "run").exists()
    run_recipe(recipe, tmp_path / "run")
    changed = load_recipe(EXAMPLE, ["stages.measure.with.run=echo changed"], environ={})
    assert [r.outcome for r in Runner(changed, tmp_path / "run").plan()] == [
        "cached",
        "cached",
        "run",
        "run",
    ]


def test_sigkill_during_stage_two_leaves_nothing_half_written(tmp_path: Path) -> None:
    slow = "stages.shout.with.run=echo partial > upper.txt; sleep 60"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gcupipe",
            "run",
            str(EXAMPLE),
            "--workdir",
            str(tmp_path),
            "--set",
            slow,
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not list((tmp_path / ".tmp").glob("shout-*/out/upper.txt")):
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
        time.sleep(0.1)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert (tmp_path / "stages" / "fetch" / "stage.json").exists()
    assert not (tmp_path / "stages" / "shout").exists()

    result = run(tmp_path)
    assert outcomes(result) == {
        "fetch": "cached",
        "shout": "ran",
        "measure": "ran",
        "report": "ran",
    }
    assert not (tmp_path / ".tmp").exists() or not any((tmp_path / ".tmp").iterdir())


def test_second_concurrent_run_is_refused(tmp_path: Path) -> None:
    from gcupipe.engine.store import RunStore
    from gcupipe.errors import UsageError

    holder = RunStore(tmp_path)
    holder.open()
    try:
        with pytest.raises(UsageError, match="another gcupipe run is using"):
            run(tmp_path)
    finally:
        holder.close()


def test_with_wait_a_second_run_starts_once_the_first_lets_go(tmp_path: Path) -> None:
    import threading

    from gcupipe.engine.events import Events
    from gcupipe.engine.store import RunStore

    class Lines:
        def __init__(self) -> None:
            self.lines: list[str] = []

        def emit(self, event) -> None:  # type: ignore[no-untyped-def]
            if event.kind == "log":
                self.lines.append(event.data["message"])

        def close(self) -> None:
            pass

    holder = RunStore(tmp_path)
    holder.open()
    threading.Timer(1.0, holder.close).start()
    sink = Lines()
    recipe = load_recipe(EXAMPLE, [], environ={})
    result = run_recipe(recipe, tmp_path, Selection(), Events([sink]), wait_s=60)
    assert result.outcome == "ok"
    assert any(line.startswith("waiting up to 60 s for the gcupipe run") for line in sink.lines)


def test_two_gcupipe_processes_on_one_run_directory(tmp_path: Path) -> None:
    """Real processes: the second is refused with the lock message and exit code 2 while the
    first holds the directory, and never touches what the first writes."""
    import subprocess
    import sys

    from gcupipe.engine.store import RunStore

    holder = RunStore(tmp_path / "run")
    holder.open()
    try:
        command = [sys.executable, "-m", "gcupipe", "run", str(EXAMPLE)]
        command += ["--workdir", str(tmp_path / "run")]
        refused = subprocess.run(command + ["--wait", "1"], capture_output=True, text=True)
        assert refused.returncode == 2, refused.stderr
        assert "another gcupipe run is using" in refused.stderr
        assert "after waiting 1 s" in refused.stderr
        assert list((tmp_path / "run" / "stages").iterdir()) == []
    finally:
        holder.close()


def test_secrets_never_reach_records_or_events(tmp_path: Path) -> None:
    import io

    stream = io.StringIO()
    recipe = load_recipe(
        EXAMPLE,
        [
            "stages.report.with.env.AUTH=${env:HUB_TOKEN}",
            "stages.report.with.run=echo $AUTH; exit 1",
        ],
        environ={"HUB_TOKEN": "hf_supersecret123"},
    )
    junit = tmp_path / "reports" / "junit.xml"
    sinks = Events([JsonLinesSink(stream), JUnitSink(junit, recipe.name)])
    result = run_recipe(recipe, tmp_path / "run", events=sinks)
    sinks.close()
    assert result.outcome == "failed"
    assert "hf_supersecret123" in str(result.error)  # the stage itself saw the real value
    for text in (stream.getvalue(), (tmp_path / "run" / "gcupipe.lock.json").read_text()):
        assert "hf_supersecret123" not in text and "***" in text
    assert "***" in junit.read_text()
    for path in tmp_path.rglob("*"):  # the JUnit file, logs, records: the token is in none
        if path.is_file():
            assert b"hf_supersecret123" not in path.read_bytes(), path


def test_content_digest_counts_links_by_target(tmp_path: Path) -> None:
    from gcupipe.engine.digest import content_digest

    blob = tmp_path / "blob"
    blob.write_bytes(b"weights")
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").symlink_to(blob)
    first = content_digest(out)
    assert content_digest(out) == first
    blob.write_bytes(b"other weights")
    assert content_digest(out) != first
