"""Every method written into every format a target can load: the directory passes every
structural rule, the format reader gives back what the quantizer produced, and the runtime's
integer kernels compute what a dequantize-then-float forward of it computes."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from gcupipe.formats.format import Format  # noqa: E402
from gcupipe.formats.modeldir import ModelDir  # noqa: E402
from gcupipe.formats.registry import read_quantized  # noqa: E402
from gcupipe.formats.results import CheckOptions  # noqa: E402
from gcupipe.runtime.linear import ReferenceLinear  # noqa: E402
from gcupipe.runtime.model import build_model, load_config  # noqa: E402
from gcupipe.stages.base import StageContext  # noqa: E402
from gcupipe.testing.tiny_models import tiny_model  # noqa: E402
from gcupipe.validation.rules import check_structure  # noqa: E402

METHODS = {
    "w8a16": {"method": "w8a16"},
    "w8a8_dynamic": {"method": "w8a8_dynamic"},
    "w8a8": {"method": "w8a8"},
    "w8a8+int8kv": {"method": "w8a8", "kv_cache": {"dtype": "int8"}},
    "w4a16": {"method": "w4a16", "group_size": 64},
    "gptq": {"method": "gptq", "group_size": 64},
    "awq": {"method": "awq", "group_size": 64},
}
FORMATS = ["modelslim", "gcu", "compressed-tensors"]
REFUSED = {
    ("w8a8_dynamic", "gcu"): "the gcu layouts have no dynamic W8A8",
    ("w8a8+int8kv", "compressed-tensors"): "vLLM reads only fp8 KV-cache scales",
}
"""What lint refuses, and why: every other method x format pair must round-trip."""
TARGET = {("w8a8+int8kv", "modelslim"): "ascend"}
"""The target a pair is written for, where the format's own would refuse it (the C8 KV cache is
vllm-ascend's alone)."""
LEGAL = [(m, f) for m in METHODS for f in FORMATS if (m, f) not in REFUSED]
FP16_SCALES = {("gptq", "gcu"), ("awq", "gcu"), ("w4a16", "gcu"), ("w8a16", "gcu")}
"""The GPTQ/AWQ layouts store scales in fp16: the read-back differs by that rounding."""


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return tiny_model("qwen2", tmp_path_factory.mktemp("src") / "qwen2")


def _config(source: Path, method: str, fmt: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    from gcupipe.stages.quantize import QuantizeConfig

    text = tmp_path / "calib.txt"
    text.write_text("a small calibration text about boats, tea and tides. " * 40)
    calibration = {"text_file": str(text), "samples": 2, "seq_len": 32}
    target = TARGET.get((method, fmt))
    return QuantizeConfig(
        model=source, format=fmt, calibration=calibration, target=target, **METHODS[method]
    )


@pytest.mark.parametrize(("method", "fmt"), sorted(REFUSED))
def test_refused_combinations_are_refused_at_lint_with_the_reason(source, method, fmt, tmp_path):
    from gcupipe.stages.quantize import QuantizeStage

    problems = QuantizeStage().check(_config(source, method, fmt, tmp_path))
    assert problems and REFUSED[(method, fmt)] in problems[0].message


@pytest.mark.parametrize(("method", "fmt"), LEGAL)
def test_format_round_trip_through_the_runtime(source, method, fmt, tmp_path, monkeypatch):
    from gcupipe.stages.quantize import QuantizeStage

    config = _config(source, method, fmt, tmp_path)
    stage = QuantizeStage()
    assert stage.check(config) == []
    written = _record_writes(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(
        stage_id="q",
        output_dir=out,
        scratch_dir=tmp_path,
        cache_dir=tmp_path,
        run_dir=tmp_path,
        log=lambda message: None,
    )
    outputs = stage.run(config, ctx)

    results = check_structure(
        ModelDir(out),
        CheckOptions(
            quantization=outputs.quantization,
            check_quantization=True,
            kv_cache_int8=bool(outputs.kv_cache_layers) or None,
            target=outputs.target,
        ),
    )
    assert [r.message for r in results if r.failed] == []

    # the reader gives back what the quantizer handed the writer
    checkpoint = read_quantized(out)
    assert set(checkpoint.linears) == set(written["linears"]) != set()
    tolerance = (
        {"rtol": 1e-3, "atol": 1e-6}
        if (method, fmt) in FP16_SCALES
        else {"rtol": 1e-6, "atol": 1e-9}
    )
    for prefix, layer in written["linears"].items():
        back = checkpoint.linears[prefix]
        assert back.activation is layer.activation, prefix
        torch.testing.assert_close(back.dequantize(), layer.dequantize(), **tolerance)
        if layer.input_scale is not None:
            torch.testing.assert_close(back.input_scale.float(), layer.input_scale.float())
    for name, tensor in written["floats"].items():
        torch.testing.assert_close(
            checkpoint.float_tensors[name].float(), tensor.float(), **tolerance
        )
    assert len(checkpoint.kv_scales) == len(written["kv"])

    # the runtime's integer kernels compute the dequantize-then-float forward: in float64 on
    # both sides no activation rounding moves, so any kernel slip shows above 1e-9 (static
    # W8A8 multiplies by deq_scale as the format stores it, in float32: 1e-5 of the largest
    # logit covers that rounding)
    model_config = load_config(out)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got = build_model(
            model_config,
            checkpoint.float_tensors,
            checkpoint.linears,
            checkpoint.kv_scales,
            dtype="float64",
        )(ids).logits
        want = build_model(
            model_config,
            checkpoint.float_tensors,
            checkpoint.linears,
            checkpoint.kv_scales,
            dtype="float64",
            linear_factory=lambda layer, name: ReferenceLinear(layer),
        )(ids).logits
    static = METHODS[method]["method"] == "w8a8"
    atol = 1e-5 * float(want.abs().max()) if static else 1e-9
    torch.testing.assert_close(got, want, rtol=0, atol=atol)


def _record_writes(monkeypatch) -> dict:  # type: ignore[no-untyped-def]
    """Make the quantize stage's writer also keep what it is handed, unchanged."""
    written: dict = {"linears": {}, "floats": {}, "kv": []}
    plain = Format.writer

    def recording_writer(fmt: Format):  # type: ignore[no-untyped-def]
        base = plain(fmt)

        class Recording(base):  # type: ignore[misc,valid-type]
            def add_linear(self, prefix, layer):  # type: ignore[no-untyped-def]
                written["linears"][prefix] = layer
                super().add_linear(prefix, layer)

            def add_float(self, name, tensor):  # type: ignore[no-untyped-def]
                written["floats"][name] = tensor.clone()
                super().add_float(name, tensor)

            def add_kv_cache(self, attn_prefix, scale, kv_channels):  # type: ignore[no-untyped-def]
                written["kv"].append(scale)
                super().add_kv_cache(attn_prefix, scale, kv_channels)

        return Recording

    monkeypatch.setattr(Format, "writer", recording_writer)
    return written
