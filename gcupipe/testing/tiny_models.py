"""Tiny random checkpoints of the supported architectures, written the way real ones are.

`tiny_model(arch, path, **config_overrides) -> Path` writes config.json, safetensors shards
(+ index when sharded) and generation_config.json, with seeded random weights. DeepSeek-V2 is
written with per-expert tensor names (`mlp.experts.<e>.gate_proj.weight`), as the released
checkpoints are, not with transformers' fused in-memory expert tensors. Sizes are multiples of
64 so group size 64 divides every linear layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "tie_word_embeddings": False,
    },
    "mistral": {
        "model_type": "mistral",
        "architectures": ["MistralForCausalLM"],
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "sliding_window": None,
        "tie_word_embeddings": False,
    },
    "qwen2": {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 128,
        "intermediate_size": 192,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    },
    "deepseek_v2": {
        "model_type": "deepseek_v2",
        "architectures": ["DeepseekV2ForCausalLM"],
        "hidden_size": 128,
        "intermediate_size": 256,
        "moe_intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 64,
        "kv_lora_rank": 64,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 32,
        "v_head_dim": 32,
        "head_dim": 32,
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "first_k_dense_replace": 1,
        "topk_method": "greedy",
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
        "tie_word_embeddings": False,
    },
}

COMMON = {
    "vocab_size": 256,
    "num_hidden_layers": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def tiny_config(arch: str, **overrides: Any) -> Any:
    """The transformers config object of a tiny `arch` model."""
    from transformers import AutoConfig

    if arch not in ARCH_DEFAULTS:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {sorted(ARCH_DEFAULTS)}")
    values = {**COMMON, **ARCH_DEFAULTS[arch], **overrides}
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)


def _checkpoint_state_dict(model: Any) -> dict[str, Any]:
    """The model's tensors under checkpoint names: fused MoE experts split per expert."""
    state: dict[str, Any] = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            gate, up = tensor.chunk(2, dim=1)
            for e in range(tensor.shape[0]):
                state[f"{prefix}{e}.gate_proj.weight"] = gate[e].clone()
                state[f"{prefix}{e}.up_proj.weight"] = up[e].clone()
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(tensor.shape[0]):
                state[f"{prefix}{e}.down_proj.weight"] = tensor[e].clone()
        else:
            state[name] = tensor.detach().clone().contiguous()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def save_shards(state: dict[str, Any], path: Path, shards: int = 1) -> None:
    """Write `state` as `shards` safetensors files (+ index when more than one)."""
    from safetensors.torch import save_file

    names = list(state)
    if shards <= 1:
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    per = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i in range(shards):
        part = names[i * per : (i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n] for n in part}, str(path / fname), metadata={"format": "pt"})
        for n in part:
            weight_map[n] = fname
            total += state[n].numel() * state[n].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def tiny_model(
    arch: str,
    path: Path | str,
    *,
    seed: int = 0,
    shards: int = 1,
    dtype: str = "float32",
    **config_overrides: Any,
) -> Path:
    """Write a tiny random `arch` checkpoint to `path` and return it.

    arch: llama | mistral | qwen2 | deepseek_v2. Weights are normal(0, 0.02)-initialised by
    transformers from `seed`; norms get small random gains so smoothing has something to move."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = tiny_config(arch, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
    state = _checkpoint_state_dict(model)
    state = {n: t.to(getattr(torch, dtype)) for n, t in state.items()}
    save_shards(state, path, shards)
    config.dtype = dtype
    config.save_pretrained(path)
    (path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "max_new_tokens": 16})
    )
    return path
