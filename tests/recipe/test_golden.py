"""Golden tests: each bad recipe in golden/ fails with exactly the message in its .expected file.

Regenerate after a deliberate wording change with GCUPIPE_UPDATE_GOLDEN=1 and review the diff."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gcupipe.errors import RecipeError
from gcupipe.recipe import load_recipe

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(path.stem for path in GOLDEN.glob("*.yaml"))


def test_there_are_many_kinds_of_bad_recipe() -> None:
    assert len(CASES) >= 15


@pytest.mark.parametrize("case", CASES)
def test_golden_error(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(GOLDEN)
    args_file = GOLDEN / f"{case}.args"
    overrides = args_file.read_text().splitlines() if args_file.exists() else []
    with pytest.raises(RecipeError) as caught:
        load_recipe(f"{case}.yaml", overrides, environ={})
    message = str(caught.value) + "\n"
    expected_file = GOLDEN / f"{case}.expected"
    if os.environ.get("GCUPIPE_UPDATE_GOLDEN"):
        expected_file.write_text(message)
    assert message == expected_file.read_text()
