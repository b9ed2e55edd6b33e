"""Layer-by-layer perplexity (for models larger than RAM) equals the whole-model runtime's, and
the format readers it uses read a decoder layer's tensors only when that layer is built."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from gcupipe.formats.base import read_tensors  # noqa: E402
from gcupipe.formats.registry import read_quantized  # noqa: E402
from gcupipe.runtime.layered import (  # noqa: E402
    _LAYER,
    _QuantizedSource,
    layered_perplexity,
)
from gcupipe.runtime.load import load_model  # noqa: E402
from gcupipe.runtime.perplexity import perplexity  # noqa: E402
from gcupipe.stages.base import StageContext  # noqa: E402
from gcupipe.testing.tiny_models import tiny_model  # noqa: E402

IDS = [random.Random(0).randrange(256) for _ in range(400)]


def _quantize(source: Path, out: Path, **config) -> Path:
    from gcupipe.stages.quantize import QuantizeConfig, QuantizeStage

    out.mkdir()
    ctx = StageContext(
        stage_id="q",
        output_dir=out,
        scratch_dir=out.parent,
        cache_dir=out.parent,
        run_dir=out.parent,
        log=lambda message: None,
    )
    QuantizeStage().run(QuantizeConfig(model=source, **config), ctx)
    return out


CASES = {
    "llama-float": ("llama", None),
    "qwen2-w8a8_dynamic": ("qwen2", {"method": "w8a8_dynamic"}),
    "deepseek_v2-w8a8_dynamic": ("deepseek_v2", {"method": "w8a8_dynamic"}),
    "llama-w8a8-static-kv": (
        "llama",
        {"method": "w8a8", "kv_cache": {"dtype": "int8"}, "target": "ascend"},
    ),
    "llama-gcu-w8a8-kv": (
        "llama",
        {"method": "w8a8", "format": "gcu", "kv_cache": {"dtype": "int8"}},
    ),
    "qwen2-gcu-w4a16": ("qwen2", {"method": "w4a16", "group_size": 64, "format": "gcu"}),
    "llama-compressed-tensors-w4a16": (
        "llama",
        {"method": "w4a16", "group_size": 64, "format": "compressed-tensors"},
    ),
    "deepseek_v2-compressed-tensors-w8a8_dynamic": (
        "deepseek_v2",
        {"method": "w8a8_dynamic", "format": "compressed-tensors"},
    ),
}
QUANTIZED = [case for case, (_arch, quant) in CASES.items() if quant is not None]


def _model(case: str, tmp_path: Path) -> Path:
    arch, quant = CASES[case]
    path = tiny_model(arch, tmp_path / "src", shards=2)
    if quant is None:
        return path
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    calibration = {"text_file": str(text), "samples": 2, "seq_len": 32}
    return _quantize(
        path, tmp_path / "q", **{"format": "modelslim", "calibration": calibration, **quant}
    )


@pytest.mark.parametrize("case", list(CASES))
def test_layered_equals_whole_model(case, tmp_path):
    path = _model(case, tmp_path)
    layers_seen = []
    layered = layered_perplexity(
        path, IDS, window=96, stride=96, on_layer=lambda i, n: layers_seen.append(i)
    )
    whole = perplexity(load_model(path).model, IDS, window=96, stride=96)
    assert layers_seen == [0, 1]
    assert layered.scored_tokens == whole.scored_tokens
    assert layered.ppl == pytest.approx(whole.ppl, rel=1e-6)


def test_one_pass_scores_every_position_as_the_whole_model_does(tmp_path):
    """The same per-position scores (true-token log-prob, top-1, lead) as the whole-model
    evaluator: both run the same arithmetic, so the top-1 choices agree wherever they are not
    near-ties of float rounding."""
    path = _model("llama-w8a8-static-kv", tmp_path)
    layered = layered_perplexity(path, IDS, window=96, stride=64).positions
    whole = perplexity(load_model(path).model, IDS, window=96, stride=64).positions
    assert len(layered.top1) == len(whole.top1) == len(IDS) - 1
    assert layered.target_logprob == pytest.approx(whole.target_logprob, abs=1e-4)
    assert layered.margin == pytest.approx(whole.margin, abs=1e-4)
    clear = [i for i, lead in enumerate(whole.margin) if lead > 1e-3]
    assert len(clear) > 0.9 * len(IDS)
    assert [layered.top1[i] for i in clear] == [whole.top1[i] for i in clear]


def _same(a, b) -> None:
    if dataclasses.is_dataclass(a):
        assert type(a) is type(b)
        for f in dataclasses.fields(a):
            _same(getattr(a, f.name), getattr(b, f.name))
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _same(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("case", QUANTIZED)
def test_reading_a_part_at_a_time_gives_exactly_the_eager_checkpoint(case, tmp_path):
    from safetensors.torch import load_file

    path = _model(case, tmp_path)
    files = sorted(path.glob("*.safetensors"))
    eager_files = {}
    for file in files:
        eager_files.update(load_file(str(file)))
    _same(read_tensors(files), eager_files)

    eager = read_quantized(path)
    parts = [read_quantized(path, lambda n: _LAYER.match(n) is None)]
    parts += [
        read_quantized(path, lambda n, i=i: n.startswith(f"model.layers.{i}.")) for i in (0, 1)
    ]
    assert not parts[0].linears and all(p.linears for p in parts[1:])
    # the label (method, group size) of compressed-tensors comes from the linears read
    merged = dataclasses.replace(parts[-1], float_tensors={}, linears={}, kv_scales=[])
    for part in parts:
        merged.float_tensors.update(part.float_tensors)
        merged.linears.update(part.linears)
    scales = {s.layer_index: s for p in parts for s in p.kv_scales}
    merged.kv_scales = [scales[i] for i in sorted(scales)]
    _same(merged, eager)


def test_a_layer_is_read_only_when_it_is_asked_for(tmp_path, monkeypatch):
    import safetensors

    path = _model("llama-w8a8-static-kv", tmp_path)
    read: list[str] = []
    real_open = safetensors.safe_open

    class Counting:
        def __init__(self, *args, **kwargs):
            self.handle = real_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, name):
            read.append(name)
            return self.inner.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", Counting)
    source = _QuantizedSource(path)
    assert source.num_layers == 2
    assert read and not [n for n in read if n.startswith("model.layers.")]
    read.clear()
    floats, linears, kv = source.layer(1)
    assert read and all(n.startswith("model.layers.1.") for n in read)
    assert "self_attn.q_proj" in linears and "input_layernorm.weight" in floats
    assert kv is not None
