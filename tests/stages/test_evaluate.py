"""`uses: evaluate` on the real SmolLM2-135M: lm-eval-harness scores the float model and its
W8A8_DYNAMIC quantization through the reference runtime on the shipped botchan_last_word
task; the recovery gate passes at a sane bar and fails with exit code 3 above what was
measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("lm_eval")

from typer.testing import CliRunner  # noqa: E402

from gcupipe.cli import app  # noqa: E402
from gcupipe.testing.real_data import smollm2_checkpoint  # noqa: E402

DOCS = 40
RECIPE = """\
version: 1
name: evaluate-smollm2
stages:
  download:
    uses: download
    with: {{source: local, path: {model}}}
  quantize:
    uses: quantize
    with:
      model: ${{stages.download.outputs.model_dir}}
      method: w8a8_dynamic
      format: modelslim
  evaluate:
    uses: evaluate
    with:
      tasks: [botchan_last_word]
      limit: {docs}
      min_recovery: {min_recovery}
"""


def test_task_accuracy_recovery_gate_on_smollm2(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=smollm2_checkpoint(), docs=DOCS, min_recovery=0.5))
    runner = CliRunner()
    run_dir = tmp_path / "run"
    ok = runner.invoke(app, ["run", str(recipe), "--workdir", str(run_dir)])
    assert ok.exit_code == 0, ok.output
    out = run_dir / "stages" / "evaluate" / "out"
    report = json.loads((out / "evaluation.json").read_text())
    (result,) = report["results"]
    assert result["task"] == "botchan_last_word" and result["metric"] == "acc"
    assert result["samples"] == DOCS
    # a real model gets some of the last words right; stderr is lm-eval's binomial one
    assert 0.05 < result["float_score"] < 0.9
    expected = (result["float_score"] * (1 - result["float_score"]) / (DOCS - 1)) ** 0.5
    assert result["float_stderr"] == pytest.approx(expected, rel=1e-6)
    # W8A8 dynamic on SmolLM2 keeps its task accuracy within a few documents of float
    assert abs(result["drop"]) <= 4 / DOCS
    assert result["recovery"] == pytest.approx(result["quantized_score"] / result["float_score"])
    assert (out / "evaluation.png").stat().st_size > 1000
    assert "botchan_last_word" in (out / "evaluation-junit.xml").read_text()
    assert "±" in (out / "evaluation.md").read_text()

    above = result["recovery"] + 0.05
    recipe.write_text(RECIPE.format(model=smollm2_checkpoint(), docs=DOCS, min_recovery=above))
    failed = runner.invoke(app, ["run", str(recipe), "--workdir", str(run_dir)])
    assert failed.exit_code == 3, failed.output
    assert "evaluate: botchan_last_word below the gate" in failed.output
