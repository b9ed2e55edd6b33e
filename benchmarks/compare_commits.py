"""Do two commits produce the same artifacts and the same figures? For refactors that must not
change any number: quantize SmolLM2 with each method into each format at both commits, hash
every file written, and score each model's perplexity with that commit's reference runtime.

    python benchmarks/compare_commits.py OLD_COMMIT [NEW_COMMIT (default: the working tree)]

Each side runs in its own process with that commit's gcupipe first on the path (a git worktree
for a commit), on the same calibration and eval tokens. Writes
benchmarks/results/compare_commits.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASES = [  # (label, quantize settings)
    ("w8a8_dynamic -> modelslim", {"method": "w8a8_dynamic", "format": "modelslim"}),
    ("w8a16 -> modelslim", {"method": "w8a16", "format": "modelslim"}),
    ("w4a16 g64 -> modelslim", {"method": "w4a16", "format": "modelslim"}),
    (
        "w8a8 + smooth 0.5 -> modelslim",
        {"method": "w8a8", "format": "modelslim", "smooth_alpha": 0.5},
    ),
    ("gptq w4 g64 -> gcu", {"method": "gptq", "format": "gcu"}),
    ("awq w4 g64 -> gcu", {"method": "awq", "format": "gcu"}),
    (
        "w8a8_dynamic -> compressed-tensors",
        {"method": "w8a8_dynamic", "format": "compressed-tensors"},
    ),
]
EVAL_TOKENS = 2048
CALIBRATION = {"samples": 16, "seq_len": 256}

WORKER = """
import hashlib, json, sys
from pathlib import Path
import gcupipe, torch
torch.set_num_threads(2)
from gcupipe.stages.base import StageContext
from gcupipe.stages.quantize import QuantizeConfig, QuantizeStage
from gcupipe.testing.real_data import smollm2_checkpoint
from gcupipe.runtime.load import load_model
from gcupipe.runtime.perplexity import perplexity

job = json.loads(Path(sys.argv[1]).read_text())
source, work = smollm2_checkpoint(), Path(job["work"])
ids = job["ids"]
results = {"gcupipe": str(Path(gcupipe.__file__).parent)}
for label, settings in job["cases"]:
    out = work / label.replace(" ", "_").replace(">", "").replace("+", "")
    out.mkdir(parents=True)
    calibration = {"text_file": job["calibration_text"], **job["calibration"]}
    config = QuantizeConfig.model_validate(
        {"model": source, "calibration": calibration, **settings}
    )
    ctx = StageContext("q", out, work / "s", work / "c", work, log=lambda m: None)
    QuantizeStage().run(config, ctx)
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(out.iterdir()) if p.is_file()}
    ppl = perplexity(load_model(out).model, ids).ppl
    results[label] = {"files": files, "ppl": ppl}
    print(label, ppl, flush=True)
Path(job["output"]).write_text(json.dumps(results, indent=1))
"""


def checkout(commit: str | None, into: Path) -> Path:
    """The repository at `commit` (a detached worktree), or the working tree itself."""
    if commit is None:
        return ROOT
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(into), commit],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return into


def run_side(tree: Path, job: dict[str, Any], work: Path, name: str) -> dict[str, Any]:
    job = {**job, "work": str(work / name), "output": str(work / f"{name}.json")}
    (work / f"{name}-job.json").write_text(json.dumps(job))
    script = work / "worker.py"
    script.write_text(WORKER)
    env = {
        **os.environ,
        "PYTHONPATH": str(tree),
        "GCUPIPE_TEST_CACHE": str(ROOT / ".cache" / "test-data"),
    }
    subprocess.run(
        [sys.executable, str(script), str(work / f"{name}-job.json")], env=env, check=True, cwd=work
    )
    result: dict[str, Any] = json.loads((work / f"{name}.json").read_text())
    assert result["gcupipe"] == str(tree / "gcupipe"), (result["gcupipe"], tree)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new", nargs="?")
    args = parser.parse_args()

    from gcupipe.formats.tokenizer import text_token_ids, tokenizer_dir
    from gcupipe.testing.real_data import botchan_text, smollm2_checkpoint

    source = smollm2_checkpoint()
    calib_text, eval_text = botchan_text()
    ids = text_token_ids(eval_text, tokenizer_dir(source), 49152, EVAL_TOKENS)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        (work / "calibration.txt").write_text(calib_text)
        job = {
            "cases": CASES,
            "ids": ids,
            "calibration": CALIBRATION,
            "calibration_text": str(work / "calibration.txt"),
        }
        old_tree = checkout(args.old, work / "old-tree")
        new_tree = checkout(args.new, work / "new-tree")
        try:
            old = run_side(old_tree, job, work, "old")
            new = run_side(new_tree, job, work, "new")
        finally:
            for tree in (old_tree, new_tree):
                if tree != ROOT:
                    subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT)
    rows = []
    for label, _settings in CASES:
        a, b = old[label], new[label]
        differing = sorted(
            n for n in set(a["files"]) | set(b["files"]) if a["files"].get(n) != b["files"].get(n)
        )
        rows.append(
            {
                "case": label,
                "ppl_old": a["ppl"],
                "ppl_new": b["ppl"],
                "files": len(b["files"]),
                "differing_files": differing,
            }
        )
        print(rows[-1], flush=True)
    new_name = args.new or "working tree"
    lines = [
        f"# Same artifacts and figures? {args.old} vs {new_name}",
        "",
        f"SmolLM2-135M, calibration {CALIBRATION['samples']} x {CALIBRATION['seq_len']} tokens, "
        f"perplexity on {EVAL_TOKENS} eval tokens with each commit's reference runtime (float32).",
        "",
        "| case | ppl (old) | ppl (new) | files | files that differ |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['case']} | {r['ppl_old']:.6f} | {r['ppl_new']:.6f} | {r['files']} | "
        f"{', '.join(r['differing_files']) or 'none'} |"
        for r in rows
    ]
    figures = {"old": args.old, "new": new_name, "rows": rows}
    print(write_results("compare_commits", figures, "\n".join(lines)))


if __name__ == "__main__":
    main()
