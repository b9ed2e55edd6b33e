"""inspect_model_dir recognises every format from headers alone."""

from __future__ import annotations

import pytest

from gcupipe.formats.inspect import inspect_model_dir, render_inspection
from gcupipe.stages.base import StageContext
from gcupipe.stages.quantize import QuantizeConfig, QuantizeStage
from gcupipe.testing.tiny_models import tiny_model

CASES = [
    ("modelslim", "w8a8_dynamic", {}, "gcu", "W8A8_DYNAMIC"),
    ("modelslim", "w8a16", {"group_size": 64}, "gcu", "W8A16"),
    ("gcu", "w8a16", {}, "gptq", "W8A16"),
    ("gcu", "w4a16", {}, "gptq", "W4A16"),
    ("compressed-tensors", "w8a8_dynamic", {}, None, "W8A8_DYNAMIC"),  # vLLM detects it
]


@pytest.mark.parametrize(("fmt", "method", "extra", "quantization", "kind"), CASES)
def test_inspect_reports_format_method_and_vllm_flag(
    fmt, method, extra, quantization, kind, tmp_path
):
    src = tiny_model("llama", tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext("q", out, tmp_path / "s", tmp_path / "c", tmp_path)
    QuantizeStage().run(QuantizeConfig(model=src, method=method, format=fmt, **extra), ctx)
    info = inspect_model_dir(out)
    assert info.format == fmt
    assert info.quantization == quantization
    assert info.type_counts == {kind: 14}  # 2 layers x 7 linears
    assert info.layer_types["model.layers.1.mlp.down_proj"] == kind
    assert info.group_size == extra.get("group_size", 64 if method == "w4a16" else 0)
    flag = f"--quantization {quantization}" if quantization else "(no --quantization needed)"
    assert any(flag in line for line in info.summary_lines())
    text = render_inspection(info, per_layer=True)
    assert f"model.layers.0.self_attn.q_proj: {kind}" in text
    plain = inspect_model_dir(src)
    assert plain.format == "float" and plain.quantization is None
