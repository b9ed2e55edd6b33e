"""Perplexity of the quantization core's methods on the real SmolLM2-135M (DATA.md tokens).

Each method goes through the quantize stage into modelslim, is read back by the format reader
and evaluated on the reference runtime (target-kernel math), on the Botchan eval text with
window 512 / stride 512. Writes benchmarks/results/quantize_accuracy.{md,json}.

    python benchmarks/quantize_accuracy.py [--max-tokens N] [--calib-samples 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_results  # noqa: E402

# (label, quantize-stage config); llmcompressor's W8A8 preset measured here: 39.05 (DATA.md)
CASES: list[tuple[str, dict[str, object]]] = [
    ("w8a16 per-channel sym", {"method": "w8a16"}),
    ("w8a8_dynamic", {"method": "w8a8_dynamic"}),
    ("w8a8 static (min-max)", {"method": "w8a8"}),
    ("w8a8 static + SmoothQuant 0.5", {"method": "w8a8", "smooth_alpha": 0.5}),
    ("w8a8 static + SmoothQuant 0.8", {"method": "w8a8", "smooth_alpha": 0.8}),
    (
        "w8a8 static + SmoothQuant 0.8, histogram",
        {"method": "w8a8", "smooth_alpha": 0.8, "act_method": 2},
    ),
    ("w8a8_dynamic + int8 KV cache", {"method": "w8a8_dynamic", "kv_cache": {"dtype": "int8"}}),
]
LLMCOMPRESSOR_W8A8 = 39.05
FLOAT_FULL = 37.81


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=None, help="cut the eval text")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seq-len", type=int, default=256)
    args = parser.parse_args()

    import torch

    from gcupipe.formats.registry import read_quantized
    from gcupipe.runtime.model import build_model, load_config, load_float_model
    from gcupipe.runtime.perplexity import load_tokenizer, perplexity, tokenize
    from gcupipe.stages.base import StageContext
    from gcupipe.stages.quantize import QuantizeConfig, QuantizeStage
    from gcupipe.testing.real_data import botchan_text, smollm2_checkpoint

    torch.manual_seed(0)
    source = smollm2_checkpoint()
    calib_text, eval_text = botchan_text()
    ids = tokenize(load_tokenizer(source), eval_text, args.max_tokens)
    work = Path(tempfile.mkdtemp(prefix="quantize-accuracy-"))
    (work / "calib.txt").write_text(calib_text)
    calibration = {
        "text_file": work / "calib.txt",
        "samples": args.calib_samples,
        "seq_len": args.calib_seq_len,
    }
    float_ppl = perplexity(load_float_model(source), ids).ppl
    print(f"float: {float_ppl:.3f} ({len(ids)} tokens)", flush=True)
    rows = [("float32 (dequantized GGUF)", float_ppl, 0.0)]
    for label, config in CASES:
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
    dynamic = next(p for label, p, _ in rows if label == "w8a8_dynamic")
    peer = LLMCOMPRESSOR_W8A8 / FLOAT_FULL * float_ppl  # the peer's ratio, on these tokens
    lines = [
        "# Quantization core accuracy: SmolLM2-135M-Instruct, Botchan eval text",
        "",
        f"{len(ids)} eval tokens, window 512 / stride 512; calibration {args.calib_samples} x "
        f"{args.calib_seq_len} tokens of the calibration text. Each model is written as "
        "modelslim, read back and run on the reference runtime (target-kernel math).",
        "",
        "| method | ppl | vs float | quantize time (s) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {label} | {ppl:.3f} | {ppl / float_ppl - 1:+.2%} | {s:.0f} |" for label, ppl, s in rows
    ]
    lines += [
        "",
        f"llmcompressor W8A8 preset (DATA.md, full eval): {LLMCOMPRESSOR_W8A8} = "
        f"{LLMCOMPRESSOR_W8A8 / FLOAT_FULL:.4f} x float; w8a8_dynamic here: "
        f"{dynamic / float_ppl:.4f} x float, ratio to the peer {dynamic / peer:.4f} "
        "(acceptance: <= 1.005).",
    ]
    figures = {label: {"ppl": ppl, "seconds": s} for label, ppl, s in rows}
    figures["eval_tokens"] = len(ids)  # type: ignore[assignment]
    write_results("quantize_accuracy", figures, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
