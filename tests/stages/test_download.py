"""The download stage with the real ModelScope and Hugging Face clients against a loopback hub."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import pytest

from gcupipe.errors import StageError
from gcupipe.stages.base import ProgressTask, StageContext
from gcupipe.stages.download import DownloadConfig, DownloadStage
from gcupipe.testing.loopback_hub import LoopbackHub, isolate_hub_clients

HUBS = ["modelscope", "huggingface"]
TOKEN_ENV = {"modelscope": "MODELSCOPE_API_TOKEN", "huggingface": "HF_TOKEN"}


@functools.cache
def _tiny_files() -> dict[str, bytes]:
    """A small model repository: config, weights, tokenizer, README, nested file."""
    rng = hashlib.sha256(b"seed")
    weights = b"".join(
        hashlib.sha256(rng.digest() + i.to_bytes(2, "big")).digest() for i in range(4000)
    )
    return {
        "config.json": json.dumps({"model_type": "llama", "hidden_size": 8}).encode(),
        "model.safetensors": weights,  # 128 kB: big enough to be cut in the middle
        "tokenizer.json": b'{"version": "1.0"}',
        "README.md": b"# tiny\n",
        "extra/notes.txt": b"nested file\n",
    }


class Recorder:
    """A StageContext with logs, secrets and progress captured for assertions."""

    def __init__(self, tmp_path: Path, cache: Path):
        self.logs: list[str] = []
        self.secrets: list[str] = []
        self.bytes_progress = 0.0
        self.tmp_path = tmp_path
        self.cache = cache
        self.runs = 0

    def ctx(self) -> StageContext:
        self.runs += 1
        out = self.tmp_path / f"out{self.runs}"
        scratch = self.tmp_path / f"scratch{self.runs}"
        out.mkdir()
        scratch.mkdir()

        def factory(description: str, total: float | None, unit: str):  # type: ignore[no-untyped-def]
            def update(completed: float | None, total: float | None) -> None:
                if unit == "B" and completed is not None:
                    self.bytes_progress = max(self.bytes_progress, completed)

            return ProgressTask(update), lambda: None

        return StageContext(
            stage_id="download",
            output_dir=out,
            scratch_dir=scratch,
            cache_dir=self.cache,
            run_dir=self.tmp_path,
            log=self.logs.append,
            progress_factory=factory,
            secrets=self.secrets.append,
        )


@pytest.fixture(autouse=True)
def _fast_clients(monkeypatch):
    """Shorten the clients' own retry waits (module constants) and keep the user's real
    hub settings out of the tests."""
    isolate_hub_clients(monkeypatch)


@pytest.fixture
def hub():
    with LoopbackHub() as server:
        server.add_repo("org/tiny", _tiny_files())
        yield server


@pytest.fixture
def rec(tmp_path):
    return Recorder(tmp_path, tmp_path / "cache")


def run(source: str, hub: LoopbackHub, rec: Recorder, **overrides):  # type: ignore[no-untyped-def]
    fields = {
        "source": source,
        "model_id": "org/tiny",
        "endpoint": hub.url,
        "retry_backoff_s": 0.01,
        **overrides,
    }
    config = DownloadConfig(**fields)
    return DownloadStage().run(config, rec.ctx())


def _manifest(outputs) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    data = json.loads(outputs.manifest.read_text())
    return {entry["path"]: entry for entry in data["files"]}


@pytest.mark.parametrize("source", HUBS)
def test_full_download_then_second_run_fetches_no_file(source, hub, rec):
    outputs = run(source, hub, rec)
    files = _tiny_files()
    manifest = _manifest(outputs)
    assert set(manifest) == set(files)
    for path, data in files.items():
        assert (outputs.model_dir / path).read_bytes() == data
        assert manifest[path]["size"] == len(data)
        assert manifest[path]["sha256"] == hashlib.sha256(data).hexdigest()
    assert json.loads(outputs.manifest.read_text())["hub_hashes_checked"] == len(files)
    assert outputs.model_dir.is_relative_to(rec.tmp_path / "out1")
    assert not outputs.needs_trust_remote_code and outputs.remote_code_files == []
    assert source in outputs.source and "org/tiny" in outputs.source
    if source == "huggingface":
        assert f"@main={hub.repos['org/tiny'].commit}" in outputs.source
    assert rec.bytes_progress >= len(files["model.safetensors"])
    assert len(hub.file_requests()) == len(files)

    hub.clear()
    again = run(source, hub, rec)
    assert hub.file_requests() == []
    assert _manifest(again) == manifest


@pytest.mark.parametrize("source", HUBS)
def test_allow_and_ignore_patterns_select_files(source, hub, rec):
    outputs = run(
        source,
        hub,
        rec,
        allow_patterns=["*.json", "*.safetensors", "extra/*"],
        ignore_patterns=["tokenizer.json"],
    )
    assert set(_manifest(outputs)) == {"config.json", "model.safetensors", "extra/notes.txt"}
    fetched = {
        r.query.get("FilePath", [r.path.rsplit("/resolve/", 1)[-1]])[0] for r in hub.file_requests()
    }
    assert not any("README" in f or "tokenizer" in f for f in fetched)
    # A later run with other patterns sees only its own files, though the cache holds more.
    narrower = run(source, hub, rec, allow_patterns=["config.json"])
    assert set(_manifest(narrower)) == {"config.json"}


@pytest.mark.parametrize("source", HUBS)
def test_corrupted_file_is_an_error_naming_it_and_not_kept(source, hub, rec):
    hub.corrupt.add("model.safetensors")
    with pytest.raises(StageError, match=r"'model\.safetensors' failed its sha256 check") as err:
        run(source, hub, rec)
    assert "\n" not in str(err.value)
    assert not (rec.tmp_path / "out1" / "model").exists()
    cached = [p for p in rec.cache.rglob("*") if p.is_file() and p.stat().st_size > 100_000]
    assert cached == []  # the bad bytes are not left in the shared cache
    hub.corrupt.clear()
    assert (run(source, hub, rec).model_dir / "model.safetensors").read_bytes() == (
        _tiny_files()["model.safetensors"]
    )


@pytest.mark.parametrize("source", HUBS)
def test_more_bytes_than_the_listing_announces_is_an_error_and_not_kept(source, hub, rec):
    hub.oversize.add("model.safetensors")
    with pytest.raises(StageError, match=r"model\.safetensors") as err:
        run(source, hub, rec)
    assert "\n" not in str(err.value)
    assert not (rec.tmp_path / "out1" / "model").exists()
    cached = [p for p in rec.cache.rglob("*") if p.is_file() and p.stat().st_size > 100_000]
    assert cached == []  # nothing of the oversized file is in the shared cache


@pytest.mark.parametrize("source", HUBS)
def test_missing_model_and_revision_give_one_clear_line(source, hub, rec):
    with pytest.raises(StageError) as err:
        run(source, hub, rec, model_id="org/absent")
    message = str(err.value)
    assert "'org/absent' was not found on " + hub.url in message and "\n" not in message
    with pytest.raises(StageError) as err:
        run(source, hub, rec, revision="no-such-branch")
    message = str(err.value)
    assert "revision 'no-such-branch' does not exist" in message and "\n" not in message
    assert hub.file_requests() == []


@pytest.mark.parametrize("source", HUBS)
def test_bad_token_names_the_variable_and_never_leaks_it(source, hub, rec, monkeypatch):
    hub.token = "right-token"
    monkeypatch.setenv(TOKEN_ENV[source], "wrong-token-123")
    with pytest.raises(StageError) as err:
        run(source, hub, rec)
    message = str(err.value)
    assert "HTTP 401" in message and f"${TOKEN_ENV[source]}" in message
    assert "wrong-token-123" not in message and "\n" not in message
    assert rec.secrets == ["wrong-token-123"]

    monkeypatch.setenv("MY_HUB_TOKEN", "right-token")
    outputs = run(source, hub, rec, token_env="MY_HUB_TOKEN")
    assert "right-token" in rec.secrets
    assert "right-token" not in outputs.manifest.read_text()
    assert all(r.authorization == "Bearer right-token" for r in hub.requests[-3:])


@pytest.mark.parametrize("source", HUBS)
def test_connection_dropped_mid_file_is_retried(source, hub, rec):
    hub.drop_once.add("model.safetensors")
    outputs = run(source, hub, rec)
    data = _tiny_files()["model.safetensors"]
    assert (outputs.model_dir / "model.safetensors").read_bytes() == data
    assert "model.safetensors" not in hub.drop_once  # the drop really happened


@pytest.mark.parametrize("status", [503, 429])
@pytest.mark.parametrize("source", HUBS)
def test_a_busy_hub_is_retried_to_success(source, status, hub, rec):
    hub.fail_once["model.safetensors"] = status
    outputs = run(source, hub, rec)
    assert (outputs.model_dir / "model.safetensors").read_bytes() == (
        _tiny_files()["model.safetensors"]
    )
    assert hub.fail_once == {}  # the hub really answered with the error first
    got = [
        r
        for r in hub.file_requests()
        if r.path.endswith("model.safetensors") or "model.safetensors" in str(r.query)
    ]
    assert len(got) >= 2  # the failed request and the retry


@pytest.mark.parametrize("source", HUBS)
def test_offline_uses_the_warm_cache_with_zero_requests(source, hub, rec):
    with pytest.raises(StageError, match="not in the cache at .* offline is on"):
        run(source, hub, rec, offline=True)
    assert hub.requests == []
    online = run(source, hub, rec, allow_patterns=["*.json", "*.safetensors"])
    hub.clear()
    offline = run(source, hub, rec, offline=True, allow_patterns=["*.json", "*.safetensors"])
    assert hub.requests == []
    assert _manifest(offline) == _manifest(online)


def test_hf_offline_environment_variable_is_honoured(hub, rec, monkeypatch):
    run("huggingface", hub, rec)
    hub.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run("huggingface", hub, rec)
    assert hub.requests == []


@pytest.mark.parametrize("source", HUBS)
def test_pinned_commit_in_cache_makes_zero_requests(source, hub, rec):
    commit = hub.repos["org/tiny"].commit
    first = run(source, hub, rec, revision=commit)
    hub.clear()
    outputs = run(source, hub, rec, revision=commit)
    assert hub.requests == []
    assert commit in outputs.source
    assert _manifest(outputs) == _manifest(first)


@pytest.mark.parametrize("source", HUBS)
def test_pickle_weights_are_left_out_unless_allowed(source, hub, rec):
    files = {**_tiny_files(), "pytorch_model.bin": b"pickle!", "training_args.bin": b"x"}
    hub.add_repo("org/both", files)
    outputs = run(source, hub, rec, model_id="org/both")
    assert not any(name.endswith(".bin") for name in _manifest(outputs))
    assert not any(".bin" in str(r.path) + str(r.query) for r in hub.file_requests())
    allowed = run(source, hub, rec, model_id="org/both", allow_pickle=True)
    assert "pytorch_model.bin" in _manifest(allowed)

    only_pickle = {"config.json": b"{}", "pytorch_model.bin": b"pickle!"}
    hub.add_repo("org/pickled", only_pickle)
    with pytest.raises(StageError, match="allow_pickle: true"):
        run(source, hub, rec, model_id="org/pickled")


@pytest.mark.parametrize("source", HUBS)
def test_remote_code_is_listed_and_flagged(source, hub, rec):
    files = {**_tiny_files(), "modeling_tiny.py": b"print('hi')\n", "configuration_tiny.py": b""}
    hub.add_repo("org/code", files)
    outputs = run(source, hub, rec, model_id="org/code")
    assert outputs.needs_trust_remote_code
    assert outputs.remote_code_files == ["configuration_tiny.py", "modeling_tiny.py"]


def test_unreachable_endpoint_is_retried_then_one_clear_line(rec):
    with LoopbackHub() as dead:
        url = dead.url  # a port nobody listens on once the hub is closed
    with pytest.raises(StageError) as err:
        DownloadStage().run(
            DownloadConfig(
                source="huggingface",
                model_id="org/tiny",
                endpoint=url,
                retries=2,
                retry_backoff_s=0.01,
            ),
            rec.ctx(),
        )
    message = str(err.value)
    assert f"cannot reach {url}" in message and "after 3 attempt(s)" in message
    assert "\n" not in message
    assert sum("retry" in line for line in rec.logs) == 2


def test_unreachable_modelscope_endpoint(rec):
    with LoopbackHub() as dead:
        url = dead.url
    with pytest.raises(StageError, match=f"cannot reach {url}"):
        DownloadStage().run(DownloadConfig(model_id="org/tiny", endpoint=url, retries=0), rec.ctx())


def test_describe_says_where_from_and_whether_cached(hub, rec):
    stage = DownloadStage()
    for source in HUBS:
        config = DownloadConfig(source=source, model_id="org/tiny", endpoint=hub.url)
        line = stage.describe(config, rec.cache)
        assert line is not None and f"{source} org/tiny@" in line and hub.url in line
        assert "not cached" in line
        run(source, hub, rec)
        hub.clear()
        line = stage.describe(config, rec.cache)
        assert line is not None and "cached at" in line and "not cached" not in line
        assert hub.requests == []  # describe never touches the network


def test_environment_endpoint_and_cache_are_used(hub, rec, monkeypatch, tmp_path):
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", hub.url)
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms-env-cache"))
    outputs = DownloadStage().run(DownloadConfig(model_id="org/tiny"), rec.ctx())
    assert hub.url in outputs.source
    assert (tmp_path / "ms-env-cache" / "models").is_dir()


# -- local and gguf ------------------------------------------------------------------------


def _local_model(root: Path) -> Path:
    for rel, data in {**_tiny_files(), "pytorch_model.bin": b"pickle"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


@pytest.mark.parametrize("copy_files", [False, True])
def test_local_directory_linked_or_copied(tmp_path, rec, copy_files):
    src = _local_model(tmp_path / "src")
    outputs = DownloadStage().run(
        DownloadConfig(source="local", path=src, copy_files=copy_files), rec.ctx()
    )
    manifest = _manifest(outputs)
    assert set(manifest) == set(_tiny_files())  # the pickle file is left out
    weights = outputs.model_dir / "model.safetensors"
    assert weights.is_symlink() is not copy_files
    assert weights.read_bytes() == (src / "model.safetensors").read_bytes()
    assert outputs.source == f"local:{src.resolve()}"


def test_local_errors_are_one_line(tmp_path, rec):
    with pytest.raises(StageError, match="does not exist"):
        DownloadStage().run(DownloadConfig(source="local", path=tmp_path / "nope"), rec.ctx())
    only_pickle = tmp_path / "pickled"
    only_pickle.mkdir()
    (only_pickle / "config.json").write_text("{}")
    (only_pickle / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(StageError, match="allow_pickle"):
        DownloadStage().run(DownloadConfig(source="local", path=only_pickle), rec.ctx())
    outputs = DownloadStage().run(
        DownloadConfig(source="local", path=only_pickle, allow_pickle=True), rec.ctx()
    )
    assert "pytorch_model.bin" in _manifest(outputs)


def test_check_reports_misplaced_keys():
    stage = DownloadStage()
    keys = {p.key for p in stage.check(DownloadConfig(source="modelscope"))}
    assert keys == {"model_id"}
    keys = {p.key for p in stage.check(DownloadConfig(source="local", revision="v1"))}
    assert keys == {"path", "revision"}
    keys = {p.key for p in stage.check(DownloadConfig(source="gguf", path=Path("m.bin")))}
    assert keys == {"path"}
    keys = {p.key for p in stage.check(DownloadConfig(model_id="org/x", dtype="float16"))}
    assert keys == {"dtype"}
    assert stage.check(DownloadConfig(model_id="org/x")) == []


# -- through the recipe engine -----------------------------------------------------------


def test_recipe_plan_shows_origin_and_cache_then_run(hub, tmp_path):
    from typer.testing import CliRunner

    from gcupipe.cli import app
    from gcupipe.engine import Runner
    from gcupipe.recipe import load_recipe

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "version: 1\nname: dl\nstages:\n  download:\n    uses: download\n"
        f"    with: {{source: huggingface, model_id: org/tiny, endpoint: '{hub.url}'}}\n"
    )
    workdir = tmp_path / "work"

    def plan_note() -> str:
        (result,) = Runner(load_recipe(recipe, []), workdir).plan()
        return result.message or ""

    assert "huggingface org/tiny@main from " + hub.url in plan_note()
    assert "not cached" in plan_note()
    assert hub.requests == []
    ran = CliRunner().invoke(app, ["run", str(recipe), "--workdir", str(workdir)])
    assert ran.exit_code == 0, ran.output
    assert "cached at" in plan_note()

    missing = CliRunner().invoke(
        app,
        [
            "run",
            str(recipe),
            "--workdir",
            str(workdir),
            "--force",
            "download",
            "--set",
            "stages.download.with.model_id=org/absent",
        ],
    )
    assert missing.exit_code == 1
    assert "'org/absent' was not found" in missing.output
    assert "Traceback" not in missing.output
