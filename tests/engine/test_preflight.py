"""`gcupipe plan --estimate`: per-stage disk, peak RSS and time before anything runs; the disk
figure is what the stages then write, and a run directory on a filesystem too small for the run
fails the plan with exit code 4 (a real size-limited tmpfs)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("torch")

from typer.testing import CliRunner  # noqa: E402

from gcupipe.cli import app  # noqa: E402
from gcupipe.engine import Runner, Selection  # noqa: E402
from gcupipe.engine.preflight import preflight  # noqa: E402
from gcupipe.estimate import Machine  # noqa: E402
from gcupipe.recipe import load_recipe  # noqa: E402
from gcupipe.testing.serving import servable_tiny_model  # noqa: E402

RECIPE = """\
version: 1
name: preflight
stages:
  download:
    uses: download
    with: {{source: local, path: {model}, copy_files: true}}
  quantize:
    uses: quantize
    with:
      model: ${{stages.download.outputs.model_dir}}
      method: {method}
      format: {format}
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return servable_tiny_model("llama", tmp_path_factory.mktemp("preflight") / "tiny")


def _recipe(
    tmp_path: Path, model: Path, method: str = "w8a8_dynamic", fmt: str = "modelslim"
) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=model, method=method, format=fmt))
    return recipe


def _written(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.mark.parametrize(
    ("method", "fmt"), [("w8a8_dynamic", "modelslim"), ("w8a16", "compressed-tensors")]
)
def test_disk_estimate_is_what_the_stages_write(
    tmp_path: Path, model: Path, method: str, fmt: str
) -> None:
    recipe = load_recipe(_recipe(tmp_path, model, method, fmt), [], environ=dict(os.environ))
    runner = Runner(recipe, tmp_path / "run")
    checked = preflight(runner, runner.plan(Selection()), Machine.nominal())
    estimates = {s.stage_id: s.estimate for s in checked.stages}
    assert estimates["download"] is not None and estimates["quantize"] is not None
    result = CliRunner().invoke(
        app, ["run", str(tmp_path / "recipe.yaml"), "--workdir", str(tmp_path / "run")]
    )
    assert result.exit_code == 0, result.output
    for stage in ("download", "quantize"):
        written = _written(tmp_path / "run" / "stages" / stage / "out")
        estimated = estimates[stage].disk_bytes
        # the tiny model's json files (tensor descriptions) weigh more, relatively, than a
        # real model's: 10% here; benchmarks/preflight_accuracy.py holds real sizes to 5%
        assert estimated == pytest.approx(written, rel=0.10), stage
        assert estimates[stage].peak_rss_bytes > 0
    assert checked.disk_bytes == sum(e.disk_bytes for e in estimates.values())


def test_plan_estimate_prints_each_stage_and_the_total(tmp_path: Path, model: Path) -> None:
    recipe = _recipe(tmp_path, model)
    result = CliRunner().invoke(
        app, ["plan", str(recipe), "--workdir", str(tmp_path / "run"), "--estimate"]
    )
    assert result.exit_code == 0, result.output
    assert "estimate:" in result.output
    assert "download: disk" in result.output and "(copied)" in result.output
    assert "quantize: disk" in result.output and "(streamed layer by layer)" in result.output
    assert "total: disk" in result.output and "free at" in result.output
    assert not (tmp_path / "run").exists()  # plan writes nothing


def _tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    return mounted.returncode == 0


def test_a_filesystem_too_small_for_the_run_fails_the_plan_early(
    tmp_path: Path, model: Path
) -> None:
    small = tmp_path / "small"
    if not _tmpfs(small, "1m"):
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    try:
        recipe = _recipe(tmp_path, model)  # 1.4 MB copied + its W8A8 copy: more than 1 MB
        result = CliRunner().invoke(
            app, ["plan", str(recipe), "--workdir", str(small / "run"), "--estimate"]
        )
        assert result.exit_code == 4, result.output
        assert "the run needs about" in result.output and "MB free" in result.output
        assert "choose another --workdir" in result.output
        assert list(small.iterdir()) == []  # the probe left nothing behind
    finally:
        subprocess.run(["umount", str(small)], check=True)
