"""The external plugin of examples/plugin installs with pip and runs inside a recipe."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def installed_plugin() -> Iterator[None]:
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-build-isolation", str(ROOT / "examples" / "plugin")],
        check=True,
    )
    try:
        yield
    finally:  # leave the venv as it was: the shipped schema covers the built-in stages only
        subprocess.run([*pip, "uninstall", "-y", "gcupipe-wordcount"], check=True)


def gcupipe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gcupipe", *args], capture_output=True, text=True, timeout=120
    )


def test_plugin_stage_runs_in_a_recipe(installed_plugin: None, tmp_path: Path) -> None:
    recipe = str(ROOT / "examples" / "plugin-recipe.yaml")
    listed = gcupipe("stages")
    assert "wordcount" in listed.stdout
    result = gcupipe("run", recipe, "--workdir", str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    finished = [json.loads(line) for line in result.stdout.splitlines()]
    count = next(e for e in finished if e["kind"] == "stage_finished" and e["stage"] == "count")
    assert count["data"]["outputs"]["words"] == 5
    gate = gcupipe(
        "run", recipe, "--workdir", str(tmp_path), "--set", "stages.count.with.max_words=3"
    )
    assert gate.returncode == 3
    assert "5 words > max_words 3" in gate.stderr
    typo = gcupipe("lint", recipe, "--set", "stages.count.with.max_wrods=3")
    assert typo.returncode == 2 and "did you mean 'max_words'" in typo.stderr
