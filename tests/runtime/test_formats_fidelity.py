"""Every method written into every format a target can load: the directory passes every
structural rule, and the runtime's logits match a dequantize-then-float forward of what the
format reader reads back."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from gcupipe.formats.registry import read_quantized  # noqa: E402
from gcupipe.quant.scheme import ActivationScheme  # noqa: E402
from gcupipe.runtime.linear import ReferenceLinear  # noqa: E402
from gcupipe.runtime.model import build_model, load_config  # noqa: E402
from gcupipe.stages.base import StageContext  # noqa: E402
from gcupipe.testing.tiny_models import tiny_model  # noqa: E402
from gcupipe.validation.modeldir import ModelDir  # noqa: E402
from gcupipe.validation.registry import CheckOptions, check_structure  # noqa: E402

from .test_runtime_fidelity import assert_logits_match  # noqa: E402

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


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return tiny_model("qwen2", tmp_path_factory.mktemp("src") / "qwen2")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("method", list(METHODS))
def test_format_round_trip_through_the_runtime(source, method, fmt, tmp_path):
    from gcupipe.stages.quantize import QuantizeConfig, QuantizeStage

    text = tmp_path / "calib.txt"
    text.write_text("a small calibration text about boats, tea and tides. " * 40)
    try:
        config = QuantizeConfig(model=source, format=fmt, **METHODS[method],
                                calibration={"text_file": str(text), "samples": 2,
                                             "seq_len": 32})
    except ValueError as exc:
        pytest.skip(f"{method} into {fmt} is not a valid config: {exc}")
    stage = QuantizeStage()
    problems = stage.check(config)
    if problems:
        pytest.skip(f"{method} into {fmt} is refused at lint time: {problems[0].message}")
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(stage_id="q", output_dir=out, scratch_dir=tmp_path, cache_dir=tmp_path,
                       run_dir=tmp_path, log=lambda message: None)
    outputs = stage.run(config, ctx)

    results = check_structure(ModelDir(out), CheckOptions(
        quantization=outputs.quantization, check_quantization=True,
        kv_cache_int8=bool(outputs.kv_cache_layers) or None))
    assert [r.message for r in results if r.failed] == []

    checkpoint = read_quantized(out)
    assert checkpoint.linears, "the reader found no quantized layer"
    model_config = load_config(out)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got = build_model(model_config, checkpoint.float_tensors, checkpoint.linears,
                          checkpoint.kv_scales)(ids).logits
        want = build_model(model_config, checkpoint.float_tensors, checkpoint.linears,
                           checkpoint.kv_scales,
                           linear_factory=lambda layer, name: ReferenceLinear(layer))(ids).logits
    activation = next(iter(checkpoint.linears.values())).activation
    assert_logits_match(got, want, activation if not checkpoint.kv_scales
                        else ActivationScheme.DYNAMIC)
