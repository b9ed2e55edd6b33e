"""Perplexity of the quantization core's methods on the real SmolLM2-135M (DATA.md tokens).

Each method goes through the quantize stage into modelslim, is read back by the format reader
and evaluated on the reference runtime (target-kernel math), on the Botchan eval text with
window 512 / stride 512; llmcompressor's W8A8 preset is scored on the same tokens. Writes
benchmarks/results/quantize_accuracy.{md,json}.

    python benchmarks/quantize_accuracy.py [--max-tokens N] [--only LABEL,...] [--no-peer]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _peers import calibration_tokens, run_peer  # noqa: E402
from _results import write_results  # noqa: E402

# (label, quantize-stage config)
CASES: list[tuple[str, dict[str, object]]] = [
    ("w8a16 per-channel sym", {"method": "w8a16"}),
    ("w8a8_dynamic", {"method": "w8a8_dynamic", "smooth_alpha": 0}),
    ("w8a8_dynamic + SmoothQuant 0.5", {"method": "w8a8_dynamic", "smooth_alpha": 0.5}),
    ("w8a8_dynamic + SmoothQuant 0.65", {"method": "w8a8_dynamic", "smooth_alpha": 0.65}),
    ("w8a8_dynamic + SmoothQuant 0.8", {"method": "w8a8_dynamic", "smooth_alpha": 0.8}),
    ("w8a8 static (min-max)", {"method": "w8a8"}),
    ("w8a8 static + SmoothQuant 0.5", {"method": "w8a8", "smooth_alpha": 0.5}),
    ("w8a8 static + SmoothQuant 0.8", {"method": "w8a8", "smooth_alpha": 0.8}),
    (
        "w8a8 static + SmoothQuant 0.8, histogram",
        {"method": "w8a8", "smooth_alpha": 0.8, "act_method": 2},
    ),
    (
        "w8a8_dynamic + int8 KV cache",
        {"method": "w8a8_dynamic", "smooth_alpha": 0, "kv_cache": {"dtype": "int8"}},
    ),
]
FLOAT = "float32 (dequantized GGUF)"
PEER = "llmcompressor W8A8 preset"
DEFAULT_DYNAMIC = "w8a8_dynamic + SmoothQuant 0.65"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=None, help="cut the eval text")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seq-len", type=int, default=256)
    parser.add_argument("--only", default="", help="comma-separated row labels to run")
    parser.add_argument("--no-peer", action="store_true", help="skip llmcompressor")
    args = parser.parse_args()
    only = {label.strip() for label in args.only.split(",") if label.strip()}

    import torch

    from gcupipe.formats.registry import read_quantized
    from gcupipe.formats.tokenizer import text_token_ids
    from gcupipe.runtime.model import build_model, load_config, load_float_model
    from gcupipe.runtime.perplexity import perplexity
    from gcupipe.stages.base import StageContext
    from gcupipe.stages.quantize import QuantizeConfig, QuantizeStage
    from gcupipe.testing.real_data import botchan_text, smollm2_checkpoint

    torch.manual_seed(0)
    source = smollm2_checkpoint()
    calib_text, eval_text = botchan_text()
    ids = text_token_ids(eval_text, source, 49152, args.max_tokens)
    work = Path(tempfile.mkdtemp(prefix="quantize-accuracy-"))
    (work / "calib.txt").write_text(calib_text)
    calibration = {
        "text_file": work / "calib.txt",
        "samples": args.calib_samples,
        "seq_len": args.calib_seq_len,
    }
    float_ppl = perplexity(load_float_model(source), ids).ppl
    print(f"float: {float_ppl:.3f} ({len(ids)} tokens)", flush=True)
    rows = [(FLOAT, float_ppl, 0.0)]
    for label, config in CASES:
        if only and label not in only:
            continue
        out = work / label.replace(" ", "_").replace("+", "").replace(",", "")
        out.mkdir()
        started = time.perf_counter()
        QuantizeStage().run(
            QuantizeConfig.model_validate(
                {"model": source, "format": "modelslim", "calibration": calibration, **config}
            ),
            StageContext("quantize", out, work / "s", work / "c", work, log=lambda m: None),
        )
        seconds = time.perf_counter() - started
        ckpt = read_quantized(out)
        model = build_model(load_config(out), ckpt.float_tensors, ckpt.linears, ckpt.kv_scales)
        ppl = perplexity(model, ids).ppl
        rows.append((label, ppl, seconds))
        print(
            f"{label}: {ppl:.3f} ({ppl / float_ppl - 1:+.2%}, quantized in {seconds:.0f} s)",
            flush=True,
        )
    if not args.no_peer and (not only or PEER in only):
        tokens = calibration_tokens(source, calib_text, args.calib_samples, args.calib_seq_len)
        peer = run_peer("w8a8", source, tokens, ids, work)
        rows.append((PEER, peer["ppl"], peer["quantize_s"]))
        print(f"{PEER}: {peer['ppl']:.3f}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    table = {label: ppl for label, ppl, _ in rows}
    lines = [
        "# Quantization core accuracy: SmolLM2-135M-Instruct, Botchan eval text",
        "",
        f"{len(ids)} eval tokens, window 512 / stride 512; calibration {args.calib_samples} x "
        f"{args.calib_seq_len} tokens of the calibration text. Each gcupipe model is written as "
        "modelslim, read back and run on the reference runtime (target-kernel math); "
        "llmcompressor's W8A8 preset runs in its benchmark venv on the same tokens "
        "(benchmarks/_peers.py).",
        "",
        "| method | ppl | vs float | quantize time (s) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {label} | {ppl:.3f} | {ppl / float_ppl - 1:+.2%} | {s:.0f} |" for label, ppl, s in rows
    ]
    if "w8a8_dynamic" in table and PEER in table:
        ratio = table["w8a8_dynamic"] / table[PEER]
        lines += ["", f"w8a8_dynamic unsmoothed / {PEER}: {ratio:.4f} (same math: <= 1.005)."]
    if DEFAULT_DYNAMIC in table and PEER in table:
        ratio = table[DEFAULT_DYNAMIC] / table[PEER]
        lines += [f"{DEFAULT_DYNAMIC} (the default with calibration data) / {PEER}: {ratio:.4f}."]
    figures = {label: {"ppl": ppl, "seconds": s} for label, ppl, s in rows}
    figures["eval_tokens"] = len(ids)  # type: ignore[assignment]
    write_results("quantize_accuracy", figures, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
