"""W4A16 accuracy and speed on SmolLM2-135M: gcupipe RTN, GPTQ, AWQ vs llmcompressor, auto-round.

Every model is scored on the same eval tokens (Botchan eval text, window 512, stride 512, the
DATA.md convention) and every calibrated method gets the same 64 x 256 calibration tokens of the
calibration text. gcupipe's methods run through the real stage path (streaming quantizer ->
modelslim files -> reader -> reference runtime). llmcompressor's GPTQModifier and auto-round's
SignRound each run in their own benchmark-only venv (benchmarks/_peers.py) as a subprocess on the
same token ids.

    python benchmarks/w4a16_accuracy.py                      # full table (~45 min on 2 cores)
    python benchmarks/w4a16_accuracy.py --eval-tokens 4096   # quick look while developing
    # the time ratio, alone on the machine (other load slows llmcompressor's threads far more):
    python benchmarks/w4a16_accuracy.py --eval-tokens 4096 --results w4a16_timing \
        --only "GPTQ w4 g64 sym,llmcompressor GPTQModifier w4 g64 sym"
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _peers import calibration_tokens, run_peer  # noqa: E402

GROUP_SIZE = 64
BITS = 4


def resolver(symmetric: bool) -> Any:
    from gcupipe.quant.methods import LayerSpec

    spec = LayerSpec(bits=BITS, group_size=GROUP_SIZE, symmetric=symmetric)
    ignored = ("lm_head", "embed_tokens")
    return lambda name: None if any(part in name for part in ignored) else spec


def run_gcupipe(
    method_name: str,
    options: dict[str, Any],
    symmetric: bool,
    model_dir: Path,
    tokens: Any,
    eval_ids: list[int],
    work: Path,
) -> dict[str, Any]:
    """Quantize with the streaming core into modelslim files, read back, score."""
    from gcupipe.formats.modelslim_io import ModelslimWriter
    from gcupipe.formats.registry import read_quantized
    from gcupipe.quant.methods import METHODS
    from gcupipe.quant.streaming import quantize_model
    from gcupipe.runtime.model import build_model, load_config
    from gcupipe.runtime.perplexity import perplexity

    out = work / method_name
    out.mkdir(parents=True)
    raw = json.loads((model_dir / "config.json").read_text())
    method_class = METHODS.get(method_name)
    method = method_class(method_class.Options.model_validate(options))
    writer = ModelslimWriter(out, model_dir, raw, method_name)
    started, cpu_started = time.perf_counter(), time.process_time()
    report = quantize_model(
        model_dir,
        writer,
        method,
        resolver(symmetric),
        tokens if method.calibrated else None,
        log=lambda _m: None,
    )
    writer.finish()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    checkpoint = read_quantized(out)
    model = build_model(load_config(out), checkpoint.float_tensors, checkpoint.linears)
    result = perplexity(model, eval_ids)
    return {
        "ppl": result.ppl,
        "quantize_s": seconds,
        "quantize_cpu_s": cpu_seconds,
        "eval_s": result.seconds,
        "scored_tokens": result.scored_tokens,
        "fallbacks": len(report.fallbacks),
    }


def run_float(model_dir: Path, eval_ids: list[int]) -> dict[str, Any]:
    from gcupipe.runtime.model import load_float_model
    from gcupipe.runtime.perplexity import perplexity

    result = perplexity(load_float_model(model_dir), eval_ids)
    return {
        "ppl": result.ppl,
        "quantize_s": 0.0,
        "quantize_cpu_s": 0.0,
        "eval_s": result.seconds,
        "scored_tokens": result.scored_tokens,
    }


# (row label, gcupipe method, options, symmetric), in the order they run: the comparisons
# the acceptance needs first, so a cut-short run still has them.
GCUPIPE_ROWS = [
    ("GPTQ w4 g64 sym", "gptq", {}, True),
    ("AWQ w4 g64 asym", "awq", {}, False),
    ("GPTQ w4 g64 sym (no asymmetric calibration)", "gptq", {"asymmetric_calibration": 0}, True),
    (
        "AWQ w4 g64 asym (asymmetric calibration)",
        "awq",
        {"gptq": {"asymmetric_calibration": 0.2}},
        False,
    ),
    ("GPTQ w4 g64 sym (drift on 8192 tokens)", "gptq", {"asymmetric_tokens": 8192}, True),
    ("AWQ w4 g64 asym (RTN rounding)", "awq", {"gptq": None}, False),
    ("RTN w4 g64 sym", "w4a16", {}, True),
    ("RTN w4 g64 asym", "w4a16", {}, False),
    ("AWQ w4 g64 sym", "awq", {}, True),
    ("GPTQ w4 g64 asym", "gptq", {}, False),
]
PEER = "llmcompressor GPTQModifier w4 g64 sym"
BEST_PEER = "auto-round SignRound w4 g64 sym"
PEER_PRESETS = {PEER: "gptq-w4-g64-sym", BEST_PEER: "autoround-w4-g64-sym"}
PEER_COLUMNS = (("llmcompressor", PEER), ("auto-round", BEST_PEER))


OTHERS_LIMIT = 0.1
"""Share of the CPU other processes may take while this runs before its times are left out."""


def markdown(rows: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    float_ppl = rows.get("float", {}).get("ppl")
    peers = [(short, rows[label]) for short, label in PEER_COLUMNS if label in rows]
    lines = [
        "# W4A16 on SmolLM2-135M-Instruct (Botchan eval text)",
        "",
        f"Calibration: {meta['calib_samples']} x {meta['calib_seq_len']} tokens of the "
        f"calibration text; eval: {meta['scored_tokens']} scored tokens (window 512, stride "
        f"512); {meta['threads']} torch threads, CPU. gcupipe's "
        f"calibration forwards in {meta.get('calibration_dtype', 'float32')} (`calibration.dtype: "
        "auto`), the peers' in float32 (the model's dtype as loaded). auto-round runs SignRound "
        "(200 iterations) and exports the GPTQ layout, scored through gcupipe's reader of that "
        "layout. Times: quantization only (gcupipe: streaming quantizer incl. reading and writing "
        "files; llmcompressor: `oneshot`; auto-round: `quantize_and_save`); CPU s = process CPU "
        "time of the same span (all threads), the figure least moved by other load on the "
        "machine.",
        "",
        "| model | ppl | vs float | quantize s | CPU s | "
        + " | ".join(f"ppl / {short} | time / {short}" for short, _ in peers)
        + " |",
        "|---|---|---|---|---|" + "---|---|" * len(peers),
    ]
    loaded = meta.get("other_processes_cpu_share", 0.0) > OTHERS_LIMIT
    if loaded:  # perplexities stand; times from a loaded run are not results
        lines[4:4] = [
            f"Other processes took {meta['other_processes_cpu_share']:.0%} of the CPU during "
            "this run: its time columns are left out.",
            "",
        ]
    for label, row in rows.items():
        vs_float = f"{row['ppl'] / float_ppl - 1:+.1%}" if float_ppl else "-"
        times = f"{row['quantize_s']:.1f} | {row.get('quantize_cpu_s', 0.0):.1f}"
        if loaded:
            times = "loaded | loaded"
        ratios = []
        for _, peer in peers:
            if label == "float":
                ratios.append("- | -")
                continue
            time_ratio = "-" if loaded else f"{row['quantize_s'] / peer['quantize_s']:.2f}"
            ratios.append(f"{row['ppl'] / peer['ppl']:.3f} | {time_ratio}")
        lines.append(
            f"| {label} | {row['ppl']:.2f} | {vs_float} | {times} | " + " | ".join(ratios) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-tokens", type=int, default=None, help="cut the eval text")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-seq-len", type=int, default=256)
    parser.add_argument("--only", default="", help="comma-separated row labels to run")
    parser.add_argument(
        "--no-peer", action="store_true", help="skip the peers (llmcompressor, auto-round)"
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--results",
        default="w4a16_accuracy",
        help="results file name (e.g. w4a16_timing for a quiet timing-only run)",
    )
    args = parser.parse_args(argv)
    from _results import QuietMachine

    quiet = QuietMachine(others_limit=OTHERS_LIMIT)

    import torch

    from gcupipe.formats.tokenizer import text_token_ids
    from gcupipe.quant.precision import calibration_dtype
    from gcupipe.testing.real_data import botchan_text, smollm2_checkpoint

    model_dir = smollm2_checkpoint()
    calib_text, eval_text = botchan_text()
    tokens = calibration_tokens(model_dir, calib_text, args.calib_samples, args.calib_seq_len)
    eval_ids = text_token_ids(eval_text, model_dir, 49152, args.eval_tokens)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    wanted = lambda label: not only or label in only  # noqa: E731
    rows: dict[str, dict[str, Any]] = {}
    meta = {
        "calib_samples": args.calib_samples,
        "calib_seq_len": args.calib_seq_len,
        "scored_tokens": 0,
        "threads": torch.get_num_threads(),
        "calibration_dtype": str(calibration_dtype("auto", "cpu")).removeprefix("torch."),
    }

    def record(label: str, row: dict[str, Any]) -> None:
        """Keep a row and rewrite the results file, so a run cut short keeps what it measured."""
        rows[label] = row
        meta["other_processes_cpu_share"] = round(quiet.others_share(), 3)
        meta["scored_tokens"] = row.get("scored_tokens", meta["scored_tokens"])
        print(f"{label}: {row}", flush=True)
        if not args.no_write:
            from _results import write_results

            write_results(args.results, {"meta": meta, "rows": rows}, markdown(rows, meta))

    with tempfile.TemporaryDirectory(prefix="w4a16-bench-") as tmp:
        work = Path(tmp)
        if wanted("float"):
            record("float", run_float(model_dir, eval_ids))
        for index, (label, method, options, symmetric) in enumerate(GCUPIPE_ROWS):
            if wanted(label):
                slug = label.replace(" ", "_")
                record(
                    label,
                    run_gcupipe(
                        method, options, symmetric, model_dir, tokens, eval_ids, work / slug
                    ),
                )
            if index == 0 and not args.no_peer:
                for peer, preset in PEER_PRESETS.items():
                    if not wanted(peer):
                        continue
                    try:
                        record(peer, run_peer(preset, model_dir, tokens, eval_ids, work))
                    except (OSError, subprocess.CalledProcessError) as exc:
                        print(f"{peer} failed: {exc}", flush=True)
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
