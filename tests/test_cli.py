"""The command line: exit codes, messages, no heavy imports on the fast paths, a current schema."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from gcupipe.cli import app
from gcupipe.recipe.schema import recipe_schema

ROOT = Path(__file__).parents[1]
EXAMPLE = ROOT / "examples" / "four-stage.yaml"
runner = CliRunner()


def gcupipe(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gcupipe", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def test_run_plan_and_exit_codes(tmp_path: Path) -> None:
    ok = gcupipe("run", str(EXAMPLE), "--workdir", str(tmp_path))
    assert ok.returncode == 0, ok.stderr
    assert "4 ran" in ok.stdout
    plan = gcupipe("plan", str(EXAMPLE), "--workdir", str(tmp_path))
    assert plan.returncode == 0 and plan.stdout.count("cached") >= 4
    failed = gcupipe(
        "run", str(EXAMPLE), "--workdir", str(tmp_path), "--set", "stages.report.with.run=exit 4"
    )
    assert failed.returncode == 1
    assert "error: command exited with code 4" in failed.stderr
    assert "Traceback" not in failed.stderr + failed.stdout


def test_recipe_errors_exit_2_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nname: x\nstages:\n  a: {uses: command, with: {rnu: x}}\n")
    for command in ("run", "plan", "lint"):
        result = gcupipe(command, "bad.yaml", cwd=tmp_path)
        assert result.returncode == 2, (command, result.stderr)
        assert "bad.yaml:4:29: stages.a.with.rnu: unknown key 'rnu'" in result.stderr
        assert "Traceback" not in result.stderr
    missing = gcupipe("run", "nope.yaml", cwd=tmp_path)
    assert missing.returncode == 2 and "file not found: nope.yaml" in missing.stderr
    usage = gcupipe("run", str(EXAMPLE), "--only", "nosuch", "--workdir", str(tmp_path))
    assert usage.returncode == 2 and "no stage 'nosuch'" in usage.stderr


def test_lint_many_recipes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nname: x\nstages: {a: {uses: nope}}\n")
    result = runner.invoke(app, ["lint", str(EXAMPLE), str(bad)])
    assert result.exit_code == 2
    assert f"ok {EXAMPLE}" in result.stdout


def test_json_stream_and_junit_file(tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    result = gcupipe(
        "run", str(EXAMPLE), "--workdir", str(tmp_path / "run"), "--json", "--junit", str(junit)
    )
    assert result.returncode == 0
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[-1]["kind"] == "run_finished" and events[-1]["data"]["outcome"] == "ok"
    assert junit.read_text().count("<testcase") == 4


def test_interrupt_exits_130_and_keeps_nothing_half_written(tmp_path: Path) -> None:
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
            "stages.shout.with.run=echo part > upper.txt; sleep 60",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as from a terminal: a suite started in the background inherits SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while not list((tmp_path / ".tmp").glob("shout-*/out/upper.txt")):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    os.kill(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert not (tmp_path / "stages" / "shout").exists()
    lock = json.loads((tmp_path / "gcupipe.lock.json").read_text())
    assert lock["outcome"] == "interrupted"


def test_fast_commands_do_not_import_heavy_packages(tmp_path: Path) -> None:
    script = f"""
import json, sys
from typer.testing import CliRunner
from gcupipe.cli import app
runner = CliRunner()
for args in (["--help"], ["lint", {str(EXAMPLE)!r}], ["plan", {str(EXAMPLE)!r}, "--workdir",
             {str(tmp_path)!r}], ["stages"]):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (args, result.output)
heavy = ("torch", "transformers", "vllm", "modelscope", "huggingface_hub", "safetensors")
print(json.dumps(sorted(name for name in heavy if name in sys.modules)))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_shipped_schema_is_current() -> None:
    shipped = json.loads((ROOT / "gcupipe.schema.json").read_text())
    assert shipped == recipe_schema(), "stale: run `make schema`"


def test_schema_command_and_stage_docs() -> None:
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert "Stage_command" in schema["$defs"]
    details = runner.invoke(app, ["stages", "command"])
    assert details.exit_code == 0 and "timeout_s" in details.stdout


def test_lint_states_the_target_and_the_serve_flags_of_every_shipped_recipe() -> None:
    recipes = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
    result = runner.invoke(app, ["lint", *map(str, recipes)])
    assert result.exit_code == 0, result.stdout
    lines = result.stdout.splitlines()
    for recipe in recipes:
        at = lines.index(next(line for line in lines if line.startswith(f"ok {recipe}")))
        assert " serve with " in lines[at + 1] and lines[at + 1].startswith("  quantize"), recipe
    assert "  quantize: for gcu (vLLM-GCU): serve with --quantization gcu" in lines
    assert (
        "  quantize: for gcu (vLLM-GCU): serve with --quantization w8a8 --kv-cache-dtype int8"
        in lines
    )
    assert "  quantize: for cpu (vLLM on CPU): serve with --quantization gcu" in lines
