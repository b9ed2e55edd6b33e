"""Two `gcupipe run` processes downloading the same repository into one shared hub cache at the
same time (real clients; the loopback hub sends the weights slowly, so both are mid-file at
once): both end with the exact bytes, neither takes the other's half-written file for a
finished one."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gcupipe.testing.loopback_hub import LoopbackHub

HUB_ENV = (
    "MODELSCOPE_ENDPOINT", "MODELSCOPE_CACHE", "MODELSCOPE_API_TOKEN", "HF_ENDPOINT",
    "HF_HUB_CACHE", "HF_HOME", "HF_TOKEN", "HF_HUB_OFFLINE",
)  # fmt: skip
RECIPE = """\
version: 1
name: shared-cache
stages:
  download:
    uses: download
    with: {{source: {source}, model_id: org/big, endpoint: "{endpoint}", cache_dir: {cache}}}
"""


@pytest.mark.parametrize("source", ["modelscope", "huggingface"])
def test_two_runs_filling_one_cache_at_once_both_get_the_exact_bytes(
    source: str, tmp_path: Path
) -> None:
    weights = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(1 << 18))
    files = {"config.json": b'{"model_type": "llama"}', "model.safetensors": weights}  # 8 MB
    env = {k: v for k, v in os.environ.items() if k not in HUB_ENV}
    env["HF_HOME"] = str(tmp_path / "hf-home")
    with LoopbackHub() as hub:
        hub.add_repo("org/big", files)
        hub.slow["model.safetensors"] = 4.0  # both processes are mid-file at the same time
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(RECIPE.format(source=source, endpoint=hub.url, cache=tmp_path / "cache"))
        runs = [
            subprocess.Popen(
                [sys.executable, "-m", "gcupipe", "run", str(recipe)]
                + ["--workdir", str(tmp_path / f"run{i}")],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i in range(2)
        ]
        outputs = [run.communicate(timeout=300)[0] for run in runs]
    for i, run in enumerate(runs):
        assert run.returncode == 0, outputs[i]
        model = tmp_path / f"run{i}" / "stages" / "download" / "out" / "model"
        assert (model / "model.safetensors").read_bytes() == weights
