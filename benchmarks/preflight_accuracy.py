"""`gcupipe plan --estimate` against what the run then measures, stage by stage.

    python benchmarks/preflight_accuracy.py RECIPE [--env NAME=VALUE ...] [--name NAME]

1. Estimates the recipe in a fresh run directory (the same code `plan --estimate` prints).
2. Runs it one stage at a time (`gcupipe run --only`), each in a fresh process tree, page cache
   dropped first: peak RSS of the whole tree (sampled every 0.2 s), wall time, and the disk the
   stage left (the bytes of its output directory, links not followed).
3. Prints and writes benchmarks/results/preflight_<name>.{md,json}: estimate, measurement and
   their ratio per stage; targets: disk within 5%, peak RSS within 25%.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _monitor import REPO, measured  # noqa: E402
from _results import write_results  # noqa: E402

from gcupipe.engine import Runner, Selection  # noqa: E402
from gcupipe.engine.preflight import preflight  # noqa: E402
from gcupipe.estimate import GB, Machine  # noqa: E402
from gcupipe.recipe import load_recipe  # noqa: E402


def disk_bytes(folder: Path) -> int:
    """Bytes of the regular files under `folder` (a linked-in-place model counts nothing)."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            if not path.is_symlink():
                total += path.stat().st_size
    return total


def ratio(estimate: float | None, measured_value: float) -> float | None:
    return None if estimate is None or not measured_value else estimate / measured_value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the run")
    parser.add_argument("--name", default=None, help="results name (default: the recipe's)")
    args = parser.parse_args()
    env = dict(os.environ)
    env.update(dict(item.split("=", 1) for item in args.env))
    env["GCUPIPE_PROGRESS_EVERY_S"] = "30"
    recipe = load_recipe(args.recipe.resolve(), [], environ=env)
    name = args.name or recipe.name
    work = REPO / ".cache" / f"bench-preflight-{name}"
    shutil.rmtree(work, ignore_errors=True)
    run_dir = work / "run"
    logs = work / "logs"
    logs.mkdir(parents=True)

    runner = Runner(recipe, run_dir)
    results = runner.plan(Selection())
    machine = Machine.probe(run_dir)
    estimates = preflight(runner, results, machine)
    print("\n".join(estimates.lines()), flush=True)

    rows: list[dict[str, Any]] = []
    for stage in estimates.stages:
        print(f"running {stage.stage_id} ...", flush=True)
        command = [sys.executable, "-m", "gcupipe", "run", str(args.recipe.resolve())]
        command += ["--workdir", str(run_dir), "--only", stage.stage_id]
        figures = measured(command, env, logs / f"{stage.stage_id}.log")
        if figures["returncode"] != 0:
            tail = (logs / f"{stage.stage_id}.log").read_text()[-3000:]
            raise SystemExit(f"{stage.stage_id} failed (exit {figures['returncode']}):\n{tail}")
        disk = disk_bytes(run_dir / "stages" / stage.stage_id)
        estimate = stage.estimate
        rows.append(
            {
                "stage": stage.stage_id,
                "basis": estimate.basis if estimate else stage.error,
                "disk_estimate_gb": estimate.disk_bytes / GB
                if estimate and estimate.disk_bytes is not None
                else None,
                "disk_gb": disk / GB,
                "rss_estimate_gb": estimate.peak_rss_bytes / GB
                if estimate and estimate.peak_rss_bytes is not None
                else None,
                "rss_gb": figures["peak_rss_gb"],
                "time_estimate_s": estimate.seconds if estimate else None,
                "wall_s": figures["wall_s"],
            }
        )
    total_estimate = sum(row["disk_estimate_gb"] or 0 for row in rows)
    total_disk = sum(row["disk_gb"] for row in rows)
    for row in rows:
        # a ratio of two near-zero sizes (a report) says nothing: shown from 0.1 GB
        row["disk_ratio"] = (
            ratio(row["disk_estimate_gb"], row["disk_gb"]) if row["disk_gb"] >= 0.1 else None
        )
        row["rss_ratio"] = ratio(row["rss_estimate_gb"], row["rss_gb"])
        row["time_ratio"] = ratio(row["time_estimate_s"], row["wall_s"])

    def cell(estimate: float | None, value: float, share: float | None, unit: str) -> str:
        if estimate is None:
            return f"? / {value:.3f}{unit}"
        shown = f"{estimate:.3f} / {value:.3f}{unit}"
        return shown + (f" = {share:.3f}" if share is not None else "")

    lines = [
        f"# Preflight estimate against the run: {name}",
        "",
        f"`python benchmarks/preflight_accuracy.py {' '.join(sys.argv[1:])}`: per stage, what "
        "`gcupipe plan --estimate` said / what the stage then measured = the ratio "
        "(targets: disk within 5%, peak RSS within 25%; time is rough).",
        "",
        f"Machine probe: {machine.flops / 1e9:.1f} GFLOP/s float32 matmul, "
        f"{machine.write_bytes_per_s / 1e6:.0f} MB/s written and fsync'd.",
        "",
        "| stage | disk, GB | peak RSS, GB | time, s | basis |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['stage']} | "
            f"{cell(row['disk_estimate_gb'], row['disk_gb'], row['disk_ratio'], '')} | "
            f"{cell(row['rss_estimate_gb'], row['rss_gb'], row['rss_ratio'], '')} | "
            f"{cell(row['time_estimate_s'], row['wall_s'], row['time_ratio'], '')} | "
            f"{row['basis'] or ''} |"
        )
    lines.append(
        f"| all stages | {total_estimate:.3f} / {total_disk:.3f} = "
        f"{total_estimate / total_disk:.3f} | | | |"
    )
    text = "\n".join(lines) + "\n"
    figures = {
        "machine": machine.__dict__,
        "stages": rows,
        "disk_ratio": total_estimate / total_disk,
    }
    write_results(f"preflight_{name}", figures, text)
    print(text)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
