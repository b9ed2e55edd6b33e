"""`uses: evaluate` on the real SmolLM2-135M: lm-eval-harness scores the float model and its
W8A8_DYNAMIC and GPTQ quantizations on the shipped botchan_last_word task through two engines,
real vLLM's OpenAI server (lm-eval's local-completions; for W8A8 the server an upstream serve
stage left running) and gcupipe's reference runtime. One evaluate stage scores both quantized
models against one float run; the engines agree within lm-eval's stderr, and the recovery gate
passes at a sane bar and fails with exit code 3 above what was measured."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("lm_eval")
pytest.importorskip("vllm")

from typer.testing import CliRunner  # noqa: E402

from gcupipe.cli import app  # noqa: E402
from gcupipe.testing.real_data import botchan_text, smollm2_checkpoint  # noqa: E402

pytestmark = pytest.mark.slow

DOCS = 30
RECIPE = """\
version: 1
name: evaluate-smollm2
stages:
  download:
    uses: download
    with: {{source: local, path: {model}}}
  w8a8:
    uses: quantize
    with:
      model: ${{stages.download.outputs.model_dir}}
      method: w8a8_dynamic
      format: modelslim
  gptq:
    uses: quantize
    with:
      model: ${{stages.download.outputs.model_dir}}
      method: gptq
      format: modelslim
      group_size: 64
      calibration: {{text_file: {calibration}, samples: 16, seq_len: 128}}
  serve_w8a8:
    uses: serve
    needs: [w8a8]
    with: {{mode: online, keep_alive: true, max_model_len: 2048}}
  served:
    uses: evaluate
    needs: [w8a8, gptq, serve_w8a8]
    with: {{engine: served, limit: {docs}}}
  reference:
    uses: evaluate
    needs: [w8a8, gptq]
    with: {{engine: reference, limit: {docs}, min_recovery: {min_recovery}}}
"""


def _results(run_dir: Path, stage: str) -> dict[str, dict]:  # type: ignore[type-arg]
    report = json.loads((run_dir / "stages" / stage / "out" / "evaluation.json").read_text())
    return {result["model"]: result for result in report["results"]}


def test_task_accuracy_on_both_engines_and_the_recovery_gate(tmp_path: Path) -> None:
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(botchan_text()[0])
    recipe = tmp_path / "recipe.yaml"

    def write(min_recovery: float) -> None:
        recipe.write_text(
            RECIPE.format(
                model=smollm2_checkpoint(),
                calibration=calibration,
                docs=DOCS,
                min_recovery=min_recovery,
            )
        )

    write(0.5)
    runner = CliRunner()
    run_dir = tmp_path / "run"
    ok = runner.invoke(app, ["run", str(recipe), "--workdir", str(run_dir)])
    lock = json.loads((run_dir / "gcupipe.lock.json").read_text())
    serve = next(s["outputs"] for s in lock["stages"] if s["id"] == "serve_w8a8")
    try:
        assert ok.exit_code == 0, ok.output
        # the W8A8 model was scored on the server the serve stage left running
        assert f"w8a8: served at {serve['endpoint']}" in ok.output
    finally:
        if serve and serve.get("pid"):
            os.killpg(serve["pid"], signal.SIGKILL)

    served, reference = _results(run_dir, "served"), _results(run_dir, "reference")
    assert sorted(served) == sorted(reference) == ["gptq", "w8a8"]
    for results in (served, reference):
        # one float scoring stands behind every quantized model of a stage
        assert results["w8a8"]["float_score"] == results["gptq"]["float_score"]
    for model in ("w8a8", "gptq"):
        for result in (served[model], reference[model]):
            assert result["task"] == "botchan_last_word" and result["metric"] == "acc"
            assert result["samples"] == DOCS
            # a real model gets some of the last words right; stderr is lm-eval's binomial one
            assert 0.05 < result["float_score"] < 0.9
            p = result["float_score"]
            assert result["float_stderr"] == pytest.approx((p * (1 - p) / (DOCS - 1)) ** 0.5)
            assert result["recovery"] == pytest.approx(
                result["quantized_score"] / result["float_score"]
            )
        # the two engines agree within lm-eval's stderr, float and quantized alike
        for key in ("float", "quantized"):
            a, b = served[model], reference[model]
            gap = abs(a[f"{key}_score"] - b[f"{key}_score"])
            assert gap <= max(a[f"{key}_stderr"], b[f"{key}_stderr"]), (model, key)
        # 8-bit and 4-bit g64 keep SmolLM2's task accuracy within a few documents of float
        assert abs(reference[model]["drop"]) <= 4 / DOCS, (model, reference[model])

    out = run_dir / "stages" / "reference" / "out"
    assert (out / "evaluation.png").stat().st_size > 1000
    junit = (out / "evaluation-junit.xml").read_text()
    assert 'name="w8a8/botchan_last_word"' in junit and 'name="gptq/botchan_last_word"' in junit
    assert "| w8a8 | botchan_last_word | acc |" in (out / "evaluation.md").read_text()

    above = max(r["recovery"] for r in reference.values()) + 0.05
    write(above)
    failed = runner.invoke(
        app, ["run", str(recipe), "--workdir", str(run_dir), "--only", "reference"]
    )
    assert failed.exit_code == 3, failed.output
    assert "evaluate: w8a8/botchan_last_word, gptq/botchan_last_word below the gate" in (
        " ".join(failed.output.split())
    )
