"""Peak memory and throughput of streaming w8a8_dynamic quantization on a >= 6 GB checkpoint.

Builds a synthetic Llama-shaped bf16 checkpoint (random weights, several shards) under
<repo>/.cache/bench-quantize-memory, then in fresh child processes (so each peak RSS is its own)
1. copies the shards with a plain read-and-write (the I/O floor), and
2. quantizes it w8a8_dynamic into modelslim through the quantize stage,
in the order copy, quantize, quantize, copy, each from a cold page cache (dropped before every
run where this runs as root, with the Python packages read back in; otherwise the table says
the cache was warm), so neither job inherits the other's cached input. Prints peak RSS against
the budget (1.5 GB + 2 x the largest decoder layer) and throughput in GB of bf16 input per
second, each job's two runs and their spread, as a ratio to the plain copy. Writes
benchmarks/results/quantize_memory.md and deletes the checkpoint afterwards (--keep keeps it).

    python benchmarks/quantize_memory.py [--layers 16] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _results import drop_caches, write_results  # noqa: E402

WORK = REPO / ".cache" / "bench-quantize-memory"
CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def layer_tensors(index: int) -> dict[str, tuple[int, ...]]:
    h, i = CONFIG["hidden_size"], CONFIG["intermediate_size"]
    kv = CONFIG["num_key_value_heads"] * CONFIG["head_dim"]
    p = f"model.layers.{index}"
    return {
        f"{p}.self_attn.q_proj.weight": (h, h),
        f"{p}.self_attn.k_proj.weight": (kv, h),
        f"{p}.self_attn.v_proj.weight": (kv, h),
        f"{p}.self_attn.o_proj.weight": (h, h),
        f"{p}.mlp.gate_proj.weight": (i, h),
        f"{p}.mlp.up_proj.weight": (i, h),
        f"{p}.mlp.down_proj.weight": (h, i),
        f"{p}.input_layernorm.weight": (h,),
        f"{p}.post_attention_layernorm.weight": (h,),
    }


def build_checkpoint(path: Path, layers: int) -> tuple[int, int]:
    """Write the checkpoint one layer per shard; returns (total bytes, largest layer bytes)."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**CONFIG, "num_hidden_layers": layers}))
    generator = torch.Generator().manual_seed(0)
    shards: list[dict[str, tuple[int, ...]]] = [
        {"model.embed_tokens.weight": (CONFIG["vocab_size"], CONFIG["hidden_size"])}
    ]
    shards += [layer_tensors(i) for i in range(layers)]
    shards.append(
        {
            "model.norm.weight": (CONFIG["hidden_size"],),
            "lm_head.weight": (CONFIG["vocab_size"], CONFIG["hidden_size"]),
        }
    )
    weight_map, total, largest = {}, 0, 0
    for number, shard in enumerate(shards, 1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for tensor_name, shape in shard.items():
            t = torch.empty(shape, dtype=torch.bfloat16)
            t.normal_(0, 0.02, generator=generator) if len(shape) == 2 else t.fill_(1.0)
            tensors[tensor_name] = t
        size = sum(t.numel() * 2 for t in tensors.values())
        total += size
        if ".layers." in next(iter(shard)):
            largest = max(largest, size)
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update({n: name for n in shard})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return total, largest


def child_copy(src: str, dst: str) -> None:
    out = Path(dst)
    out.mkdir(parents=True, exist_ok=True)
    for file in sorted(Path(src).iterdir()):
        with file.open("rb") as reader, (out / file.name).open("wb") as writer:
            shutil.copyfileobj(reader, writer, 64 << 20)


def child_quantize(src: str, dst: str) -> None:
    from gcupipe.stages.base import StageContext
    from gcupipe.stages.quantize import QuantizeConfig, QuantizeStage

    out = Path(dst)
    out.mkdir(parents=True, exist_ok=True)
    scratch = out.parent / "scratch"
    ctx = StageContext("quantize", out, scratch, scratch, scratch, log=lambda m: None)
    config = QuantizeConfig(model=Path(src), method="w8a8_dynamic", format="modelslim")
    QuantizeStage().run(config, ctx)


def run_child(kind: str, src: Path, dst: Path) -> tuple[float, float]:
    """Run one job in a fresh interpreter; returns (seconds, peak RSS in GB). The time includes
    syncing its output to disk, so that none of its write-back lands in the next job's time."""
    shutil.rmtree(dst, ignore_errors=True)
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r}); import os, resource, time;"
        f"from benchmarks.quantize_memory import child_{kind} as job;"
        f"t = time.perf_counter(); job({str(src)!r}, {str(dst)!r}); os.sync();"
        f"print(time.perf_counter() - t,"
        f" resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = (
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
        .stdout.strip()
        .splitlines()[-1]
    )
    seconds, rss_kb = out.split()
    shutil.rmtree(dst, ignore_errors=True)
    return float(seconds), int(rss_kb) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    args = parser.parse_args()
    src = WORK / "model"
    if not (src / "model.safetensors.index.json").is_file():
        started = time.perf_counter()
        shutil.rmtree(src, ignore_errors=True)
        total, largest = build_checkpoint(src, args.layers)
        print(f"built {total / 1e9:.2f} GB checkpoint in {time.perf_counter() - started:.0f} s")
    else:
        index = json.loads((src / "model.safetensors.index.json").read_text())
        total = index["metadata"]["total_size"]
        largest = sum(2 * __import__("math").prod(s) for s in layer_tensors(0).values())
    runs: dict[str, list[tuple[float, float]]] = {"copy": [], "quantize": []}
    cold = True
    try:
        for kind in ("copy", "quantize", "quantize", "copy"):
            cold = drop_caches() and cold
            runs[kind].append(run_child(kind, src, WORK / kind))
    finally:
        if not args.keep:
            shutil.rmtree(WORK, ignore_errors=True)
    budget = 1.5 + 2 * largest / 1e9
    copy_rates = [total / 1e9 / seconds for seconds, _ in runs["copy"]]
    quant_rates = [total / 1e9 / seconds for seconds, _ in runs["quantize"]]
    copy_rate, quant_rate = sum(copy_rates) / 2, sum(quant_rates) / 2
    quant_rss = max(rss for _, rss in runs["quantize"])
    copy_rss = max(rss for _, rss in runs["copy"])

    def spread(rates: list[float]) -> str:
        return " / ".join(f"{r:.3f}" for r in rates) + " GB/s"

    rows = [
        (
            "checkpoint (bf16)",
            f"{total / 1e9:.2f} GB, {args.layers} layers, largest layer {largest / 1e9:.3f} GB",
        ),
        ("page cache before each run", "dropped (cold)" if cold else "not dropped (warm)"),
        (
            "peak RSS, quantize w8a8_dynamic",
            f"{quant_rss:.2f} GB (budget {budget:.2f} GB: "
            f"{'OK' if quant_rss < budget else 'OVER'})",
        ),
        ("peak RSS, plain copy", f"{copy_rss:.2f} GB"),
        ("throughput, quantize (2 runs)", spread(quant_rates)),
        ("throughput, plain read-and-copy (2 runs)", spread(copy_rates)),
        ("ratio quantize / copy (means)", f"{quant_rate / copy_rate:.2f}"),
    ]
    text = (
        "# Streaming quantization: memory and throughput\n\n"
        "`python benchmarks/quantize_memory.py`, run order copy, quantize, quantize, copy.\n\n"
        "| what | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    )
    figures = {
        "input_gb": total / 1e9,
        "largest_layer_gb": largest / 1e9,
        "cold_cache": cold,
        "quantize_runs_s": [seconds for seconds, _ in runs["quantize"]],
        "copy_runs_s": [seconds for seconds, _ in runs["copy"]],
        "peak_rss_quantize_gb": quant_rss,
        "peak_rss_copy_gb": copy_rss,
        "budget_gb": budget,
        "quantize_gb_per_s": quant_rate,
        "copy_gb_per_s": copy_rate,
        "ratio": quant_rate / copy_rate,
    }
    write_results("quantize_memory", figures, text)
    print(text)


if __name__ == "__main__":
    main()
