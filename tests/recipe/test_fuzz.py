"""Random YAML never makes the loader crash: every failure is a RecipeError with a position."""

from __future__ import annotations

import string
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gcupipe.errors import RecipeError
from gcupipe.recipe import load_recipe

KEYS = [
    "version",
    "name",
    "stages",
    "vars",
    "extends",
    "include",
    "uses",
    "needs",
    "with",
    "cache",
    "matrix",
    "run",
    "env",
    "timeout_s",
    "make",
    "test",
    "include",
    "exclude",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.floats(allow_nan=False, width=16),
    st.sampled_from(
        [
            "command",
            "make",
            "${vars.x}",
            "${env:HOME}",
            "${stages.make.outputs.output_dir}",
            "$${x}",
            "${matrix.a}",
            "${",
            "}",
            "true",
            "1",
        ]
    ),
    st.text(string.printable, max_size=12),
)
documents = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(st.sampled_from(KEYS), st.text(max_size=6)), children, max_size=5
        ),
    ),
    max_leaves=25,
)


def _load(tmp_path: Path, text: str) -> None:
    recipe = tmp_path / "fuzz.yaml"
    recipe.write_text(text)
    try:
        load_recipe(recipe, environ={})
    except RecipeError as exc:
        assert str(exc)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(documents)
def test_random_documents_never_escape_as_tracebacks(tmp_path: Path, document: object) -> None:
    _load(tmp_path, yaml.safe_dump(document))


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text(max_size=200))
def test_random_text_never_escapes_as_traceback(tmp_path: Path, text: str) -> None:
    _load(tmp_path, text)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.dictionaries(
        st.sampled_from(["make", "test", "a-b", "x"]),
        st.fixed_dictionaries(
            {"uses": st.sampled_from(["command", "nope"])},
            optional={
                "needs": st.lists(st.sampled_from(["make", "test", "x", "zz"]), max_size=3),
                "with": st.dictionaries(
                    st.sampled_from(["run", "env", "timeout_s", "bad"]), scalars, max_size=3
                ),
                "matrix": st.dictionaries(
                    st.sampled_from(["a", "include", "exclude"]),
                    st.lists(scalars, max_size=3),
                    max_size=2,
                ),
            },
        ),
        min_size=1,
        max_size=3,
    )
)
def test_random_stage_graphs(tmp_path: Path, stages: dict) -> None:
    _load(tmp_path, yaml.safe_dump({"version": 1, "name": "fuzz", "stages": stages}))
