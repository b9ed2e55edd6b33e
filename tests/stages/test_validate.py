"""`uses: validate` on tiny models: finds the model upstream, gates, reports, exit code 3."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from gcupipe.errors import GateFailed  # noqa: E402
from gcupipe.stages.base import StageContext  # noqa: E402
from gcupipe.stages.quantize import QuantizeConfig, QuantizeOutputs, QuantizeStage  # noqa: E402
from gcupipe.stages.validate import ValidateConfig, ValidateStage  # noqa: E402
from gcupipe.testing.tiny_models import tiny_model  # noqa: E402


def context(tmp: Path, name: str, upstream: dict | None = None) -> StageContext:
    base = tmp / name
    for sub in ("out", "scratch", "cache", "run"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    return StageContext(
        stage_id=name,
        output_dir=base / "out",
        scratch_dir=base / "scratch",
        cache_dir=base / "cache",
        run_dir=base / "run",
        upstream=upstream or {},
        log=lambda message: None,
    )


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> tuple[Path, QuantizeOutputs]:
    tmp = tmp_path_factory.mktemp("validate-stage")
    source = tiny_model("llama", tmp / "source")
    ctx = context(tmp, "quantize")
    outputs = QuantizeStage().run(
        QuantizeConfig(model=source, method="w8a8_dynamic", format="modelslim"), ctx
    )
    return source, outputs


def test_passes_and_writes_every_report(quantized, tmp_path):
    source, upstream = quantized
    ctx = context(tmp_path, "validate", {"quantize": upstream})
    config = ValidateConfig(
        reference=source,
        eval={"max_tokens": 600, "window": 128, "stride": 128},
        agreement_margin=0.05,
    )
    outputs = ValidateStage().run(config, ctx)
    assert outputs.passed and outputs.failures == []
    assert outputs.model_dir == upstream.model_dir
    assert outputs.quantization == "gcu"
    assert outputs.ppl_increase is not None and abs(outputs.ppl_increase) < 0.05
    assert outputs.token_agreement is not None and outputs.token_agreement >= 0.9
    report = json.loads(outputs.report_json.read_text())
    assert report["passed"] is True
    assert {r["rule"] for r in report["rules"]} >= {"weights-complete", "quantization-flag"}
    assert len(report["metrics"]["sqnr_db"]) == upstream.quantized_layers
    assert "# Validation of" in outputs.report_markdown.read_text()
    assert outputs.junit.read_text().startswith("<?xml")
    assert outputs.sqnr_plot is not None and outputs.sqnr_plot.stat().st_size > 5000


def test_report_files_open_and_the_png_decodes(quantized, tmp_path):
    import xml.etree.ElementTree as ET

    import matplotlib.image

    source, upstream = quantized
    ctx = context(tmp_path, "validate", {"quantize": upstream})
    outputs = ValidateStage().run(ValidateConfig(reference=source, eval={"max_tokens": 300}), ctx)
    suite = ET.parse(outputs.junit).getroot()
    cases = suite.findall("testcase")
    assert suite.get("name") == "gcupipe.validate" and len(cases) == int(suite.get("tests"))
    assert {c.get("name") for c in cases} >= {"ppl-increase", "token-agreement", "group-size"}
    image = matplotlib.image.imread(outputs.sqnr_plot)
    height, width = image.shape[:2]
    assert width >= 400 and height >= 200
    assert image.std() > 0.01  # not a blank canvas: a line and markers were drawn


def test_failed_gate_is_exit_3_naming_rule_and_report(quantized, tmp_path):
    source, upstream = quantized
    ctx = context(tmp_path, "validate", {"quantize": upstream})
    config = ValidateConfig(reference=source, quantization="w4a16", numeric=False)
    with pytest.raises(GateFailed) as info:
        ValidateStage().run(config, ctx)
    assert info.value.exit_code == 3
    message = str(info.value)
    assert "quantization-flag" in message and "'gcu'" in message
    report = Path(message.rsplit("report: ", 1)[1])
    assert report.is_file() and ctx.run_dir in report.parents  # survives the discarded output


def test_gates_fail_on_a_numerically_damaged_model(quantized, tmp_path):
    """Every down_proj scale multiplied by 30: structurally perfect, numerically wrong."""
    from safetensors.torch import load_file, save_file

    source, upstream = quantized
    damaged = tmp_path / "damaged"
    shutil.copytree(upstream.model_dir, damaged)
    shard = next(damaged.glob("quant_model_weight*.safetensors"))
    tensors = load_file(str(shard))
    for name in tensors:
        if name.endswith("mlp.down_proj.weight_scale"):
            tensors[name] = tensors[name] * 30
    save_file(tensors, str(shard), metadata={"format": "pt"})
    ctx = context(tmp_path, "validate")
    config = ValidateConfig(
        model=damaged,
        reference=source,
        max_ppl_increase=None,
        eval={"max_tokens": 400, "window": 128, "stride": 128},
        agreement_margin=0.05,
        min_sqnr_db=20,
        fail=False,
    )
    outputs = ValidateStage().run(config, ctx)
    assert not outputs.passed
    # (a random tiny model's perplexity is near-uniform either way: the ppl gate is exercised
    # on SmolLM2 in tests/validation/test_real_model.py)
    assert "token-agreement" in outputs.failures and "layer-sqnr" in outputs.failures
    report = json.loads(outputs.report_json.read_text())
    assert report["metrics"]["worst_layers"][0].endswith("mlp.down_proj")


def test_the_reference_defaults_to_the_quantize_stages_source(quantized, tmp_path):
    source, upstream = quantized
    assert upstream.source_model_dir == source
    ctx = context(tmp_path, "validate", {"quantize": upstream})
    outputs = ValidateStage().run(ValidateConfig(eval={"max_tokens": 300}), ctx)
    assert outputs.passed and outputs.ppl_float is not None


def test_without_reference_numeric_checks_are_skipped(quantized, tmp_path):
    _, upstream = quantized
    ctx = context(tmp_path, "validate")
    outputs = ValidateStage().run(ValidateConfig(model=upstream.model_dir), ctx)
    assert outputs.passed and outputs.ppl_float is None
    gates = json.loads(outputs.report_json.read_text())["gates"]
    assert all(g["status"] == "skip" for g in gates)


def test_needs_a_model():
    with pytest.raises(Exception, match="no model to check"):
        ValidateStage().run(ValidateConfig(), context(Path("/tmp"), "validate-none"))


RECIPE = """\
version: 1
name: validate-tiny
vars:
  source: {source}
stages:
  quantize:
    uses: quantize
    needs: []
    with:
      model: ${{vars.source}}
      method: w8a8_dynamic
      format: modelslim
  validate:
    uses: validate
    needs: [quantize]
    with:
      reference: ${{vars.source}}
      quantization: {quantization}
      eval: {{max_tokens: 300, window: 128, stride: 128}}
      agreement_margin: 0.05
"""


@pytest.mark.parametrize("quantization", ["gcu", "w4a16"])
def test_recipe_run_through_the_engine(quantized, tmp_path, quantization):
    """The seed flow in a recipe: the right flag passes, the seed guide's w4a16 fails with
    exit code 3 and the report kept under the run directory."""
    from gcupipe.engine import run_recipe
    from gcupipe.recipe import load_recipe

    source, _ = quantized
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(source=source, quantization=quantization))
    run_dir = tmp_path / "run"
    result = run_recipe(load_recipe(recipe), run_dir)
    if quantization == "gcu":
        assert result.outcome == "ok"
        assert result.outputs("validate")["passed"] is True
        return
    assert result.outcome == "failed"
    assert isinstance(result.error, GateFailed) and result.error.exit_code == 3
    assert "quantization-flag" in str(result.error)
    report = Path(str(result.error).rsplit("report: ", 1)[1])
    assert report.is_file() and "'gcu'" in report.read_text()


def test_a_model_that_cannot_run_is_a_failed_check_with_a_report(quantized, tmp_path):
    _, upstream = quantized
    ctx = context(tmp_path, "validate", {"quantize": upstream})
    wrong_reference = tiny_model(
        "qwen2", tmp_path / "other", hidden_size=64, head_dim=16, intermediate_size=128
    )
    outputs = ValidateStage().run(ValidateConfig(reference=wrong_reference, fail=False), ctx)
    assert outputs.failures == ["model-runs"]
    assert "could not be run" in outputs.report_markdown.read_text()


def test_validate_command_outside_a_recipe(quantized, tmp_path, monkeypatch):
    """`gcupipe validate DIR`: the same rules and gates; the seed's flag mistake exits 3."""
    from typer.testing import CliRunner

    from gcupipe.cli import app

    source, upstream = quantized
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    ok = runner.invoke(
        app,
        [
            "validate",
            str(upstream.model_dir),
            "--reference",
            str(source),
            "--quantization",
            "gcu",
            "--eval-tokens",
            "300",
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert "passed" in ok.stdout and "perplexity: float" in ok.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written unasked
    layered = runner.invoke(
        app,
        [
            "validate",
            str(upstream.model_dir),
            "--reference",
            str(source),
            "--eval-tokens",
            "300",
            "--layered",
            "--agreement-margin",
            "0.05",
            "--report",
            "layered",
        ],
    )
    assert layered.exit_code == 0, layered.output
    metrics = json.loads((tmp_path / "layered" / "validation.json").read_text())["metrics"]
    assert metrics["layered"] is True and metrics["confident_positions"] > 0
    wrong = runner.invoke(
        app,
        [
            "validate",
            str(upstream.model_dir),
            "--quantization",
            "w4a16",
            "--report",
            str(tmp_path / "wrong"),
        ],
    )
    assert wrong.exit_code == 3
    assert "quantization-flag" in wrong.stderr and "'gcu'" in wrong.stderr
    missing = runner.invoke(app, ["validate", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "is not a directory" in missing.stderr
