"""Full-size checkpoints of published architectures with random weights, for work at real width
where no hub is reachable.

    python -m gcupipe.testing.synthetic deepseek-v2-lite DIR [--layers N] [--seed S]

writes DIR with the published config.json (less `auto_map`: the directory carries no remote
code, transformers' own `deepseek_v2` reads it), the published tensor names and bf16 shard
layout, and random weights whose scales keep a forward pass finite: norms 1, every other 2-D
weight N(0, 1/fan_in), the embedding N(0, 1). Each tensor comes from its own generator seeded by
(seed, name), so layer k is the same whatever `--layers` says. Shards are streamed: a tensor is
generated, written and dropped, so generating 31 GB takes about one tensor of memory. `--layers N`
keeps the shape with fewer decoder layers (layer 0 stays the dense one).

The directory also gets a tokenizer of the model's vocabulary size: byte-level, the 256 byte
tokens first and DeepSeek's begin/end-of-sentence tokens at their published ids (the other ids
are placeholders), so text goes in and out as it does for the real model, one byte per token.

The tensor names and shapes are the ones transformers' model class loads (formats/layout.py:
expected_weights), in checkpoint order: embedding, layers 0..N-1 (experts by number), final
norm, lm_head.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEEPSEEK_V2_LITE: dict[str, Any] = {
    # deepseek-ai/DeepSeek-V2-Lite config.json, as published (1,522 bytes with `auto_map`):
    # checked against three stored copies and the Coder-V2-Lite config of the same family
    "architectures": ["DeepseekV2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 10944,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 27,
    "num_key_value_heads": 16,
    "pretraining_tp": 1,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 1.0,
    "scoring_func": "softmax",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "greedy",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 102400,
}

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

GENERATION_CONFIG = {
    "_from_model_config": True,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "do_sample": True,
    "temperature": 0.3,
    "top_p": 0.95,
    "transformers_version": "4.39.3",
}


class Shape:
    """A published checkpoint layout: its config and how its shards are named and cut."""

    def __init__(self, config: dict[str, Any], max_shard_bytes: int, shard_name: str):
        self.config = config
        self.max_shard_bytes = max_shard_bytes
        self.shard_name = shard_name  # format(index=1-based, count=N)


SHAPES = {
    # 4 shards of at most 8 GiB (8.59 / 8.59 / 8.59 / 5.64 GB), named with a six-digit total
    "deepseek-v2-lite": Shape(
        DEEPSEEK_V2_LITE, 8 << 30, "model-{index:05d}-of-{count:06d}.safetensors"
    ),
}

_EXPERT = re.compile(r"^(?P<layer>.+\.mlp)\.experts\.(?P<e>\d+)\.(?P<part>gate|up|down)_proj\.")


def tensor_plan(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the checkpoint, in the order the published one was saved
    (its modules' order): transformers' order, with each MoE layer's routed experts one by one
    (gate, up, down) before its router, as the original modeling code registers them."""
    from gcupipe.formats.layout import expected_weights_for_config

    shapes = expected_weights_for_config(config)
    if shapes is None:
        raise ValueError(f"transformers cannot build a {config['model_type']} model")
    names = list(shapes)
    position = {name: float(i) for i, name in enumerate(names)}
    parts = ("gate", "up", "down")
    for name in names:
        match = _EXPERT.match(name)
        if match is not None:
            router = position[f"{match['layer']}.gate.weight"]
            rank = int(match["e"]) * 3 + parts.index(match["part"])
            position[name] = router - 1 + (rank + 1) / (3 * 10**6)
    return sorted(shapes.items(), key=lambda item: position[item[0]])


def _shards(
    plan: list[tuple[str, tuple[int, ...]]], max_bytes: int, itemsize: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Cut the plan into shards the way save_pretrained does: a new shard when the next tensor
    would make this one exceed `max_bytes`."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in plan:
        nbytes = itemsize
        for dim in shape:
            nbytes *= dim
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> Any:
    """The weight `name` of a synthetic model: 1 for norms, N(0, 1) for the embedding,
    N(0, 1/fan_in) for the projections; from a generator of its own."""
    import torch

    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    std = 1.0 if "embed_tokens" in name else shape[-1] ** -0.5
    tensor = torch.empty(shape, dtype=torch.bfloat16)
    tensor.normal_(0.0, std, generator=generator)
    return tensor


def write_tokenizer(path: Path, vocab_size: int, bos_id: int, eos_id: int) -> None:
    """A byte-level tokenizer of `vocab_size` ids (see the module docstring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for i in range(len(vocab), vocab_size):
        vocab[BOS if i == bos_id else EOS if i == eos_id else f"<|placeholder_{i}|>"] = i
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, bos_id)]
    )
    tokenizer.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "model_max_length": 16384,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def write_synthetic(
    shape_name: str,
    path: Path,
    layers: int | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write the synthetic checkpoint `shape_name` into `path` (see the module docstring).
    Files appear complete or not at all: each shard is written under a temporary name."""
    from gcupipe.formats.base import safetensors_header, write_tensor_bytes

    if shape_name not in SHAPES:
        raise ValueError(f"unknown shape {shape_name!r}; known: {', '.join(SHAPES)}")
    shape = SHAPES[shape_name]
    config = dict(shape.config)
    if layers is not None:
        if not 1 <= layers <= config["num_hidden_layers"]:
            raise ValueError(f"--layers must be 1..{config['num_hidden_layers']}, not {layers}")
        config["num_hidden_layers"] = layers
    path.mkdir(parents=True, exist_ok=True)
    plan = tensor_plan(config)
    shards = _shards(plan, shape.max_shard_bytes, itemsize=2)
    weight_map: dict[str, str] = {}
    written = 0
    for index, shard in enumerate(shards, start=1):
        file_name = shape.shard_name.format(index=index, count=len(shards))
        temp = path / f".{file_name}.partial"
        entries = [(name, "bfloat16", dims) for name, dims in sorted(shard)]
        try:
            with temp.open("wb") as handle:
                handle.write(safetensors_header(entries, {"format": "pt"}))
                for name, _, dims in entries:
                    tensor = random_tensor(name, dims, seed)
                    write_tensor_bytes(handle, tensor)
                    written += tensor.numel() * 2
                    del tensor
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        temp.rename(path / file_name)
        weight_map.update({name: file_name for name, _ in shard})
        if progress is not None:
            progress(f"{file_name}: {len(shard)} tensors, {written / 1e9:.2f} GB written so far")
    weight_map = dict(sorted(weight_map.items()))
    index_json = {"metadata": {"total_size": written}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    (path / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    write_tokenizer(path, config["vocab_size"], config["bos_token_id"], config["eos_token_id"])
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gcupipe.testing.synthetic",
        description="Write a full-size checkpoint of a published architecture with random "
        "weights (streamed shard by shard; a few hundred MB of memory).",
    )
    parser.add_argument("shape", choices=sorted(SHAPES), help="which published model's shape")
    parser.add_argument("dir", type=Path, help="output directory")
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers")
    parser.add_argument("--seed", type=int, default=0, help="weights' seed (default 0)")
    args = parser.parse_args(argv)
    try:
        write_synthetic(
            args.shape,
            args.dir,
            layers=args.layers,
            seed=args.seed,
            progress=lambda line: print(line, flush=True),
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
