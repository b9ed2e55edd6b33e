"""The vLLM QuantizationConfig named "gcu": modelslim artifacts on any vLLM platform."""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.quantization.base_config import (
    QuantizationConfig,
    QuantizeMethodBase,
)

from gcupipe.vllm_plugin.description import DESCRIPTION_FILE, DescriptionError, QuantDescription

QUANTIZATION_NAME = "gcu"


class GcuQuantConfig(QuantizationConfig):
    """Maps every vLLM layer to the linear method its modelslim description asks for."""

    # C8 KV-cache scales (`<attn>.k_proj.kv_cache_scale|offset`) are vllm-ascend's (its own
    # loader maps them to `<attn>.attn.k_cache_scale`); nothing in vLLM-GCU reads them (the gcu
    # target refuses a modelslim KV cache), so this plugin loads past them and leaves the KV
    # cache at vLLM's default.
    _ignore_unexpected_suffixes = (  # type: ignore[assignment]  # a longer tuple
        *QuantizationConfig._ignore_unexpected_suffixes,
        ".kv_cache_scale",
        ".kv_cache_offset",
    )

    def __init__(self, description: QuantDescription):
        super().__init__()  # type: ignore[no-untyped-call]
        self.description = description

    def __repr__(self) -> str:
        return (
            f"GcuQuantConfig(model_quant_type={self.description.model_quant_type}, "
            f"group_size={self.description.group_size})"
        )

    def get_name(self) -> str:  # type: ignore[override]
        return QUANTIZATION_NAME

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # plain torch math: any device vLLM runs on

    @staticmethod
    def get_config_filenames() -> list[str]:
        return [DESCRIPTION_FILE]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GcuQuantConfig:
        return cls(QuantDescription.from_dict(config))

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:  # type: ignore[no-untyped-def]
        """Models that rename checkpoint modules: remember vLLM -> HF fragments for lookups."""
        for attribute in ("orig_to_new_prefix", "orig_to_new_substr"):
            mapping = getattr(hf_to_vllm_mapper, attribute, None) or {}
            for hf_name, vllm_name in mapping.items():
                if vllm_name:
                    self.description.renames[vllm_name] = hf_name

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        # imported on first use, not when vLLM loads plugins (before its platform is set up)
        from vllm.model_executor.layers.linear import LinearBase
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        from gcupipe.vllm_plugin.linear import GcuKVCacheScalesMethod, linear_method

        if isinstance(layer, LinearBase):
            kind = self.description.layer_type(prefix, self.packed_modules_mapping)
            method = linear_method(kind, self.description.group_size, prefix)
            if self.description.has_kv_cache_scales(prefix, self.packed_modules_mapping):
                return GcuKVCacheScalesMethod(method)
            return method
        if isinstance(layer, VocabParallelEmbedding):
            name = f"{prefix}.weight"
            if name in self.description.tensor_types:
                kind = self.description.tensor_types[name]
                if kind != "FLOAT":
                    raise DescriptionError(
                        f"gcu quantization: tensor '{name}' is {kind}; quantized embeddings and "
                        "lm_head are not supported, keep them FLOAT"
                    )
            return None
        return _routed_experts_method(self, layer, prefix)


def _routed_experts_method(  # type: ignore[no-untyped-def]
    config: GcuQuantConfig, layer, prefix: str
) -> QuantizeMethodBase | None:
    """MoE experts: FLOAT experts run vLLM's unquantized method, quantized ones ours (moe.py).

    Every expert weight of a layer must share one type: vLLM stacks them into one tensor."""
    try:
        from vllm.model_executor.layers.fused_moe import RoutedExperts
    except ImportError:  # pragma: no cover - other vLLM versions
        return None
    if not isinstance(layer, RoutedExperts):
        return None
    expert_types = {
        kind
        for name, kind in config.description.tensor_types.items()
        if name.startswith(prefix + ".") and name.endswith(".weight")
    }
    if len(expert_types) > 1:
        raise DescriptionError(
            f"gcu quantization: MoE experts under '{prefix}' mix types {sorted(expert_types)}; "
            "vLLM stacks every expert of a layer into one tensor, so quantize them alike"
        )
    if expert_types - {"FLOAT"}:
        from gcupipe.vllm_plugin.moe import GcuFusedMoEMethod

        return GcuFusedMoEMethod(
            layer.moe_config, expert_types.pop(), config.description.group_size, prefix
        )
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
        UnquantizedFusedMoEMethod,
    )

    return UnquantizedFusedMoEMethod(layer.moe_config)
