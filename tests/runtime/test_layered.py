"""Layer-by-layer perplexity (for models larger than RAM) equals the whole-model runtime's."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from gcupipe.runtime.layered import layered_perplexity  # noqa: E402
from gcupipe.runtime.load import load_model  # noqa: E402
from gcupipe.runtime.perplexity import perplexity  # noqa: E402
from gcupipe.stages.base import StageContext  # noqa: E402
from gcupipe.testing.tiny_models import tiny_model  # noqa: E402

IDS = [random.Random(0).randrange(256) for _ in range(400)]


def _quantize(source: Path, out: Path, **config) -> Path:
    from gcupipe.stages.quantize import QuantizeConfig, QuantizeStage

    out.mkdir()
    ctx = StageContext(stage_id="q", output_dir=out, scratch_dir=out.parent,
                       cache_dir=out.parent, run_dir=out.parent, log=lambda message: None)
    QuantizeStage().run(QuantizeConfig(model=source, **config), ctx)
    return out


CASES = {
    "llama-float": ("llama", None),
    "qwen2-w8a8_dynamic": ("qwen2", {"method": "w8a8_dynamic"}),
    "deepseek_v2-w8a8_dynamic": ("deepseek_v2", {"method": "w8a8_dynamic"}),
    "llama-w8a8-static-kv": ("llama", {"method": "w8a8", "kv_cache": {"dtype": "int8"}}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_layered_equals_whole_model(case, tmp_path):
    arch, quant = CASES[case]
    path = tiny_model(arch, tmp_path / "src", shards=2)
    if quant is not None:
        text = tmp_path / "calib.txt"
        text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
        path = _quantize(path, tmp_path / "q", format="modelslim",
                         calibration={"text_file": str(text), "samples": 2, "seq_len": 32},
                         **quant)
    layers_seen = []
    layered = layered_perplexity(path, IDS, window=96, stride=96,
                                 on_layer=lambda i, n: layers_seen.append(i))
    whole = perplexity(load_model(path).model, IDS, window=96, stride=96)
    assert layers_seen == [0, 1]
    assert layered.scored_tokens == whole.scored_tokens
    assert layered.ppl == pytest.approx(whole.ppl, rel=1e-6)
