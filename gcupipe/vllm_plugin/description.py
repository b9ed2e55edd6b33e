"""Reads the modelslim quant_model_description.json and answers "which type is this vLLM layer?".

Pure Python (no vLLM, no torch) so the lookup rules, including fused modules whose parts must
share one type and the error that names a missing tensor, are testable without starting vLLM.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DESCRIPTION_FILE = "quant_model_description.json"

LINEAR_TYPES = ("FLOAT", "W8A8", "W8A8_DYNAMIC", "W8A16", "W4A16")
"""Types a linear layer's `.weight` may carry (C8 is a KV-cache type, never a weight's)."""

_METADATA_KEYS = {"model_quant_type", "version", "group_size", "kv_cache_type", "metadata"}


class DescriptionError(ValueError):
    """The description file cannot serve a layer; the message names the tensor and the fix.

    A ValueError so vLLM reports it as a configuration problem at start-up."""


@dataclass(frozen=True)
class QuantDescription:
    """The parsed description: metadata plus one type per saved tensor name."""

    tensor_types: Mapping[str, str]
    model_quant_type: str = "FLOAT"
    group_size: int = 0
    kv_cache_type: str | None = None
    # Maps checkpoint (HF) name fragments to vLLM module names for models that rename modules.
    renames: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> QuantDescription:
        tensor_types = {
            key: str(value)
            for key, value in raw.items()
            if key not in _METADATA_KEYS and isinstance(value, str)
        }
        return cls(
            tensor_types=tensor_types,
            model_quant_type=str(raw.get("model_quant_type", "FLOAT")),
            group_size=int(raw.get("group_size", 0) or 0),
            kv_cache_type=raw.get("kv_cache_type"),
        )

    def tensor_type(self, name: str, layer_prefix: str) -> str:
        """The type of one saved tensor, or a DescriptionError naming it."""
        for candidate in (name, *self._aliases(name)):
            if candidate in self.tensor_types:
                return self.tensor_types[candidate]
        raise DescriptionError(
            f"gcu quantization: {DESCRIPTION_FILE} has no entry for tensor '{name}' "
            f"(needed by vLLM layer '{layer_prefix}'); the description and the weight files "
            "do not match: re-export the model (gcupipe quantize) or add the key"
        )

    def _aliases(self, name: str) -> list[str]:
        aliases = []
        for vllm_name, hf_name in self.renames.items():
            if vllm_name in name:
                aliases.append(name.replace(vllm_name, hf_name))
        return aliases

    def part_names(self, prefix: str, packed_modules: Mapping[str, list[str]]) -> list[str]:
        """Checkpoint module names behind a vLLM layer (several for a fused module)."""
        parent, _, leaf = prefix.rpartition(".")
        parts = packed_modules.get(leaf)
        if not parts:
            return [prefix]
        return [f"{parent}.{part}" if parent else part for part in parts]

    def has_kv_cache_scales(self, prefix: str, packed_modules: Mapping[str, list[str]]) -> bool:
        """Whether C8 KV-cache tensors are stored under this layer (k_proj / v_proj parts)."""
        return any(
            f"{part}.kv_cache_scale" in self.tensor_types
            for part in self.part_names(prefix, packed_modules)
        )

    def layer_type(self, prefix: str, packed_modules: Mapping[str, list[str]]) -> str:
        """The one type of a (possibly fused) vLLM linear layer named `prefix`.

        A fused module (qkv_proj, gate_up_proj, fused_qkv_a_proj...) is looked up part by part;
        its parts must share one type because vLLM loads them into one tensor."""
        names = [f"{part}.weight" for part in self.part_names(prefix, packed_modules)]
        types = {name: self.tensor_type(name, prefix) for name in names}
        distinct = sorted(set(types.values()))
        if len(distinct) > 1:
            listed = ", ".join(f"{name}={kind}" for name, kind in types.items())
            raise DescriptionError(
                f"gcu quantization: the parts of fused layer '{prefix}' have different types "
                f"({listed}); vLLM fuses them into one tensor, so quantize them alike"
            )
        kind = distinct[0]
        if kind not in LINEAR_TYPES:
            raise DescriptionError(
                f"gcu quantization: tensor '{names[0]}' has type '{kind}', which is not a linear "
                f"weight type (expected one of {', '.join(LINEAR_TYPES)})"
            )
        return kind

    def has_prefix(self, prefix: str) -> bool:
        """Whether any saved tensor lives under `prefix` (used to accept unlisted non-linears)."""
        start = prefix + "."
        return any(name.startswith(start) for name in self.tensor_types)
