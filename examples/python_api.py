"""gcupipe from Python: run a whole recipe, then one stage on its own, without the CLI.

python examples/python_api.py
"""

from __future__ import annotations

from pathlib import Path

from gcupipe.engine import Selection, run_recipe
from gcupipe.recipe import load_recipe
from gcupipe.stages.base import StageContext
from gcupipe.stages.command import CommandConfig, CommandStage


def run_a_recipe(work: Path) -> None:
    """A recipe with --set style overrides; the second run is served from the cache."""
    recipe = load_recipe("examples/four-stage.yaml", ["vars.text=hello from python"])
    for attempt in (1, 2):
        result = run_recipe(recipe, work / "four-stage", Selection())
        print(attempt, result.outcome, [(s.id, s.outcome) for s in result.stages])
    if result.error is not None:  # a GcupipeError: exit_code 1 stage, 2 recipe, 3 gate
        raise SystemExit(result.error.exit_code)


def run_one_stage(work: Path) -> None:
    """A single stage, called directly: handy in notebooks and in a stage's own tests."""
    out, scratch = work / "one" / "out", work / "one" / "scratch"
    out.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(
        stage_id="echo",
        output_dir=out,
        scratch_dir=scratch,
        cache_dir=scratch,
        run_dir=work / "one",
    )
    outputs = CommandStage().run(CommandConfig(run="echo hi > hi.txt"), ctx)
    print((outputs.output_dir / "hi.txt").read_text().strip())


if __name__ == "__main__":
    work = Path("runs/python-api")
    run_a_recipe(work)
    run_one_stage(work)
