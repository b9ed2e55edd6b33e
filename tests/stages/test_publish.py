"""`uses: publish` with the real huggingface_hub and modelscope clients against the loopback
hub's upload endpoints: a quantized tiny model goes up with its card, comes back byte for byte
through the download stage, a second publish of the same content makes no commit, and an
incomplete bundle, a bad token and a dropped connection end the way a release job needs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("huggingface_hub")
pytest.importorskip("modelscope")

from gcupipe.engine import run_recipe  # noqa: E402
from gcupipe.engine.results import RunResult  # noqa: E402
from gcupipe.engine.selection import Selection  # noqa: E402
from gcupipe.recipe import load_recipe  # noqa: E402
from gcupipe.stages.card import front_matter  # noqa: E402
from gcupipe.testing.loopback_hub import LoopbackHub, isolate_hub_clients  # noqa: E402
from gcupipe.testing.serving import servable_tiny_model  # noqa: E402

HUBS = ["huggingface", "modelscope"]
TOKEN_ENV = {"modelscope": "MODELSCOPE_API_TOKEN", "huggingface": "HF_TOKEN"}
TOKEN = "hub-write-token-123456"
REPO = "org/tiny-w8a8"

RECIPE = """\
version: 1
name: release
stages:
  download:
    uses: download
    needs: []
    with: {{source: local, path: {source}}}
  quantize:
    uses: quantize
    with:
      model: ${{stages.download.outputs.model_dir}}
      method: w8a8
      format: modelslim
      calibration: {{text_file: {calibration}, samples: 4, seq_len: 32}}
  validate:
    uses: validate
    with:
      eval: {{max_tokens: 200, window: 100, stride: 100}}
      agreement_margin: 0.1
  evaluate:
    uses: evaluate
    with: {{limit: 5}}
  publish:
    uses: publish
    needs: [validate, evaluate]
    with:
      hub: {hub}
      repo_id: {repo}
      endpoint: {endpoint}
      retry_backoff_s: 0.01
{extra}"""


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = servable_tiny_model("llama", tmp_path_factory.mktemp("publish") / "tiny")
    (model / "LICENSE").write_text("Apache License 2.0\n")
    (model / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    (model.parent / "calibration.txt").write_text(
        " ".join(f"word{i % 89} of line {i}" for i in range(600))
    )
    return model


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    import huggingface_hub.constants

    isolate_hub_clients(monkeypatch)
    # the real hub prefers Xet storage; the loopback hub speaks the classic LFS batch API
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    for env in TOKEN_ENV.values():
        monkeypatch.setenv(env, TOKEN)
    with LoopbackHub(token=TOKEN) as running:
        yield running


def publish(
    folder: Path, hub: LoopbackHub, name: str, source: Path, run_dir: Path, extra: str = ""
) -> RunResult:
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        RECIPE.format(
            source=source,
            hub=name,
            repo=REPO,
            endpoint=hub.url,
            extra=extra,
            calibration=source.parent / "calibration.txt",
        )
    )
    return run_recipe(load_recipe(recipe), run_dir, Selection(force=["publish"]))


@pytest.mark.parametrize("name", HUBS)
def test_publish_round_trips_with_its_card_and_a_second_publish_makes_no_commit(
    hub, source, tmp_path, name
):
    result = publish(tmp_path, hub, name, source, tmp_path / "run")
    assert result.outcome == "ok", result.error
    out = result.outputs("publish")
    assert out["committed"] is True
    repo = hub.repos[REPO]
    assert repo.private is True and len(repo.commits) == 1
    bundle = Path(out["bundle_dir"])
    for file_name in out["files"]:  # what the hub holds is the bundle, byte for byte
        assert repo.files[file_name] == (bundle / file_name).read_bytes(), file_name
    assert {"tokenizer.json", "LICENSE", "generation_config.json", "README.md"} <= set(repo.files)

    card = (bundle / "README.md").read_text()
    front = front_matter(bundle / "README.md")
    assert front["license"] == "apache-2.0"
    assert {"gcupipe", "quantized", "w8a8", "modelslim"} <= set(front["tags"])
    assert "base_model" not in front  # a local source has no hub id to point at
    validate = result.outputs("validate")
    assert f"{validate['ppl_float']:.4f}" in card and f"{validate['ppl_quantized']:.4f}" in card
    quantize = result.outputs("quantize")
    assert f"vllm serve {REPO} --quantization {quantize['quantization']}" in card
    assert f"llm = LLM(model='{REPO}'" in card
    assert f"`local:{source}`" in card  # the source, its files' digest, the lineage digest
    assert "sha256 of their manifest" in card and "lineage digest" in card
    assert "| `method` | `w8a8` |" in card
    assert "Calibration: 128 tokens (4 x 32)." in card
    assert f"{validate['token_agreement']:.2%}" in card and "Worst layers (SQNR, dB)" in card
    assert "| gcupipe | 0.1.0 |" in card and "| torch | 2.13.0" in card
    (task,) = result.outputs("evaluate")["results"]
    assert "## Task accuracy" in card and "on the reference engine" in card
    float_score = f"{task['float_score']:.4f} ± {task['float_stderr']:.4f}"
    row = f"| validate | botchan_last_word | acc | 5 | {float_score} |"
    assert row in card

    for path in (tmp_path / "run").rglob("*"):  # the token is nowhere in what the run wrote
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path

    # downloaded back through the download stage: the same files
    back = tmp_path / "back.yaml"
    back.write_text(
        "version: 1\nname: back\nstages:\n  download:\n    uses: download\n    with: "
        f"{{source: {name}, model_id: {REPO}, endpoint: '{hub.url}'}}\n"
    )
    fetched = run_recipe(load_recipe(back), tmp_path / "back")
    assert fetched.outcome == "ok", fetched.error
    model_dir = Path(fetched.outputs("download")["model_dir"])
    for file_name in out["files"]:
        assert (model_dir / file_name).read_bytes() == (bundle / file_name).read_bytes()

    # the same content again, from another run directory: nothing uploaded, no commit
    hub.clear()
    again = publish(tmp_path, hub, name, source, tmp_path / "run2")
    assert again.outcome == "ok", again.error
    assert again.outputs("publish")["committed"] is False
    # Hugging Face names the revision's commit; ModelScope's file listing names none
    assert again.outputs("publish")["commit"] in (repo.commit, None if name == "modelscope" else 0)
    assert len(repo.commits) == 1
    assert not [r for r in hub.requests if r.method in ("POST", "PUT")]


@pytest.mark.parametrize("name", HUBS)
def test_an_incomplete_bundle_fails_before_any_upload(hub, source, tmp_path, name):
    first = publish(tmp_path, hub, name, source, tmp_path / "run", extra="      dry_run: true\n")
    assert first.outcome == "ok", first.error
    lacking = tmp_path / "lacking"
    shutil.copytree(first.outputs("quantize")["model_dir"], lacking)
    (lacking / "tokenizer.json").unlink()
    hub.clear()
    result = publish(
        tmp_path, hub, name, source, tmp_path / "run", extra=f"      model: {lacking}\n"
    )
    assert result.outcome == "failed"
    message = str(result.error)
    assert "incomplete, nothing was uploaded: missing tokenizer.json" in message
    assert "\n" not in message
    assert hub.requests == [] and REPO not in hub.repos


@pytest.mark.parametrize("name", HUBS)
def test_a_bad_token_is_one_line_naming_the_variable(hub, source, tmp_path, name, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV[name], "wrong-token")
    result = publish(tmp_path, hub, name, source, tmp_path / "run")
    assert result.outcome == "failed"
    message = str(result.error)
    assert "refused access (HTTP 401)" in message and f"${TOKEN_ENV[name]}" in message
    assert "write" in message and "\n" not in message and "wrong-token" not in message
    assert REPO not in hub.repos


@pytest.mark.parametrize("name", HUBS)
def test_a_dropped_connection_is_retried_to_one_commit(hub, source, tmp_path, name):
    hub.drop_upload_once = {"commit", "blob"}
    result = publish(tmp_path, hub, name, source, tmp_path / "run")
    assert result.outcome == "ok", result.error
    assert hub.drop_upload_once == set()  # both faults happened
    assert len(hub.repos[REPO].commits) == 1
    assert result.outputs("publish")["committed"] is True


def test_a_connection_that_stays_down_is_one_line(hub, source, tmp_path):
    hub.drop_upload_once = {"commit"}
    result = publish(
        tmp_path, hub, "huggingface", source, tmp_path / "run", extra="      retries: 0\n"
    )
    assert result.outcome == "failed"
    message = str(result.error)
    assert "cannot reach" in message and "RemoteProtocolError" in message
    assert "\n" not in message
    assert hub.repos[REPO].commits == []  # nothing half-published: no commit


def test_plan_and_dry_run_say_what_would_go_where(hub, source, tmp_path):
    result = publish(
        tmp_path, hub, "huggingface", source, tmp_path / "run", extra="      dry_run: true\n"
    )
    assert result.outcome == "ok", result.error
    out = result.outputs("publish")
    assert out["commit"] is None and "README.md" in out["files"]
    assert REPO not in hub.repos
    record = json.loads((tmp_path / "run" / "gcupipe.lock.json").read_text())
    assert TOKEN not in json.dumps(record)
