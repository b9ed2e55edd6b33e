"""Hub datasets for calibration: the real ModelScope and Hugging Face clients on a loopback hub."""

from __future__ import annotations

import importlib.util
import json
import urllib.request
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from gcupipe.errors import RecipeError, StageError
from gcupipe.hub.dataset_files import read_texts
from gcupipe.hub.datasets import fetch_dataset_texts, in_split, parse_dataset_spec
from gcupipe.stages.calibration import CalibrationConfig
from gcupipe.testing.loopback_hub import LoopbackHub, isolate_hub_clients

PREFIXES = ["modelscope", "hf"]
TOKEN_ENV = {"modelscope": "MODELSCOPE_API_TOKEN", "hf": "HF_TOKEN"}
TRAIN = ["The first training text of the tiny calibration set.", "A second one, line two."]
TEST = ["Held-out text: never part of the train split."]


def _jsonl(texts: list[str]) -> bytes:
    return "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)).encode()


DATASET = {
    "README.md": b"# tiny calibration set\n",
    "data/train-00000-of-00001.jsonl": _jsonl(TRAIN),
    "data/test-00000-of-00001.jsonl": _jsonl(TEST),
}


@pytest.fixture(autouse=True)
def _isolated_clients(monkeypatch):
    """Short client-side retry waits; none of the user's own hub settings leak in."""
    isolate_hub_clients(monkeypatch)


@pytest.fixture
def hub(monkeypatch):
    with LoopbackHub() as server:
        server.add_dataset("org/calib", DATASET)
        server.add_repo("org/model-only", {"config.json": b"{}"})  # a model, not a dataset
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", server.url)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def fetch(spec: str, cache: Path, split: str = "train", **kwargs) -> list[str]:  # type: ignore[no-untyped-def]
    kwargs.setdefault("retry_backoff_s", 0.01)
    return fetch_dataset_texts(spec, split=split, text_field="text", cache_dir=cache, **kwargs)


@pytest.mark.parametrize("prefix", PREFIXES)
def test_split_texts_come_through_the_real_client(prefix, hub, tmp_path):
    assert fetch(f"{prefix}:org/calib", tmp_path) == TRAIN
    fetched = [r.query.get("FilePath", [r.path])[0] for r in hub.file_requests()]
    assert fetched == ["data/train-00000-of-00001.jsonl"] or fetched == [
        f"/datasets/org/calib/resolve/{hub.datasets['org/calib'].commit}/"
        "data/train-00000-of-00001.jsonl"
    ]  # only the split's file is downloaded
    assert fetch(f"{prefix}:org/calib", tmp_path, split="test") == TEST
    source = "modelscope" if prefix == "modelscope" else "huggingface"
    assert (tmp_path / "hub" / source).is_dir()  # gcupipe's cache, shared with download


def test_huggingface_prefix_and_json_txt_files(hub, tmp_path):
    rows = json.dumps({"rows": [{"text": "from json"}, {"text": "second row"}]}).encode()
    hub.add_dataset(
        "org/mixed",
        {"train.json": rows, "train/notes.txt": b"plain text\n", "test.txt": b"not train"},
    )
    texts = fetch("huggingface:org/mixed", tmp_path)
    assert texts == ["from json", "second row", "plain text\n"]


def test_split_is_a_word_of_the_path():
    assert in_split("data/train-00000-of-00002.parquet", "train")
    assert in_split("train.jsonl", "train") and in_split("train/part1.txt", "train")
    assert in_split("wikitext-2-raw-v1/validation-00000-of-00001.jsonl", "validation")
    assert not in_split("constraints.jsonl", "train")
    assert not in_split("validation.jsonl", "val") and not in_split("latest.jsonl", "test")


@pytest.mark.parametrize("prefix", PREFIXES)
def test_missing_split_lists_the_data_files(prefix, hub, tmp_path):
    with pytest.raises(StageError) as err:
        fetch(f"{prefix}:org/calib", tmp_path, split="validation")
    message = str(err.value)
    assert "no data file of split 'validation'" in message and "\n" not in message
    assert "data/test-00000-of-00001.jsonl, data/train-00000-of-00001.jsonl" in message
    assert "README.md" not in message and "calibration.split" in message


def test_missing_field_names_the_file_and_line(hub, tmp_path):
    lines = _jsonl(["fine"]) + b"\n" + json.dumps({"body": "no text here"}).encode() + b"\n"
    hub.add_dataset("org/bad", {"data/train.jsonl": lines})
    with pytest.raises(StageError) as err:
        fetch("hf:org/bad", tmp_path)
    assert str(err.value) == (
        "dataset hf:org/bad data/train.jsonl:3: no 'text' field (fields: body): "
        "set calibration.text_field"
    )


@pytest.mark.parametrize("prefix", PREFIXES)
def test_parquet_splits_are_read_when_pyarrow_is_installed(prefix, hub, tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import io

    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pyarrow.table({"id": [0, 1], "text": TRAIN}), buffer)
    hub.add_dataset("org/pq", {"data/train-00000-of-00001.parquet": buffer.getvalue()})
    assert fetch(f"{prefix}:org/pq", tmp_path) == TRAIN


def test_parquet_without_pyarrow_says_what_to_install(hub, tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "pyarrow" else find_spec(name, *a),
    )
    hub.add_dataset("org/pq", {"data/train-00000-of-00001.parquet": b"PAR1 not read PAR1"})
    with pytest.raises(StageError, match=r"stored as parquet .*pip install pyarrow"):
        fetch("modelscope:org/pq", tmp_path)
    assert hub.file_requests() == []  # nothing it cannot read is downloaded


@pytest.mark.parametrize("prefix", PREFIXES)
def test_missing_dataset_names_the_id_and_endpoint(prefix, hub, tmp_path):
    for repo_id in ("org/absent", "org/model-only"):
        with pytest.raises(StageError) as err:
            fetch(f"{prefix}:{repo_id}", tmp_path)
        message = str(err.value)
        assert f"dataset '{repo_id}'" in message and f"was not found on {hub.url}" in message
        assert "\n" not in message
    with pytest.raises(StageError, match="revision 'no-such-branch' does not exist"):
        fetch(f"{prefix}:org/calib", tmp_path, revision="no-such-branch")
    assert hub.file_requests() == []


@pytest.mark.parametrize("prefix", PREFIXES)
def test_bad_token_names_the_variable_never_the_token(prefix, hub, tmp_path, monkeypatch):
    hub.token = "right-token"
    monkeypatch.setenv(TOKEN_ENV[prefix], "wrong-token-123")
    with pytest.raises(StageError) as err:
        fetch(f"{prefix}:org/calib", tmp_path)
    message = str(err.value)
    assert "HTTP 401" in message and f"${TOKEN_ENV[prefix]}" in message
    assert "wrong-token-123" not in message and "\n" not in message
    monkeypatch.setenv(TOKEN_ENV[prefix], "right-token")
    assert fetch(f"{prefix}:org/calib", tmp_path) == TRAIN


def test_unreachable_endpoint_is_retried_then_one_line(tmp_path, monkeypatch):
    with LoopbackHub() as dead:
        url = dead.url  # nobody listens there once the hub is closed
    monkeypatch.setenv("HF_ENDPOINT", url)
    logs: list[str] = []
    with pytest.raises(StageError) as err:
        fetch("hf:org/calib", tmp_path, retries=1, log=logs.append)
    message = str(err.value)
    assert f"cannot reach {url}" in message and "after 2 attempt(s)" in message
    assert "\n" not in message and len(logs) == 1


@pytest.mark.parametrize("prefix", PREFIXES)
def test_offline_with_a_warm_cache_makes_zero_requests(prefix, hub, tmp_path):
    with pytest.raises(StageError, match="not in the cache at .* offline is on"):
        fetch(f"{prefix}:org/calib", tmp_path, offline=True)
    assert hub.requests == []
    fetch(f"{prefix}:org/calib", tmp_path)
    hub.clear()
    assert fetch(f"{prefix}:org/calib", tmp_path, offline=True) == TRAIN
    assert hub.requests == []


def test_a_dataset_must_name_its_hub():
    with pytest.raises(RecipeError, match="'modelscope:owner/name' or 'hf:owner/name'"):
        parse_dataset_spec("org/calib")
    with pytest.raises(RecipeError, match="owner/name"):
        parse_dataset_spec("hf:calib")
    assert parse_dataset_spec("huggingface:org/c").source == "huggingface"
    with pytest.raises(ValidationError, match="does not name its hub"):
        CalibrationConfig(dataset="org/calib")
    with pytest.raises(ValidationError, match="dataset_revision"):
        CalibrationConfig(text_file=Path("c.txt"), dataset_revision="v1")


def test_json_rows_errors_name_the_row(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{"text": "ok"}, {"text": 3}]))
    with pytest.raises(StageError, match=r"^x train.json: row 2: 'text' is int, not a string$"):
        read_texts(path, "x train.json", "text")


def test_loopback_dataset_tree_pages_like_modelscope(hub):
    files = {f"data/part-{i:02d}.txt": b"x" for i in range(5)}
    hub.add_dataset("org/paged", files)
    base = f"{hub.url}/api/v1/datasets/org/paged/repo/tree?Revision=master&PageSize=2"
    pages = []
    for number in (1, 2, 3):
        with urllib.request.urlopen(f"{base}&PageNumber={number}", timeout=5) as response:
            pages.append([f["Path"] for f in json.loads(response.read())["Data"]["Files"]])
    assert [len(page) for page in pages] == [2, 2, 1]
    assert sum(pages, []) == sorted(files)


def test_quantize_with_a_hub_dataset_uses_the_same_tokens_as_its_text(hub, tmp_path, monkeypatch):
    """End to end: the quantize stage fetches `hf:` calibration data through the loopback hub
    and calibrates on exactly the tokens the same text gives as a text_file."""
    from gcupipe.quant import calibration as calibration_module
    from gcupipe.stages.base import StageContext
    from gcupipe.stages.quantize import QuantizeConfig, QuantizeStage
    from gcupipe.testing.tiny_models import tiny_model

    model = tiny_model("llama", tmp_path / "llama")
    (tmp_path / "calib.txt").write_text("\n\n".join(TRAIN))
    seen: list[torch.Tensor] = []
    real_batches = calibration_module.calibration_batches

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(real_batches(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(calibration_module, "calibration_batches", recording)
    outputs = {}
    for name, source in (
        ("hub", {"dataset": "hf:org/calib"}),
        ("file", {"text_file": tmp_path / "calib.txt"}),
    ):
        out = tmp_path / f"out-{name}"
        out.mkdir()
        ctx = StageContext(
            "quantize", out, tmp_path / f"scratch-{name}", tmp_path / "cache", tmp_path
        )
        config = QuantizeConfig.model_validate(
            {
                "model": model,
                "method": "w8a8",
                "format": "modelslim",
                "calibration": {**source, "samples": 4, "seq_len": 32},
            }
        )
        assert QuantizeStage().check(config) == []
        QuantizeStage().run(config, ctx)
        outputs[name] = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])
    assert outputs["hub"] == outputs["file"] and outputs["hub"]  # same calibration, same scales
    assert (tmp_path / "cache" / "hub" / "huggingface").is_dir()
