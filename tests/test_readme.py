"""The README cannot rot: its stage reference is generated, its commands and snippets run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gcupipe.cli import app
from gcupipe.stages.docs import stage_reference_markdown
from gcupipe.targets.support import support_markdown

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GENERATED = {"stage-reference": stage_reference_markdown, "targets": support_markdown}
"""README blocks between `<!-- NAME:start -->` and `<!-- NAME:end -->`, made from the code."""


def current_readme() -> str:
    """The README with every generated block regenerated from the code."""
    text = README.read_text()
    for name, make in GENERATED.items():
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{start}\n{make()}{end}{tail}"
    return text


def test_generated_blocks_are_current() -> None:
    expected = current_readme()
    if README.read_text() != expected:
        pytest.fail("README's stage reference or target table is stale: run `make schema`")


def write() -> None:
    README.write_text(current_readme())


def _shell_lines() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), re.S)
    return [
        line.split("#")[0].strip()
        for block in blocks
        for line in block.splitlines()
        if line.strip().startswith("gcupipe ")
    ]


@pytest.mark.parametrize(
    "line", [c for c in _shell_lines() if c.split()[1] in ("lint", "plan", "show")]
)
def test_readme_lint_plan_and_show_commands_work(line: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("CALIBRATION_TEXT", "calibration.txt")
    args = shlex.split(line)[1:]
    if args[0] == "lint":
        args = ["lint", *sorted(str(p) for p in (ROOT / "recipes").glob("*.yaml"))]
    elif args[0] == "plan":
        args += ["--workdir", str(tmp_path / "run")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output


def test_readme_python_api_snippet_runs(tmp_path: Path, monkeypatch) -> None:
    snippet = next(
        b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "run_recipe" in b
    )
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    exec(snippet.replace('"runs/x"', repr(str(tmp_path / "x"))), namespace)  # noqa: S102
