"""Per-architecture module maps: which tensors are linears, which fuse, what smoothing can move.

Data, not if-chains: adding an architecture is adding one `ArchMap` entry. Names are relative
to a decoder layer (`model.layers.<i>.`); regexes are matched with `re.fullmatch`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ArchMap:
    model_types: tuple[str, ...]
    linears: tuple[str, ...]  # regexes of quantizable linears inside a decoder layer
    # Modules a serving engine fuses into one (all parts must share one quant type). A group is
    # a tuple of regexes with one `(?P<key>...)` naming the unit (e.g. an expert index).
    fused: tuple[tuple[str, ...], ...]
    # (norm, reader regexes): a norm whose output feeds exactly these linears, so a per-channel
    # factor can be divided out of the norm gain and multiplied into the readers' input columns.
    smooth_groups: tuple[tuple[str, tuple[str, ...]], ...]
    router: tuple[str, ...] = ()  # linears that always stay float (MoE gates)
    # a linear that sees exactly the tokens routed to one expert; group 1 names the expert
    expert_input: str = ""
    # linears that see only the tokens a router sends them: the float and the quantized model
    # route differently, so their inputs in the two do not pair row by row
    routed: str = ""
    # (producer linear regex, reader template): the reader's input is a per-channel linear
    # function of the producer's output rows (up_proj -> down_proj through act(gate) * up), so
    # a factor can be divided out of the producer's rows and multiplied into the reader.
    linear_pairs: tuple[tuple[str, str], ...] = (
        (r"(mlp(?:\.shared_experts|\.experts\.\d+)?)\.up_proj", r"\1.down_proj"),
    )
    # linears whose output only feeds the layer's output: the capture pass, whose output is
    # thrown away, records their inputs and skips their matmul
    output_linears: tuple[str, ...] = (r"mlp\.(?:shared_experts\.|experts\.\d+\.)?down_proj",)
    layer_prefix: str = "model.layers"
    default_ignore: tuple[str, ...] = field(
        default=(r"lm_head", r".*embed_tokens", r".*\.mlp\.gate")
    )

    def is_linear(self, name: str) -> bool:
        return any(re.fullmatch(p, name) for p in self.linears)

    def is_routed(self, name: str) -> bool:
        return bool(self.routed) and re.fullmatch(self.routed, name) is not None


_LLAMA_ATTN = r"self_attn\.(q|k|v|o)_proj"
_MLP = r"mlp\.(gate|up|down)_proj"
_LLAMA_SMOOTH = (
    ("input_layernorm", (r"self_attn\.(q|k|v)_proj",)),
    ("post_attention_layernorm", (r"mlp\.(gate|up)_proj",)),
)
_LLAMA_FUSED = (
    (r"self_attn\.q_proj", r"self_attn\.k_proj", r"self_attn\.v_proj"),
    (r"mlp\.gate_proj", r"mlp\.up_proj"),
)

LLAMA = ArchMap(
    model_types=("llama", "mistral", "qwen2"),
    linears=(_LLAMA_ATTN, _MLP),
    fused=_LLAMA_FUSED,
    smooth_groups=_LLAMA_SMOOTH,
)

DEEPSEEK_V2 = ArchMap(
    model_types=("deepseek_v2", "deepseek_v3"),
    linears=(
        r"self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)",
        _MLP,
        r"mlp\.shared_experts\.(gate|up|down)_proj",
        r"mlp\.experts\.\d+\.(gate|up|down)_proj",
    ),
    fused=(
        # vLLM fuses q_a_proj + kv_a_proj_with_mqa into fused_qkv_a_proj
        (r"self_attn\.q_a_proj", r"self_attn\.kv_a_proj_with_mqa"),
        (r"mlp\.gate_proj", r"mlp\.up_proj"),
        (r"mlp\.shared_experts\.gate_proj", r"mlp\.shared_experts\.up_proj"),
        # every routed expert of a layer is one FusedMoE module
        (r"mlp\.experts\.\d+\.(gate|up|down)_proj",),
    ),
    # The router reads post_attention_layernorm too: it stays float and takes the factor.
    smooth_groups=(
        ("input_layernorm", (r"self_attn\.(q_proj|q_a_proj|kv_a_proj_with_mqa)",)),
        (
            "post_attention_layernorm",
            (
                r"mlp\.(gate|up)_proj",
                r"mlp\.(shared_experts|experts\.\d+)\.(gate|up)_proj",
                r"mlp\.gate",
            ),
        ),
    ),
    router=(r"mlp\.gate",),
    expert_input=r"(mlp\.experts\.\d+)\.gate_proj",
    routed=r"mlp\.experts\.\d+\..+",
)

ARCHS: dict[str, ArchMap] = {t: a for a in (LLAMA, DEEPSEEK_V2) for t in a.model_types}


def arch_for(model_type: str) -> ArchMap:
    """The module map of a model type, or KeyError naming the supported ones."""
    try:
        return ARCHS[model_type]
    except KeyError:
        raise KeyError(
            f"architecture {model_type!r} is not supported by the quantizer; "
            f"supported: {', '.join(sorted(ARCHS))}"
        ) from None


def fused_key(arch: ArchMap, name: str) -> str | None:
    """The fused-group id of an in-layer linear name (same id = must share one type)."""
    for index, group in enumerate(arch.fused):
        if any(re.fullmatch(p, name) for p in group):
            return f"fused{index}"
    return None
