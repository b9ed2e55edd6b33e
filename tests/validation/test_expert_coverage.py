"""Calibration tokens routed to each MoE expert: recorded by a calibrated quantize run, shown in
the validate report, and gated by `min_expert_tokens` (exit code 3 when an expert starved)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from gcupipe.testing.tiny_models import tiny_model  # noqa: E402

RECIPE = """
version: 1
name: coverage
stages:
  quantize:
    uses: quantize
    with:
      model: {model}
      method: gptq
      format: gcu
      calibration: {{text_file: {text}, samples: 8, seq_len: 64}}
  validate:
    uses: validate
    needs: [quantize]
    with:
      numeric: false
      min_expert_tokens: {minimum}
"""


def _starved_moe(path: Path) -> Path:
    """A tiny DeepSeek-V2 with top-1 routing whose router reads one input channel only: expert
    0 wins where that channel is positive, expert 1 where it is negative, so experts 2 and 3
    (router rows of zeros) never get a token."""
    import torch
    from safetensors.torch import load_file, save_file

    model = tiny_model("deepseek_v2", path, num_experts_per_tok=1)
    weights = model / "model.safetensors"
    state = load_file(str(weights))
    router = state["model.layers.1.mlp.gate.weight"]
    router.zero_()
    router[0, 0], router[1, 0] = 4.0, -4.0
    save_file(state, str(weights), metadata={"format": "pt"})
    assert torch.count_nonzero(load_file(str(weights))["model.layers.1.mlp.gate.weight"]) == 2
    return model


@pytest.fixture(scope="module")
def starved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _starved_moe(tmp_path_factory.mktemp("coverage") / "model")


def _run(tmp_path: Path, model: Path, minimum: int) -> subprocess.CompletedProcess[str]:
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i % 53} in line {i}" for i in range(1500)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=model, text=text, minimum=minimum))
    return subprocess.run(
        [sys.executable, "-m", "gcupipe", "run", str(recipe), "--workdir", str(tmp_path / "w")],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_starved_expert_fails_the_gate_with_exit_code_3(tmp_path: Path, starved: Path) -> None:
    result = _run(tmp_path, starved, minimum=1)
    log = result.stdout + result.stderr
    assert result.returncode == 3, log[-3000:]
    assert "expert-coverage" in log
    assert "2 of 4 experts saw fewer than min_expert_tokens 1" in log
    report = json.loads((tmp_path / "w" / "reports" / "validate" / "validation.json").read_text())
    coverage = report["metrics"]["expert_coverage"]
    assert coverage["experts"] == 4 and coverage["min"] == 0
    assert coverage["histogram"]["0"] == 2
    markdown = (tmp_path / "w" / "reports" / "validate" / "validation.md").read_text()
    assert "calibration tokens routed to each" in markdown


def test_the_same_model_passes_without_a_minimum_and_reports_the_counts(
    tmp_path: Path, starved: Path
) -> None:
    result = _run(tmp_path, starved, minimum=0)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    outputs = json.loads((tmp_path / "w" / "stages" / "quantize" / "stage.json").read_text())[
        "outputs"
    ]
    tokens = outputs["expert_tokens"]
    assert tokens["model.layers.1.mlp.experts.2"] == tokens["model.layers.1.mlp.experts.3"] == 0
    # top-1 routing: every calibration token went to expert 0 or expert 1
    routed = tokens["model.layers.1.mlp.experts.0"] + tokens["model.layers.1.mlp.experts.1"]
    assert routed == 8 * 64
