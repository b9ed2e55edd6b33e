"""A run on a filesystem that fills up (a real size-limited tmpfs): the writing stage fails with
one line naming the path, what is free and what the stage needs; no partial output is left as a
result; once there is space (the same filesystem, grown), the next run completes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytest.importorskip("torch")

from typer.testing import CliRunner  # noqa: E402

from gcupipe.cli import app  # noqa: E402
from gcupipe.testing.serving import servable_tiny_model  # noqa: E402

RECIPE = """\
version: 1
name: full-disk
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
"""


def _mount(where: Path, size: str, remount: bool = False) -> bool:
    options = f"remount,size={size}" if remount else f"size={size}"
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True
    )
    return done.returncode == 0


def test_a_full_disk_fails_the_writing_stage_cleanly_and_the_rerun_completes(
    tmp_path: Path,
) -> None:
    small = tmp_path / "small"
    small.mkdir()
    if not _mount(small, "300k"):  # the tiny model is 1.4 MB, its W8A8 copy 0.6 MB
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    try:
        model = servable_tiny_model("llama", tmp_path / "tiny")
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(RECIPE.format(model=model))
        run_dir = small / "run"
        command = ["run", str(recipe), "--workdir", str(run_dir)]
        failed = CliRunner().invoke(app, command)
        assert failed.exit_code == 1, failed.output
        text = " ".join(failed.output.split())
        assert "stage 'quantize': no space left on the device writing" in text
        assert "it needs about 0.6 MB" in text and "internal error" not in text
        assert not (run_dir / "stages" / "quantize").exists()  # nothing half-written as a result
        assert [p.name for p in run_dir.glob(".gcupipe.lock.json-*")] == []
        assert list((run_dir / ".tmp").glob("*")) == []  # no stage directory in the making

        assert _mount(small, "20m", remount=True)  # the same filesystem, with space now
        again = CliRunner().invoke(app, command)
        assert again.exit_code == 0, again.output
        assert (run_dir / "stages" / "quantize" / "out" / "config.json").is_file()
    finally:
        subprocess.run(["umount", str(small)], check=True)
