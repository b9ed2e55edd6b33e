"""The engine's own overhead on a fully cached run of the four-stage example recipe.

Target: under 0.5 s on a 2-core machine. Prints the figures and writes
benchmarks/results/engine_overhead.{json,md}."""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_results  # noqa: E402

from gcupipe.engine import run_recipe  # noqa: E402
from gcupipe.recipe import load_recipe  # noqa: E402

RECIPE = Path(__file__).parents[1] / "examples" / "four-stage.yaml"
REPEATS = 10


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder)
        first = run_recipe(load_recipe(RECIPE), run_dir)
        assert first.outcome == "ok"
        in_process = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            result = run_recipe(load_recipe(RECIPE), run_dir)
            in_process.append(time.perf_counter() - start)
            assert {stage.outcome for stage in result.stages} == {"cached"}
        command = []
        for _ in range(5):
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "gcupipe", "run", str(RECIPE), "--workdir", str(run_dir)],
                check=True,
                capture_output=True,
            )
            command.append(time.perf_counter() - start)
    engine_s = statistics.median(in_process)
    command_s = statistics.median(command)
    verdict = "PASS" if engine_s < 0.5 else "FAIL"
    table = (
        "| measure | median (s) |\n|---|---|\n"
        f"| engine: load recipe + fully cached run of 4 stages (in process, {REPEATS} runs) "
        f"| {engine_s:.4f} |\n"
        f"| whole command `gcupipe run` incl. Python start-up (5 runs) | {command_s:.3f} |\n\n"
        f"Target: engine overhead < 0.5 s: **{verdict}**\n"
    )
    print(table)
    path = write_results(
        "engine_overhead",
        {"engine_overhead_s": engine_s, "command_s": command_s, "target_s": 0.5},
        table,
    )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
