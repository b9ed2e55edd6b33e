"""The remote stage cache (`cache: {url: s3://...}`) on a real S3-compatible server on
127.0.0.1 (moto's server mode), through fsspec's s3fs: one run directory fills it, another -
on this machine or any other - restores every stage from it instead of running it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from gcupipe.engine import Events
from gcupipe.engine.results import RunResult
from gcupipe.engine.runner import Runner
from gcupipe.errors import UsageError
from gcupipe.recipe import load_recipe

from .conftest import BUCKET
from .test_executors import Recorder

pytest.importorskip("torch")
from gcupipe.testing.tiny_models import tiny_model  # noqa: E402

PIPELINE = """\
version: 1
name: shared-cache
cache: {{url: "s3://{bucket}/{prefix}", push: {push}}}
stages:
  download:
    uses: download
    needs: []
    with: {{source: local, path: {model}}}
  quantize:
    uses: quantize
    with:
      model: ${{stages.download.outputs.model_dir}}
      method: w8a8_dynamic
      format: modelslim
  validate:
    uses: validate
    with:
      reference: ${{stages.download.outputs.model_dir}}
      eval: {{max_tokens: 200, window: 100, stride: 100}}
      agreement_margin: 0.1
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model("llama", tmp_path_factory.mktemp("remote-cache") / "model")


def recipe(folder: Path, model: Path, prefix: str = "ci", push: bool = True) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(
        PIPELINE.format(bucket=BUCKET, prefix=prefix, push=str(push).lower(), model=model)
    )
    return path


def run(recipe_path: Path, run_dir: Path, recorder: Recorder | None = None) -> RunResult:
    events = Events([recorder or Recorder()])
    return Runner(load_recipe(recipe_path), run_dir, events).run()


def files(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def keys(client, prefix: str) -> list[str]:  # type: ignore[no-untyped-def]
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return sorted(item["Key"] for item in listed)


def test_one_run_dir_fills_the_cache_and_another_restores_every_stage(s3_bucket, model, tmp_path):
    path = recipe(tmp_path, model)
    first = run(path, tmp_path / "runner-a")
    assert first.outcome == "ok", first.error
    assert [stage.outcome for stage in first.stages] == ["ran"] * 3
    stored = keys(s3_bucket, "ci/")
    assert sum(name.endswith(".json") for name in stored) == 3
    assert sum(name.endswith(".tar") for name in stored) == 3

    recorder = Recorder()
    second = run(path, tmp_path / "runner-b", recorder)
    assert second.outcome == "ok", second.error
    assert [stage.outcome for stage in second.stages] == ["cached"] * 3
    assert all("restored from the remote cache s3://" in s.reason for s in second.stages)
    assert not [e for e in recorder.events if e.kind == "stage_started"]
    for a, b in zip(first.stages, second.stages, strict=True):
        assert (a.cache_key, a.outputs_digest) == (b.cache_key, b.outputs_digest)
    # the quantized model and the validate report are the same bytes, under runner-b's paths
    quantized = Path(second.outputs("quantize")["model_dir"])
    assert quantized.is_relative_to(tmp_path / "runner-b")
    assert files(quantized) == files(Path(first.outputs("quantize")["model_dir"]))
    assert second.outputs("validate")["passed"] is True
    assert Path(second.outputs("validate")["report_json"]).is_file()
    # the download stage linked the model in runner-a; the cache holds the files themselves
    restored_download = Path(second.outputs("download")["model_dir"])
    assert not any(path.is_symlink() for path in restored_download.rglob("*"))
    assert files(restored_download) == files(model)

    # restored results are results: a third run in runner-b is a plain local cache hit
    third = run(path, tmp_path / "runner-b")
    assert [stage.reason for stage in third.stages] == ["cached: nothing changed"] * 3
    assert keys(s3_bucket, "ci/") == stored  # nothing pushed twice

    plan = Runner(load_recipe(path), tmp_path / "runner-c").plan()
    assert [(s.outcome, s.reason) for s in plan] == [
        ("cached", f"in the remote cache s3://{BUCKET}/ci")
    ] * 3


def test_an_archive_that_does_not_match_its_entry_is_never_a_result(s3_bucket, model, tmp_path):
    path = recipe(tmp_path, model, prefix="bad")
    assert run(path, tmp_path / "a").outcome == "ok"
    archives = [name for name in keys(s3_bucket, "bad/") if name.endswith(".tar")]
    for name in archives:  # same size, other bytes: only the sha256 can tell
        size = s3_bucket.head_object(Bucket=BUCKET, Key=name)["ContentLength"]
        s3_bucket.put_object(Bucket=BUCKET, Key=name, Body=b"\0" * size)
    recorder = Recorder()
    again = run(path, tmp_path / "b", recorder)
    assert again.outcome == "ok", again.error
    assert [stage.outcome for stage in again.stages] == ["ran"] * 3
    said = [str(e.data.get("message")) for e in recorder.events if e.kind == "log"]
    assert sum("does not match its sha256" in line for line in said) == 3, said


def test_an_upload_that_never_finished_is_not_seen(s3_bucket, model, tmp_path):
    """The .json is written last: an archive without it (a runner killed mid-upload) is
    ignored, and the next run pushes a complete entry."""
    path = recipe(tmp_path, model, prefix="half")
    assert run(path, tmp_path / "a").outcome == "ok"
    for name in keys(s3_bucket, "half/"):
        if name.endswith(".json"):
            s3_bucket.delete_object(Bucket=BUCKET, Key=name)
    again = run(path, tmp_path / "b")
    assert [stage.outcome for stage in again.stages] == ["ran"] * 3
    assert sum(name.endswith(".json") for name in keys(s3_bucket, "half/")) == 3


def test_push_false_only_reads(s3_bucket, model, tmp_path):
    path = recipe(tmp_path, model, prefix="readonly", push=False)
    assert run(path, tmp_path / "a").outcome == "ok"
    assert keys(s3_bucket, "readonly/") == []


def test_a_url_without_its_file_system_is_one_usage_error(tmp_path, model):
    path = recipe(tmp_path, model)
    path.write_text(path.read_text().replace("s3://", "nosuchfs://"))
    with pytest.raises(UsageError, match="cache.url 'nosuchfs://"):
        Runner(load_recipe(path), tmp_path / "run")


def test_run_paths_in_values_and_inside_text_leave_the_key_never_a_longer_name():
    from gcupipe.engine.cache import relocate

    value = {
        "model": "/w/run/stages/a/out/model",
        "run": "cat /w/run/stages/a/out/n.txt > x; ls /w/run",
        "other": ["/w/run2/file", "/w/run.old", 3],
    }
    assert relocate(value, "/w/run", "<run>") == {
        "model": "<run>/stages/a/out/model",
        "run": "cat <run>/stages/a/out/n.txt > x; ls <run>",
        "other": ["/w/run2/file", "/w/run.old", 3],
    }
