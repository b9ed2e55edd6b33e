"""Every shipped recipe lints and plans; the heavy ones run quantize + validate on tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest

from gcupipe.engine import Runner, Selection, run_recipe
from gcupipe.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
SCHEMA_LINE = "# yaml-language-server: $schema=../gcupipe.schema.json"
ENV = {"CALIBRATION_TEXT": "calibration.txt"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_lints_and_plans(recipe: Path, tmp_path: Path) -> None:
    assert recipe.read_text().splitlines()[0] == SCHEMA_LINE
    loaded = load_recipe(recipe, [], environ=ENV)
    plan = Runner(loaded, tmp_path / "run").plan()
    assert [r.outcome for r in plan] == ["run"] * len(plan)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_release_matrix_validates_each_combination() -> None:
    loaded = load_recipe(ROOT / "recipes/release-matrix.yaml", [], environ=ENV)
    validates = [sid for sid in loaded.stages if sid.startswith("validate[")]
    assert len(validates) == 4
    for sid in validates:
        assert loaded.stages[sid].needs[0] == sid.replace("validate", "quantize", 1)
    publishes = [sid for sid in loaded.stages if sid.startswith("publish[")]
    assert len(publishes) == 4
    for sid in publishes:  # published only after its own combination passed its gates
        assert sid.replace("publish", "validate", 1) in loaded.stages[sid].needs


def _tiny_run(recipe: str, arch: str, tmp_path: Path, extra: list[str] = ()) -> dict:
    pytest.importorskip("torch")
    from gcupipe.testing.tiny_models import tiny_model

    model = tiny_model(arch, tmp_path / arch)
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(" ".join(f"word{i % 97} and the {i} thing" for i in range(600)))
    overrides = [
        "stages.download.with.source=local",
        f"stages.download.with.path={model}",
        "stages.download.with.model_id=null",
        "stages.download.with.revision=null",
        # tiny random models: the point is that the recipe's settings run on the architecture,
        # so the numeric gates only report and the budgets are small
        "stages.validate.with.fail=false",
        "stages.validate.with.eval={max_tokens: 256, window: 128, stride: 128}",
        "stages.validate.with.sqnr_tokens=64",
        *extra,
    ]
    loaded = load_recipe(
        ROOT / "recipes" / recipe, overrides, environ={"CALIBRATION_TEXT": str(calibration)}
    )
    result = run_recipe(loaded, tmp_path / "run", Selection(to_stage="validate"))
    assert result.outcome == "ok", result.error
    assert [s.id for s in result.stages if s.outcome == "ran"] == [
        "download",
        "quantize",
        "validate",
    ]
    return result.outputs("validate")


def test_deepseek_recipe_quantizes_and_validates_moe_mla(tmp_path: Path) -> None:
    validate = _tiny_run("deepseek-w8a8.yaml", "deepseek_v2", tmp_path)
    assert validate["format"] == "modelslim"
    assert validate["quantization"] == "gcu"
    structural = [
        f
        for f in validate["failures"]
        if f not in ("ppl-increase", "token-agreement", "layer-sqnr")
    ]
    assert structural == []
    assert validate["ppl_increase"] is not None


@pytest.mark.parametrize(
    ("recipe", "arch", "layout"),
    [
        ("mistral-w8a16.yaml", "mistral", "modelslim"),
        ("llama3-w8a8-kv-int8.yaml", "llama", "gcu"),
        ("llama3-gptq-w4a16.yaml", "llama", "gcu"),
        ("qwen2-awq-w4a16.yaml", "qwen2", "gcu"),
    ],
)
def test_heavy_recipe_runs_on_a_tiny_model(
    recipe: str, arch: str, layout: str, tmp_path: Path
) -> None:
    extra = [
        "stages.quantize.with.calibration.samples=4",
        "stages.quantize.with.calibration.seq_len=32",
    ]
    if "w8a16" in recipe:
        extra = []  # no calibration stage settings in an uncalibrated method
    validate = _tiny_run(recipe, arch, tmp_path, extra)
    assert validate["format"] == layout
    structural = [
        f
        for f in validate["failures"]
        if f not in ("ppl-increase", "token-agreement", "layer-sqnr")
    ]
    assert structural == []
