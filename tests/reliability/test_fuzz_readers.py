"""The artifact readers under hypothesis-driven corruption: a damaged file is one problem
sentence or a failed validation rule, never a traceback, a hang, or an allocation of the size a
header claims.

- safetensors headers (`read_safetensors_header`, under every rule, inspect and estimate):
  random bytes; a valid file truncated anywhere; the header length overwritten; header entries
  with unknown dtypes, shapes of huge or negative or non-integer dimensions, offsets that do not
  match the shape, non-UTF-8 and very long names.
- the JSON files a model directory carries (config.json, quant_model_description.json,
  quantize_config.json, int8_kv_cache.json): random bytes and random JSON values, through every
  structural rule and format detection of a real W8A8 modelslim directory.

500 examples per reader (each JSON file is a reader of its own).
- GGUF (what `plan --estimate` and the gguf download read through transformers): the real
  SmolLM2 file cut anywhere in its first 300 KB, with bytes of its header flipped.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

pytest.importorskip("torch")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gcupipe.formats.modeldir import (  # noqa: E402
    SAFETENSORS_DTYPE_BYTES,
    ModelDir,
    read_safetensors_header,
)
from gcupipe.formats.registry import format_of  # noqa: E402
from gcupipe.validation.rules import check_structure  # noqa: E402
from tests.helpers import quantize  # noqa: E402

EXAMPLES = settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _safetensors(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


VALID = _safetensors(
    {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
     "b": {"dtype": "I8", "shape": [4], "data_offsets": [24, 28]}},
    bytes(28),
)  # fmt: skip

dimension = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70), st.floats(), st.text(max_size=3), st.none()
)
entry = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.one_of(st.sampled_from(sorted(SAFETENSORS_DTYPE_BYTES)), st.text(max_size=8)),
        "shape": st.one_of(st.lists(dimension, max_size=4), dimension),
        "data_offsets": st.one_of(st.lists(dimension, max_size=3), dimension),
    },
)
names = st.text(min_size=1, max_size=300)  # surrogates included: names need not be valid UTF-8

corrupt_file = st.one_of(
    st.binary(max_size=512),
    st.integers(min_value=0, max_value=len(VALID) - 1).map(lambda n: VALID[:n]),
    st.integers(min_value=0, max_value=2**64 - 1).map(lambda n: struct.pack("<Q", n) + VALID[8:]),
    st.tuples(st.dictionaries(names, entry, max_size=4), st.binary(max_size=64)).map(
        lambda pair: _safetensors(pair[0], pair[1])
    ),
)


@EXAMPLES
@given(content=corrupt_file)
def test_a_corrupt_safetensors_header_is_one_problem_sentence(tmp_path: Path, content: bytes):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    infos, problem = read_safetensors_header(path)
    assert problem is None or (isinstance(problem, str) and "\n" not in problem)
    if problem is None:  # then what it believed is true of the file
        for info in infos.values():
            assert info.dtype in SAFETENSORS_DTYPE_BYTES
            assert all(isinstance(d, int) and d >= 0 for d in info.shape)


@pytest.fixture(scope="module")
def good_modelslim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gcupipe.testing.tiny_models import tiny_model

    root = tmp_path_factory.mktemp("fuzz")
    source = tiny_model("llama", root / "tiny")
    return quantize(source, root / "w8a8", method="w8a8_dynamic", format="modelslim")


JSON_FILES = [
    "config.json",
    "quant_model_description.json",
    "quantize_config.json",
    "int8_kv_cache.json",
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=20), children, max_size=4)
    ),
    max_leaves=12,
)
json_content = st.one_of(
    st.binary(max_size=256),
    json_values.map(lambda value: json.dumps(value).encode()),
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, good_modelslim: Path) -> Path:
    """One working copy of the good directory; each example replaces one file, then puts the
    original back (the weights are links: only read)."""
    model = tmp_path_factory.mktemp("case") / "model"
    shutil.copytree(good_modelslim, model, copy_function=_link_or_copy)
    return model


@pytest.mark.parametrize("name", JSON_FILES)
@EXAMPLES
@given(content=json_content)
def test_a_corrupt_json_file_fails_rules_never_raises(
    good_modelslim: Path, workdir: Path, name: str, content: bytes
):
    target = workdir / name
    target.unlink(missing_ok=True)
    target.write_bytes(content)
    try:
        md = ModelDir(workdir)
        format_of(md)
        results = check_structure(md)
    finally:
        target.unlink()
        if (good_modelslim / name).is_file():
            shutil.copy2(good_modelslim / name, target)
    assert results and all(r.status in ("pass", "fail", "skip") for r in results)
    for result in results:  # a crashed rule is reported, not raised, and says what it was
        assert all("\n" not in finding.message for finding in result.findings)
    if name in ("config.json", "quant_model_description.json"):
        try:
            parsed = json.loads(content)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):  # not an object: the directory cannot be served
            assert any(r.failed for r in results), name


def _link_or_copy(src: str, dst: str) -> None:
    """Weights are only read: link them; the JSON files are replaced, never edited in place."""
    if src.endswith(".safetensors"):
        Path(dst).hardlink_to(src)
    else:
        shutil.copy2(src, dst)


@pytest.fixture(scope="module")
def gguf_head() -> bytes:
    """The first 300 KB of the SmolLM2 GGUF the quickstart converts: header and metadata."""
    from gcupipe.testing.real_data import smollm2_gguf_path

    with smollm2_gguf_path().open("rb") as handle:
        return handle.read(300_000)


@EXAMPLES
@given(
    cut=st.integers(min_value=0, max_value=300_000),
    flips=st.lists(st.tuples(st.integers(0, 4095), st.integers(1, 255)), max_size=8),
)
def test_a_damaged_gguf_is_one_stage_error(
    tmp_path_factory: pytest.TempPathFactory, gguf_head: bytes, cut: int, flips: list
):
    from gcupipe.errors import StageError
    from gcupipe.stages.download import gguf_model_shape

    data = bytearray(gguf_head[:cut])
    for at, mask in flips:
        if at < len(data):
            data[at] ^= mask
    path = tmp_path_factory.mktemp("gguf") / "model.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(StageError) as err:  # a cut file never holds every tensor
        gguf_model_shape(path)
    assert "\n" not in str(err.value)
