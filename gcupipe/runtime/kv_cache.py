"""INT8 KV cache on the reference runtime: K and V pass through int8 the way a cache stores them.

A target with `--kv-cache-dtype int8` writes q = clamp(round(x / scale + offset), -128, 127)
into the cache and reads (q - offset) * scale back, for the keys after rotary embedding and the
values. Here that round trip is applied to the key/value tensors an attention layer hands its
attention kernel, through a registered transformers attention implementation, so every
attention layer of every supported architecture is covered without patching model code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

ATTENTION_NAME = "gcupipe_int8_kv"
_KV_ATTR = "_gcupipe_kv_int8"


def kv_fake_quant(x: torch.Tensor, scale: Any, offset: Any) -> torch.Tensor:
    """int8 quantize then dequantize `x` [batch, kv_heads, tokens, head_dim].

    `scale`/`offset` are floats (per tensor) or tensors with one value per KV channel
    (kv_heads * head_dim, the modelslim C8 layout)."""
    import torch

    scale_t = torch.as_tensor(scale, dtype=torch.float32)
    offset_t = torch.as_tensor(offset, dtype=torch.float32)
    if scale_t.numel() > 1:
        heads, dim = x.shape[1], x.shape[3]
        scale_t = scale_t.reshape(1, heads, 1, dim)
        offset_t = offset_t.reshape(1, heads, 1, dim)
    q = torch.clamp(torch.round(x.float() / scale_t + offset_t), -128, 127)
    return ((q - offset_t) * scale_t).to(x.dtype)


def _int8_kv_attention(
    module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any
) -> Any:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    params = getattr(module, _KV_ATTR, None)
    if params is not None:
        k_scale, k_offset, v_scale, v_offset = params
        key = kv_fake_quant(key, k_scale, k_offset)
        value = kv_fake_quant(value, v_scale, v_offset)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def install_int8_kv(model: Any, scales: dict[int, tuple[Any, Any, Any, Any]]) -> int:
    """Attach (k_scale, k_offset, v_scale, v_offset) per layer index to the attention modules
    and switch the model to the int8-KV attention. Returns how many layers got scales."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _int8_kv_attention)
    attached = 0
    for module in model.modules():
        layer_idx = getattr(module, "layer_idx", None)
        if layer_idx is None or not hasattr(module, "o_proj"):
            continue
        if layer_idx in scales:
            setattr(module, _KV_ATTR, scales[layer_idx])
            attached += 1
    model.set_attn_implementation(ATTENTION_NAME)
    return attached


def attach_int8_kv(attention: Any, params: tuple[Any, Any, Any, Any]) -> None:
    """The same as `install_int8_kv` for one attention module outside a full model (the
    layer-by-layer evaluator builds decoder layers one at a time)."""
    import copy

    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _int8_kv_attention)
    attention.config = copy.copy(attention.config)
    attention.config._attn_implementation = ATTENTION_NAME
    setattr(attention, _KV_ATTR, params)
