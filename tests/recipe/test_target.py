"""The recipe's `target:`: every stage that takes one gets it unless it names its own, and a
combination the target's loaders cannot load is refused at lint, at the key to change."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from gcupipe.errors import RecipeError  # noqa: E402
from gcupipe.recipe import load_recipe  # noqa: E402
from gcupipe.recipe.resolve import lint_notes  # noqa: E402
from gcupipe.testing.tiny_models import tiny_model  # noqa: E402

RECIPE = """version: 1
name: targeted
target: {target}
stages:
  quantize:
    uses: quantize
    with:
      model: {model}
      method: {method}
      format: modelslim
  serve:
    uses: serve
    with:
      model: ${{stages.quantize.outputs.model_dir}}
      target: cpu
"""


def _recipe(tmp_path: Path, target: str, method: str) -> Path:
    model = tiny_model("llama", tmp_path / "model")
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(target=target, model=model, method=method))
    return path


def test_stages_inherit_the_recipe_target_unless_they_name_their_own(tmp_path: Path) -> None:
    recipe = load_recipe(_recipe(tmp_path, "ascend", "w8a8_dynamic"), environ={})
    assert recipe.stages["quantize"].config["target"] == "ascend"
    assert recipe.stages["serve"].config["target"] == "cpu"
    assert lint_notes(recipe) == [
        ("quantize", "for ascend (vllm-ascend): serve with --quantization ascend")
    ]


def test_what_the_target_cannot_load_is_refused_at_lint_naming_its_loader(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as caught:
        load_recipe(_recipe(tmp_path, "ascend", "w4a16"), environ={})
    message = str(caught.value)
    assert "recipe.yaml:9:7: stages.quantize.with.method: target ascend:" in message
    assert "vllm-ascend registers no W4A16 scheme for linears" in message
