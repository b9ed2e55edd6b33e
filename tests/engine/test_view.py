"""What a CI log shows of a run: plain progress lines at a bounded rate, a heartbeat for quiet
stages, and no line broken by rich's 80-column wrapping."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from gcupipe.testing.tiny_models import tiny_model  # noqa: E402

RECIPE = """
version: 1
name: ci-log
stages:
  quantize:
    uses: quantize
    with:
      model: {model}
      method: gptq
      format: gcu
      calibration: {{text_file: {text}, samples: 8, seq_len: 64}}
  wait:
    uses: command
    with: {{run: "sleep 3"}}
"""


def test_piped_run_prints_progress_lines_and_never_wraps(tmp_path: Path) -> None:
    model = tiny_model("llama", tmp_path / "model", num_hidden_layers=8)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i % 97} and the {i} thing" for i in range(2000)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=model, text=text))
    # a run directory whose path alone is wider than the 80 columns rich assumes for a pipe
    workdir = tmp_path / ("a-run-directory-with-a-long-name-" * 4) / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["GCUPIPE_PROGRESS_EVERY_S"] = "0.4"
    result = subprocess.run(
        [sys.executable, "-m", "gcupipe", "run", str(recipe), "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    progress = [
        line
        for line in lines
        if re.fullmatch(r"  quantize: quantize layers \d+/8 layers, \d+ s", line)
    ]
    assert len(progress) >= 2, result.stdout
    assert progress[-1].startswith("  quantize: quantize layers 8/8 layers")
    assert any(re.fullmatch(r"  wait: still running, \d+ s", line) for line in lines), lines
    lock = str(workdir / "gcupipe.lock.json")
    assert len(lock) > 150
    assert any(line.startswith("ok: ") and line.endswith(f"record: {lock}") for line in lines)
    assert not any(line.strip() and lock.startswith(line.strip()) for line in lines)
