"""The recipe language's positive behaviour: composition, interpolation, overrides, matrix."""

from __future__ import annotations

from pathlib import Path

import pytest

from gcupipe.errors import RecipeError
from gcupipe.recipe import load_recipe
from gcupipe.secrets import REDACTED, redact


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_extends_deep_merges_maps_and_replaces_lists(tmp_path: Path) -> None:
    write(
        tmp_path / "configs/base.yaml",
        """
version: 1
name: base
vars: {greeting: hello, tags: [a, b]}
stages:
  make:
    uses: command
    with: {run: "echo base", env: {A: "1", B: "2"}}
""",
    )
    recipe = load_recipe(
        write(
            tmp_path / "recipes/r.yaml",
            """
extends: ../configs/base.yaml
name: child
vars: {tags: [c]}
stages:
  make:
    with: {env: {B: "3"}}
""",
        ),
        environ={},
    )
    stage = recipe.stages["make"]
    assert recipe.name == "child"
    assert stage.config == {"run": "echo base", "env": {"A": "1", "B": "3"}}
    assert recipe.document["vars"] == {"greeting": "hello", "tags": ["c"]}


def test_include_mounts_a_fragment_at_a_key_path(tmp_path: Path) -> None:
    write(tmp_path / "gates.yaml", "env: {GATE: strict}\ntimeout_s: 5\n")
    recipe = load_recipe(
        write(
            tmp_path / "r.yaml",
            """
version: 1
name: r
include:
  - {file: gates.yaml, at: stages.make.with}
stages:
  make:
    uses: command
    with: {run: "true", timeout_s: 9}
""",
        ),
        environ={},
    )
    assert recipe.stages["make"].config == {
        "env": {"GATE": "strict"},
        "timeout_s": 9,
        "run": "true",
    }


def test_a_mounted_fragment_keeps_the_recipes_stage_order(tmp_path: Path) -> None:
    write(tmp_path / "second.yaml", "run: echo fragment\n")
    recipe = load_recipe(
        write(
            tmp_path / "r.yaml",
            """
version: 1
name: r
include:
  - {file: second.yaml, at: stages.second.with}
stages:
  first:
    uses: command
    with: {run: "true"}
  second:
    uses: command
""",
        ),
        environ={},
    )
    assert list(recipe.stages) == ["first", "second"]
    assert recipe.stages["second"].needs == ["first"]
    assert recipe.stages["second"].config == {"run": "echo fragment"}


def test_interpolation_keeps_types_and_escapes(tmp_path: Path) -> None:
    recipe = load_recipe(
        write(
            tmp_path / "r.yaml",
            """
version: 1
name: r
vars: {seconds: 7, who: "${env:WHO,nobody}", both: "${vars.who}-${vars.seconds}"}
stages:
  make:
    uses: command
    with: {run: "echo ${vars.both} $${literal}", timeout_s: "${vars.seconds}"}
""",
        ),
        environ={"WHO": "ops"},
    )
    config = recipe.stages["make"].config
    assert config["timeout_s"] == 7
    assert config["run"] == "echo ops-7 $${literal}"  # unescaped when the stage runs


def test_precedence_extends_recipe_environment_set(tmp_path: Path) -> None:
    write(
        tmp_path / "base.yaml", "stages: {make: {uses: command, with: {run: base, timeout_s: 1}}}\n"
    )
    path = write(
        tmp_path / "r.yaml",
        """
extends: base.yaml
version: 1
name: r
stages: {make: {with: {run: recipe}}}
""",
    )
    env = {"GCUPIPE__stages__make__with__run": "environment"}
    assert load_recipe(path, environ={}).stages["make"].config["run"] == "recipe"
    assert load_recipe(path, environ=env).stages["make"].config["run"] == "environment"
    recipe = load_recipe(path, ["stages.make.with.run=cli", "stages.make.with.timeout_s=64"], env)
    assert recipe.stages["make"].config == {"run": "cli", "timeout_s": 64}


def test_set_errors_point_at_the_override(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.yaml",
        "version: 1\nname: r\nstages: {make: {uses: command, with: {run: x}}}\n",
    )
    with pytest.raises(RecipeError, match=r"^--set: stages.make.with.timeout_s: Input should be"):
        load_recipe(path, ["stages.make.with.timeout_s=soon"], environ={})


def test_matrix_github_semantics(tmp_path: Path) -> None:
    recipe = load_recipe(
        write(
            tmp_path / "r.yaml",
            """
version: 1
name: r
stages:
  quantize:
    uses: command
    matrix:
      method: [gptq, awq]
      group_size: [64, 128]
      exclude: [{method: awq, group_size: 128}]
      include:
        - {method: gptq, act_order: true}
        - {method: w8a16, group_size: 0}
    with: {run: "q ${matrix.method} ${matrix.group_size}"}
  validate:
    uses: command
    with: {run: "v ${stages.quantize.outputs.output_dir}"}
""",
        ),
        environ={},
    )
    ids = list(recipe.stages)
    assert ids[:4] == [
        "quantize[method=gptq,group_size=64,act_order=true]",
        "quantize[method=gptq,group_size=128,act_order=true]",
        "quantize[method=awq,group_size=64]",
        "quantize[method=w8a16,group_size=0]",
    ]
    assert recipe.stages[ids[3]].config == {"run": "q w8a16 0"}
    # a stage that needs a matrix stage runs once per combination, wired to its own variant
    validate = recipe.stages["validate[method=awq,group_size=64]"]
    assert validate.needs == ["quantize[method=awq,group_size=64]"]


def test_stage_reference_adds_the_dependency(tmp_path: Path) -> None:
    recipe = load_recipe(
        write(
            tmp_path / "r.yaml",
            """
version: 1
name: r
stages:
  a: {uses: command, with: {run: "true"}}
  b: {uses: command, needs: [], with: {run: "true"}}
  c: {uses: command, needs: [b], with: {run: "ls ${stages.a.outputs.output_dir}"}}
""",
        ),
        environ={},
    )
    assert recipe.stages["b"].needs == []
    assert recipe.stages["c"].needs == ["b", "a"]


def test_secrets_from_the_environment_are_redacted(tmp_path: Path) -> None:
    recipe = load_recipe(
        write(
            tmp_path / "r.yaml",
            """
version: 1
name: r
stages:
  a: {uses: command, with: {run: "curl -H ${env:HUB_TOKEN}", env: {USER: "${env:USER_NAME}"}}}
""",
        ),
        environ={"HUB_TOKEN": "s3cr3t-value", "USER_NAME": "alice"},
    )
    text = redact(str(recipe.stages["a"].config))
    assert "s3cr3t-value" not in text and REDACTED in text
    assert "alice" in text  # not a secret-looking name
