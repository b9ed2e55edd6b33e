"""A quantize stage killed with SIGKILL resumes at the layer it was on, and its final directory
is byte-identical to an uninterrupted run's; a changed recipe never resumes from stale layers."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from gcupipe.testing.tiny_models import tiny_model  # noqa: E402

RECIPE = """
version: 1
name: resume
stages:
  quantize:
    uses: quantize
    with:
      model: {model}
      method: {method}
      format: {format}
      max_shard_size_mb: 1
      ignore: {ignore}
      calibration: {{text_file: {text}, samples: 4, seq_len: 32}}
"""

# Runs the real CLI in this process after making the checkpoint after layer KILL_AT - 1 the
# last thing it does: the process SIGKILLs itself right after the resume point is on disk.
KILLER = """
import os, signal, sys
from gcupipe.quant import resume
save = resume.LayerCheckpoints.save
def save_then_die(self, layers_done, *args, **kwargs):
    save(self, layers_done, *args, **kwargs)
    if layers_done >= int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
resume.LayerCheckpoints.save = save_then_die
from gcupipe.cli import main
sys.argv = ["gcupipe", *sys.argv[1:]]
main()
"""

LAYERS = 12
KILL_AT = 7


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # each layer quantizes to more than 1 MB, so every layer ends in a flush (a resume point)
    root = tmp_path_factory.mktemp("resume-model")
    return tiny_model(
        "llama",
        root / "model",
        num_hidden_layers=LAYERS,
        hidden_size=512,
        intermediate_size=1024,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        dtype="bfloat16",
        shards=3,
    )


def _recipe(tmp_path: Path, model: Path, method: str, fmt: str, ignore: str) -> Path:
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"token{i % 89} of the {i} lines" for i in range(800)))
    recipe = tmp_path / f"recipe-{method}-{ignore.count(',')}.yaml"
    recipe.write_text(
        RECIPE.format(model=model, method=method, format=fmt, ignore=ignore, text=text)
    )
    return recipe


def _run(recipe: Path, workdir: Path, kill_at: int | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "gcupipe", "run", str(recipe), "--workdir", str(workdir)]
    env = None
    if kill_at is not None:
        import os

        env = {**os.environ, "KILL_AT": str(kill_at)}
        command = [sys.executable, "-c", KILLER, *command[3:]]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def _hashes(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize(("method", "fmt"), [("w8a8_dynamic", "modelslim"), ("gptq", "gcu")])
def test_killed_quantize_resumes_at_its_layer_and_writes_the_same_bytes(
    tmp_path: Path, model: Path, method: str, fmt: str
) -> None:
    recipe = _recipe(tmp_path, model, method, fmt, "[lm_head]")
    whole = _run(recipe, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]

    killed = _run(recipe, tmp_path / "resumed", kill_at=KILL_AT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "resumed" / "stages" / "quantize").exists()

    resumed = _run(recipe, tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    log = resumed.stdout + resumed.stderr
    assert f"resuming at layer {KILL_AT}/{LAYERS}" in log, log[-3000:]

    out = Path("stages/quantize/out")
    expected = _hashes(tmp_path / "whole" / out)
    assert len([f for f in expected if f.endswith(".safetensors")]) > LAYERS // 2
    assert _hashes(tmp_path / "resumed" / out) == expected
    assert not list((tmp_path / "resumed" / "scratch").rglob("*.safetensors"))


def test_a_changed_recipe_starts_over(tmp_path: Path, model: Path) -> None:
    recipe = _recipe(tmp_path, model, "w8a8_dynamic", "modelslim", "[lm_head]")
    killed = _run(recipe, tmp_path / "run", kill_at=KILL_AT)
    assert killed.returncode == -signal.SIGKILL
    changed = _recipe(tmp_path, model, "w8a8_dynamic", "modelslim", "[lm_head, .*o_proj]")
    rerun = _run(changed, tmp_path / "run")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming" not in rerun.stdout + rerun.stderr
    assert not list((tmp_path / "run" / "scratch").rglob("*.safetensors"))


def test_clean_drops_the_work_a_killed_run_kept(tmp_path: Path, model: Path) -> None:
    recipe = _recipe(tmp_path, model, "w8a8_dynamic", "modelslim", "[lm_head]")
    killed = _run(recipe, tmp_path / "run", kill_at=KILL_AT)
    assert killed.returncode == -signal.SIGKILL
    assert list((tmp_path / "run" / "scratch").rglob("state.json"))
    cleaned = subprocess.run(
        [sys.executable, "-m", "gcupipe", "clean", str(recipe), "--workdir", str(tmp_path / "run")]
        + ["--stage", "quantize"],
        capture_output=True,
        text=True,
    )
    assert cleaned.returncode == 0, cleaned.stderr
    assert not (tmp_path / "run" / "scratch" / "quantize").exists()
    rerun = _run(recipe, tmp_path / "run")
    assert rerun.returncode == 0 and "resuming" not in rerun.stdout + rerun.stderr
