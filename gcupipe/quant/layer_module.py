"""One decoder layer as a runnable transformers module, built from lazily read tensors.

The layer class is the architecture's own (so attention, rotary embeddings and MoE routing are
upstream's); routed experts are swapped for a ModuleList of per-expert nn.Linear modules named
like the checkpoint (`mlp.experts.<e>.gate_proj`), so every quantizable weight is a real
nn.Linear whose inputs a forward hook can capture: routed experts see only their tokens.
"""

from __future__ import annotations

import copy
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

KV_OBSERVE_ATTENTION = "gcupipe_kv_observe"
KV_OBSERVERS_ATTR = "_gcupipe_kv_observers"


def modeling_module(config: Any) -> Any:
    from transformers import AutoModelForCausalLM

    model_cls = AutoModelForCausalLM._model_mapping[type(config)]
    return sys.modules[model_cls.__module__]


def find_class(module: Any, suffix: str) -> Any:
    for name in dir(module):
        if name.endswith(suffix) and not name.startswith("_"):
            return getattr(module, name)
    raise KeyError(f"{module.__name__} has no *{suffix} class")


def rotary_embeddings(config: Any, seq_len: int) -> Any:
    """What the model passes every layer as `position_embeddings` for positions 0..seq_len-1."""
    import torch

    rotary = find_class(modeling_module(config), "RotaryEmbedding")(config=config)
    position_ids = torch.arange(seq_len).unsqueeze(0)
    dummy = torch.zeros(1, seq_len, 1)
    return rotary(dummy, position_ids)


def _experts_module() -> type:
    import torch
    from torch import nn

    class Expert(nn.Module):
        def __init__(self, hidden: int, intermediate: int, act_fn: Any):
            super().__init__()
            self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
            self.up_proj = nn.Linear(hidden, intermediate, bias=False)
            self.down_proj = nn.Linear(intermediate, hidden, bias=False)
            self.act_fn = act_fn

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
            return out

    class UnfusedExperts(nn.ModuleList):
        """Drop-in for transformers' fused experts: same forward signature, one Linear each."""

        def forward(self, hidden_states: Any, top_k_index: Any, top_k_weights: Any) -> Any:
            out = torch.zeros_like(hidden_states)
            for e, expert in enumerate(self):
                token_idx, slot = torch.where(top_k_index == e)
                if token_idx.numel() == 0:
                    continue
                h = expert(hidden_states[token_idx]) * top_k_weights[token_idx, slot, None]
                out.index_add_(0, token_idx, h.to(out.dtype))
            return out

    UnfusedExperts.Expert = Expert  # type: ignore[attr-defined]
    return UnfusedExperts


def build_layer(config: Any, layer_index: int, tensors: dict[str, torch.Tensor]) -> Any:
    """The decoder layer `layer_index` with `tensors` (names relative to the layer) loaded."""
    import torch

    config = copy.copy(config)
    config._attn_implementation = "sdpa"
    layer_cls = find_class(modeling_module(config), "DecoderLayer")
    with torch.device("meta"):
        layer = layer_cls(config, layer_index)
    experts = getattr(getattr(layer, "mlp", None), "experts", None)
    if experts is not None and hasattr(experts, "gate_up_proj"):
        unfused = _experts_module()
        expert_cls = unfused.Expert  # type: ignore[attr-defined]
        with torch.device("meta"):
            layer.mlp.experts = unfused(
                expert_cls(experts.hidden_dim, experts.intermediate_dim, experts.act_fn)
                for _ in range(experts.num_experts)
            )
    state = {name: t.float() if t.is_floating_point() else t for name, t in tensors.items()}
    missing, unexpected = layer.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise KeyError(f"layer {layer_index}: unexpected tensors {sorted(unexpected)[:3]}")
    for name in missing:  # non-persistent buffers (rotary inv_freq etc.) stay as built
        raise KeyError(f"layer {layer_index}: checkpoint lacks {name}")
    return layer.eval()


def _kv_observe_attention(
    module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any
) -> Any:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    observers = getattr(module, KV_OBSERVERS_ATTR, None)
    if observers is not None:
        observers[0].observe(key)
        observers[1].observe(value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def attach_kv_observers(layer: Any, observers: tuple[Any, Any]) -> bool:
    """Route the layer's attention through an sdpa wrapper that feeds K and V (as the attention
    kernel receives them: after rotary embedding) to `observers`. False if no attention found."""
    from transformers import AttentionInterface

    AttentionInterface.register(KV_OBSERVE_ATTENTION, _kv_observe_attention)
    attn = getattr(layer, "self_attn", None)
    if attn is None:
        return False
    attn.config = copy.copy(attn.config)
    attn.config._attn_implementation = KV_OBSERVE_ATTENTION
    setattr(attn, KV_OBSERVERS_ATTR, observers)
    return True


def detach_kv_observers(layer: Any) -> None:
    attn = getattr(layer, "self_attn", None)
    if attn is not None and hasattr(attn, KV_OBSERVERS_ATTR):
        delattr(attn, KV_OBSERVERS_ATTR)
        attn.config._attn_implementation = "sdpa"
