"""A 4-way quantize matrix on SmolLM2: one after another, `--jobs 2`, and Ray with 2 worker nodes.

Each executor runs the same recipe in a fresh run directory (downloads excluded: the model is
converted once, before the clock starts). Prints wall times as ratios against the serial run of
the same invocation and each 2-way executor's overhead per stage (its wall time minus half the
serial wall time, per stage), and writes benchmarks/results/executor_scaling.{json,md}.

    python benchmarks/executor_scaling.py        # ~1 min on 2 cores; nothing else running
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _results import QuietMachine, write_results  # noqa: E402

RECIPE = """\
version: 1
name: scaling
target: cpu
stages:
  quantize:
    uses: quantize
    needs: []
    matrix:
      method: [w8a16, w4a16]
      symmetric: [true, false]
    with:
      model: {model}
      method: ${{matrix.method}}
      symmetric: ${{matrix.symmetric}}
"""


def recipe_file(folder: Path, model: Path) -> Path:
    path = folder / "scaling.yaml"
    path.write_text(RECIPE.format(model=model))
    return path


def run(recipe: Path, run_dir: Path, executor: Any) -> dict[str, Any]:
    from gcupipe.engine.runner import Runner
    from gcupipe.recipe import load_recipe

    started = time.perf_counter()
    result = Runner(load_recipe(recipe, [], environ={}), run_dir, executor=executor).run()
    wall = time.perf_counter() - started
    assert result.outcome == "ok", result.error
    stages = [stage for stage in result.stages if stage.outcome == "ran"]
    return {
        "wall_s": wall,
        "stages": len(stages),
        "stage_s": sum(stage.duration_s for stage in stages),
        "nodes": sorted({str(stage.node) for stage in stages}),
    }


def main() -> int:
    from gcupipe.engine.executors import InlineExecutor, ProcessExecutor, RayExecutor
    from gcupipe.testing.real_data import smollm2_checkpoint

    model = smollm2_checkpoint()
    QuietMachine()  # waits for an idle machine; the worker processes and Ray's are this
    # benchmark's own, so the others-share check of the one-process benchmarks does not apply
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        folder = Path(tmp)
        recipe = recipe_file(folder, model)
        rows["serial (--jobs 1)"] = run(recipe, folder / "serial", InlineExecutor())
        rows["--jobs 2"] = run(recipe, folder / "jobs2", ProcessExecutor(2))
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        try:
            rows["Ray, 2 worker nodes"] = run(recipe, folder / "ray", RayExecutor(cluster.address))
        finally:
            cluster.shutdown()
    serial = rows["serial (--jobs 1)"]
    lines = [
        "# Executor scaling: a quantize matrix on SmolLM2-135M",
        "",
        f"{serial['stages']} quantize stages (w8a16 and w4a16, symmetric and asymmetric, RTN), "
        "each in a fresh run directory, started on an idle machine (1-minute load < 0.5). "
        "Ratio = wall time / the serial run's. Overhead per stage "
        "= (wall time - serial wall time x 1/2) / stages for the 2-way executors: what the "
        "executor adds beyond perfect halving.",
        "",
        "| executor | wall s | vs serial | overhead per stage s | nodes |",
        "|---|---|---|---|---|",
    ]
    for label, row in rows.items():
        ratio = row["wall_s"] / serial["wall_s"]
        overhead = (
            "-"
            if row is serial
            else f"{(row['wall_s'] - serial['wall_s'] / 2) / row['stages']:.2f}"
        )
        lines.append(
            f"| {label} | {row['wall_s']:.1f} | {ratio:.2f} | {overhead} | {len(row['nodes'])} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    write_results("executor_scaling", {"rows": rows}, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
