"""DeepSeek-V2-Lite at full size on this machine: the seed's flow on a checkpoint of its exact
shape (gcupipe.testing.synthetic), measured stage by stage.

    python benchmarks/deepseek_v2_lite.py [--layers N] [--kill-at 12] [--calibrated-layers 3]

1. Generates the checkpoint once, cached in <repo>/.cache/deepseek-v2-lite-synthetic[-N].
2. Copies its shards with a plain read-and-write, one shard at a time (each copy deleted before
   the next, to fit the disk): the I/O floor the quantizer is held to; again after serve, since
   the disk's pace drifts over the run, and quantize is compared with the mean of the two.
3. Runs recipes/deepseek-v2-lite-synthetic.yaml one stage at a time (`gcupipe run --only`),
   each in a fresh process tree: wall time, peak RSS of the whole tree (sampled every 0.2 s),
   bytes it read and wrote (the kernel's per-process storage I/O counters), quantize throughput
   as a ratio to the copy, and for serve vLLM's load time, tokens/s and RSS.
4. Kills quantize with SIGKILL once it has finished layer --kill-at, reruns it, and compares the
   sha256 of every output file with the uninterrupted run.
5. Runs GPTQ on the first --calibrated-layers layers (a checkpoint of that many layers) with
   validate's expert-coverage report, and projects a full calibrated run's time from it.

Needs ~55 GB of free disk for the full model (31 GB checkpoint, 16 GB quantized, 8.6 GB copy);
`--clean` deletes the checkpoint at the end. Writes benchmarks/results/deepseek_v2_lite.{md,json}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _monitor import measured  # noqa: E402
from _results import write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "deepseek-v2-lite-synthetic.yaml"
CACHE = REPO / ".cache"
FULL_LAYERS = 27
CALIBRATED_RECIPE = """
version: 1
name: deepseek-v2-lite-gptq-{layers}
target: gcu
stages:
  quantize:
    uses: quantize
    with:
      model: {model}
      method: gptq
      format: gcu
      calibration: {{text_file: {text}, samples: {samples}, seq_len: {seq_len}}}
  validate:
    uses: validate
    needs: [quantize]
    with:
      numeric: false
      min_expert_tokens: {min_tokens}
"""


def checkpoint(layers: int | None) -> Path:
    path = CACHE / ("deepseek-v2-lite-synthetic" + (f"-{layers}" if layers else ""))
    if not (path / "model.safetensors.index.json").is_file():
        print(f"generating {path} ...", flush=True)
        command = [sys.executable, "-m", "gcupipe.testing.synthetic", "deepseek-v2-lite"]
        command += [str(path)] + (["--layers", str(layers)] if layers else [])
        subprocess.run(command, check=True, cwd=REPO)
    return path


def plain_copy(model: Path, scratch: Path) -> dict[str, Any]:
    """Read and write every shard, one at a time, deleting each copy after it (fsync'd)."""
    code = (
        "import shutil, os, sys; from pathlib import Path\n"
        "src, dst = Path(sys.argv[1]), Path(sys.argv[2]); dst.mkdir(parents=True, exist_ok=True)\n"
        "for f in sorted(src.glob('*.safetensors')):\n"
        "    with f.open('rb') as r, (dst / f.name).open('wb') as w:\n"
        "        shutil.copyfileobj(r, w, 64 << 20); w.flush(); os.fsync(w.fileno())\n"
        "    (dst / f.name).unlink()\n"
    )
    figures = measured([sys.executable, "-c", code, str(model), str(scratch)])
    shutil.rmtree(scratch, ignore_errors=True)
    return figures


def gcupipe(*args: str) -> list[str]:
    return [sys.executable, "-m", "gcupipe", *args]


def stage_record(workdir: Path, stage: str) -> dict[str, Any]:
    return json.loads((workdir / "stages" / stage / "stage.json").read_text())  # type: ignore[no-any-return]


def hashes(out: Path) -> dict[str, str]:
    result = {}
    for path in sorted(out.rglob("*")):
        if path.is_file():
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                while chunk := handle.read(64 << 20):
                    digest.update(chunk)
            result[str(path.relative_to(out))] = digest.hexdigest()
    return result


def run_recipe(model: Path, workdir: Path, logs: Path) -> dict[str, Any]:
    env = {**os.environ, "DEEPSEEK_SYNTHETIC_DIR": str(model), "GCUPIPE_PROGRESS_EVERY_S": "30"}
    stages: dict[str, Any] = {}
    for stage in ("quantize", "validate", "serve"):
        print(f"running {stage} ...", flush=True)
        command = gcupipe("run", str(RECIPE), "--workdir", str(workdir), "--only", stage)
        figures = measured(command, env, logs / f"{stage}.log")
        if figures["returncode"] != 0:
            tail = (logs / f"{stage}.log").read_text()[-3000:]
            raise SystemExit(f"{stage} failed (exit {figures['returncode']}):\n{tail}")
        figures["stage_s"] = stage_record(workdir, stage)["duration_s"]
        stages[stage] = figures
    return stages


def resume_check(
    model: Path, workdir: Path, logs: Path, kill_at: int, expected: dict[str, str]
) -> dict[str, Any]:
    env = {**os.environ, "DEEPSEEK_SYNTHETIC_DIR": str(model), "GCUPIPE_PROGRESS_EVERY_S": "30"}
    command = gcupipe("run", str(RECIPE), "--workdir", str(workdir), "--only", "quantize")

    def finished_layers() -> int:
        states = list((workdir / "scratch").rglob("state.json"))
        try:
            return int(json.loads(states[0].read_text())["layers_done"]) if states else 0
        except (OSError, ValueError):
            return 0

    print(f"quantize, killed with SIGKILL after layer {kill_at} ...", flush=True)
    killed = measured(
        command, env, logs / "quantize-killed.log", kill_when=lambda: finished_layers() > kill_at
    )
    layers_at_kill = finished_layers()
    print("quantize, rerun ...", flush=True)
    resumed = measured(command, env, logs / "quantize-resumed.log")
    log = (logs / "quantize-resumed.log").read_text()
    line = next((x.strip() for x in log.splitlines() if "resuming at layer" in x), None)
    got = hashes(workdir / "stages" / "quantize" / "out")
    return {
        "killed_returncode": killed["returncode"],
        "layers_finished_when_killed": layers_at_kill,
        "resume_log_line": line,
        "rerun_wall_s": resumed["wall_s"],
        "files": len(expected),
        "identical": got == expected,
    }


def calibrated(
    layers: int, workdir: Path, logs: Path, samples: int, seq_len: int
) -> dict[str, Any]:
    model = checkpoint(layers)
    text = REPO / ".cache" / "calibration-text.txt"
    if not text.is_file():
        sys.path.insert(0, str(REPO))
        from gcupipe.testing.real_data import botchan_text

        text.write_text(botchan_text()[0])
    recipe = workdir / "gptq.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(
        CALIBRATED_RECIPE.format(
            layers=layers, model=model, text=text, samples=samples, seq_len=seq_len, min_tokens=1
        )
    )
    print(f"gptq on the first {layers} layers ...", flush=True)
    figures = measured(
        gcupipe("run", str(recipe), "--workdir", str(workdir)), None, logs / "gptq.log"
    )
    quantize = stage_record(workdir, "quantize")
    kept = workdir / "reports" / "validate"  # where a failed gate leaves the report
    report_dir = kept if kept.is_dir() else workdir / "stages" / "validate" / "out"
    report = json.loads((report_dir / "validation.json").read_text())
    coverage = report["metrics"].get("expert_coverage")
    per_layer = quantize["duration_s"] / layers
    return {
        **figures,
        "quantize_s": quantize["duration_s"],
        "seconds_per_layer": per_layer,
        "projected_full_s": per_layer * FULL_LAYERS,  # at the mean of the first layers
        "calibration": f"{samples} x {seq_len} tokens",
        "expert_coverage": coverage,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=None, help="fewer layers (quick run)")
    parser.add_argument("--kill-at", type=int, default=12, help="SIGKILL quantize after this layer")
    parser.add_argument("--calibrated-layers", type=int, default=3)
    parser.add_argument("--samples", type=int, default=32, help="GPTQ calibration samples")
    parser.add_argument("--seq-len", type=int, default=256, help="GPTQ calibration length")
    parser.add_argument("--clean", action="store_true", help="delete the checkpoint at the end")
    args = parser.parse_args()
    work = CACHE / "bench-deepseek-v2-lite"
    shutil.rmtree(work, ignore_errors=True)
    logs = work / "logs"
    logs.mkdir(parents=True)
    model = checkpoint(args.layers)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    input_gb = index["metadata"]["total_size"] / 1e9

    print("plain copy ...", flush=True)
    copies = [plain_copy(model, work / "copy")]
    stages = run_recipe(model, work / "run", logs)
    expected = hashes(work / "run" / "stages" / "quantize" / "out")
    output_gb = (
        sum(p.stat().st_size for p in (work / "run" / "stages" / "quantize" / "out").iterdir())
        / 1e9
    )
    inspect = subprocess.run(
        gcupipe("inspect", str(work / "run" / "stages" / "quantize" / "out")),
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    validation = json.loads(
        (work / "run" / "stages" / "validate" / "out" / "validation.json").read_text()
    )
    serve_summary = json.loads(
        (work / "run" / "stages" / "serve" / "out" / "summary.json").read_text()
    )[0]
    shutil.rmtree(work / "run")  # the disk holds one quantized copy at a time
    print("plain copy, again (the disk's pace drifts) ...", flush=True)
    copies.append(plain_copy(model, work / "copy"))
    layers = args.layers or FULL_LAYERS
    resume = resume_check(model, work / "resume", logs, min(args.kill_at, layers - 2), expected)
    shutil.rmtree(work / "resume")
    gptq = calibrated(args.calibrated_layers, work / "gptq", logs, args.samples, args.seq_len)

    quantize = stages["quantize"]
    # the stage's own time (no interpreter start-up) plus writing back what it left in the page
    # cache: the copy fsyncs each shard
    quantize_rate = input_gb / (quantize["stage_s"] + quantize["sync_s"])
    copy_rates = [input_gb / copy["wall_s"] for copy in copies]
    copy_rate = sum(copy_rates) / len(copy_rates)
    figures = {
        "layers": layers,
        "input_gb": input_gb,
        "output_gb": output_gb,
        "copies": copies,
        "copy_gb_per_s": copy_rate,
        "stages": stages,
        "quantize_gb_per_s": quantize_rate,
        "quantize_vs_copy": quantize_rate / copy_rate,
        "inspect_returncode": inspect.returncode,
        "inspect": inspect.stdout.strip().splitlines()[:3],
        "validate_passed": validation["passed"],
        "validate_rules": {r["rule"]: r["status"] for r in validation["rules"]},
        "validate_metrics": {
            k: validation["metrics"].get(k)
            for k in ("ppl_float", "ppl_quantized", "ppl_increase", "worst_layers")
        },
        "serve": serve_summary,
        "resume": resume,
        "gptq": gptq,
    }
    rows = [
        ("checkpoint", f"{layers} layers, {input_gb:.2f} GB bf16 -> {output_gb:.2f} GB W8A8"),
        (
            "plain read-and-copy (before quantize, after serve)",
            " / ".join(f"{c['wall_s']:.0f} s" for c in copies)
            + f", mean {copy_rate:.3f} GB/s, peak RSS {copies[0]['peak_rss_gb']:.2f} GB",
        ),
    ]
    for name, stage in stages.items():
        rows.append(
            (
                f"{name}",
                f"{stage['wall_s']:.0f} s wall ({stage['stage_s']:.0f} s in the "
                f"stage, then {stage['sync_s']:.0f} s to sync), peak RSS "
                f"{stage['peak_rss_gb']:.2f} GB, read {stage['read_gb']:.1f} GB, written "
                f"{stage['written_gb']:.1f} GB",
            )
        )
    rows += [
        (
            "quantize throughput",
            f"{quantize_rate:.3f} GB/s = {quantize_rate / copy_rate:.2f} x the plain copy's "
            "mean (target >= 0.9; peak RSS target <= 4 GB)",
        ),
        (
            "validate (layered)",
            f"passed: {validation['passed']}; peak RSS "
            f"{stages['validate']['peak_rss_gb']:.2f} GB (target <= 8 GB)",
        ),
        (
            "serve (vLLM CPU, plugin)",
            f"load {serve_summary['load_s']:.0f} s, "
            f"{serve_summary['tokens_per_s']} tokens/s, peak RSS "
            f"{stages['serve']['peak_rss_gb']:.2f} GB (target <= 22 GB)",
        ),
        (
            "gcupipe inspect",
            f"exit {inspect.returncode}: {(inspect.stdout.strip().splitlines() or [''])[0]}",
        ),
        (
            "kill -9 and resume",
            f"killed after {resume['layers_finished_when_killed']} layers; "
            f"{resume['resume_log_line']}; {resume['files']} files identical (sha256): "
            f"{resume['identical']}",
        ),
        (
            f"GPTQ, first {args.calibrated_layers} layers",
            f"{gptq['quantize_s']:.0f} s "
            f"({gptq['seconds_per_layer']:.0f} s/layer, {gptq['calibration']}); projected "
            f"{FULL_LAYERS} layers: {gptq['projected_full_s'] / 3600:.1f} h",
        ),
    ]
    coverage = gptq["expert_coverage"]
    if coverage:
        rows.append(
            (
                "GPTQ expert coverage",
                f"{coverage['experts']} experts, tokens min "
                f"{coverage['min']} / median {coverage['median']:g} / max {coverage['max']}"
                f"; histogram {coverage['histogram']}",
            )
        )
    flags = " ".join(sys.argv[1:])
    text = (
        "# DeepSeek-V2-Lite shape at full size: quantize, validate, serve, resume\n\n"
        f"`python benchmarks/deepseek_v2_lite.py {flags}`"
        " on a synthetic checkpoint of the published shape (random weights).\n\n"
        "| what | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    )
    write_results("deepseek_v2_lite" + (f"_{args.layers}" if args.layers else ""), figures, text)
    print(text)
    shutil.rmtree(work, ignore_errors=True)
    if args.clean:
        shutil.rmtree(model, ignore_errors=True)


if __name__ == "__main__":
    main()
