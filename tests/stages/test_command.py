"""`uses: command`: the command's `python` is gcupipe's own interpreter, whatever PATH says."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gcupipe.errors import StageError
from gcupipe.stages.base import StageContext
from gcupipe.stages.command import CommandConfig, CommandStage


def context(tmp_path: Path) -> StageContext:
    out = tmp_path / "out"
    out.mkdir()
    return StageContext("cmd", out, tmp_path, tmp_path, tmp_path, log=lambda message: None)


def test_python_is_gcupipes_interpreter(tmp_path: Path) -> None:
    config = CommandConfig(
        run='python -c "import sys; print(sys.executable)"', env={"PATH": "/usr/bin:/bin"}
    )
    outputs = CommandStage().run(config, context(tmp_path))
    printed = outputs.stdout_file.read_text().strip()
    assert Path(printed).parent == Path(sys.executable).parent


def test_a_failing_command_names_its_exit_code_and_output(tmp_path: Path) -> None:
    with pytest.raises(StageError, match=r"exited with code 4: oops"):
        CommandStage().run(CommandConfig(run="echo oops; exit 4"), context(tmp_path))
