"""A hub whose listing names files outside the snapshot (`..`, absolute paths) gets nothing
written outside gcupipe's cache, through the real ModelScope and Hugging Face clients against
the loopback hub. (The ModelScope client writes such names as given: `/abs/path` lands at
/abs/path; gcupipe checks the listing first. The Hugging Face client refuses them itself.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from gcupipe.errors import StageError
from gcupipe.hub.common import unsafe_path
from gcupipe.testing.loopback_hub import LoopbackHub, isolate_hub_clients
from tests.stages.test_download import HUBS, Recorder, _tiny_files, run


@pytest.fixture(autouse=True)
def _fast_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    isolate_hub_clients(monkeypatch)


@pytest.mark.parametrize("source", HUBS)
@pytest.mark.parametrize("kind", ["parent", "nested-parent", "absolute"])
def test_a_listing_that_climbs_out_of_the_cache_is_refused(
    source: str, kind: str, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    name = {
        "parent": "../escape.txt",
        "nested-parent": "extra/../../escape.txt",
        "absolute": str(outside / "escape.txt"),
    }[kind]
    rec = Recorder(tmp_path / "work", tmp_path / "work" / "cache")
    rec.tmp_path.mkdir()
    with LoopbackHub() as hub:
        hub.add_repo("org/tiny", {**_tiny_files(), name: b"not yours"})
        with pytest.raises(StageError) as err:
            run(source, hub, rec)
    message = str(err.value)
    assert "\n" not in message
    assert "would be written outside the cache" in message or "Invalid filename" in message
    written = [p for p in tmp_path.rglob("escape.txt")]
    assert written == [] and list(outside.iterdir()) == []
    assert not (rec.tmp_path / "out1" / "model").exists()


@pytest.mark.parametrize("source", HUBS)
def test_a_snapshot_file_that_links_out_of_the_cache_is_refused(source: str, tmp_path: Path):
    """A cache someone else can write (shared): a snapshot file replaced by a link to a file
    outside it is refused, not handed on as the model's."""
    rec = Recorder(tmp_path / "work", tmp_path / "work" / "cache")
    rec.tmp_path.mkdir()
    secret = tmp_path / "elsewhere.txt"
    secret.write_text("not a model file")
    with LoopbackHub() as hub:
        hub.add_repo("org/tiny", _tiny_files())
        first = run(source, hub, rec)  # fills the cache
        cached = (first.model_dir / "tokenizer.json").resolve()
        cached.unlink()
        cached.symlink_to(secret)
        with pytest.raises(StageError, match="outside the hub cache") as err:
            run(source, hub, rec, offline=True)
    assert "\n" not in str(err.value)
    assert not (rec.tmp_path / "out2" / "model").exists()


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("config.json", None),
        ("sub/dir/model.safetensors", None),
        ("..", "a '..' segment"),
        ("a/../b", "a '..' segment"),
        ("/etc/passwd", "an absolute path"),
        ("C:/x", "an absolute path"),
        ("a\\..\\b", "a backslash in the path"),
        ("", "an empty name"),
        ("..hidden", None),
    ],
)
def test_unsafe_path(name: str, why: str | None) -> None:
    assert unsafe_path(name) == why
