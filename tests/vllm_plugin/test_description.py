"""The description lookup: fused parts must agree, and a missing layer names its tensor."""

from __future__ import annotations

import pytest

from gcupipe.vllm_plugin.description import DescriptionError, QuantDescription

PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def _description(**types: str) -> QuantDescription:
    raw = {"model_quant_type": "W8A8_DYNAMIC", "version": "1.0.0", "group_size": 0}
    raw.update({name.replace("__", "."): kind for name, kind in types.items()})
    return QuantDescription.from_dict(raw)


def _layer(kind: str, prefix: str = "model.layers.0.self_attn") -> dict[str, str]:
    return {f"{prefix}.{part}.weight": kind for part in ("q_proj", "k_proj", "v_proj")}


def test_metadata_is_not_a_tensor() -> None:
    description = QuantDescription.from_dict(
        {
            "model_quant_type": "W4A16",
            "version": "1.0.0",
            "group_size": 64,
            "kv_cache_type": "C8",
            "a.weight": "W4A16",
        }
    )
    assert description.group_size == 64
    assert description.kv_cache_type == "C8"
    assert dict(description.tensor_types) == {"a.weight": "W4A16"}


def test_fused_qkv_takes_the_shared_type() -> None:
    description = QuantDescription.from_dict(_layer("W8A16"))
    assert description.layer_type("model.layers.0.self_attn.qkv_proj", PACKED) == "W8A16"


def test_plain_layer_and_float() -> None:
    description = QuantDescription.from_dict({"model.layers.0.self_attn.o_proj.weight": "FLOAT"})
    assert description.layer_type("model.layers.0.self_attn.o_proj", PACKED) == "FLOAT"


def test_fused_parts_with_different_types_are_refused() -> None:
    types = _layer("W8A8_DYNAMIC")
    types["model.layers.0.self_attn.v_proj.weight"] = "W8A16"
    description = QuantDescription.from_dict(types)
    with pytest.raises(DescriptionError, match="v_proj.weight=W8A16"):
        description.layer_type("model.layers.0.self_attn.qkv_proj", PACKED)


def test_missing_layer_names_the_tensor() -> None:
    types = _layer("W8A8_DYNAMIC")
    del types["model.layers.0.self_attn.k_proj.weight"]
    description = QuantDescription.from_dict(types)
    with pytest.raises(DescriptionError) as info:
        description.layer_type("model.layers.0.self_attn.qkv_proj", PACKED)
    message = str(info.value)
    assert "'model.layers.0.self_attn.k_proj.weight'" in message
    assert "quant_model_description.json" in message
    assert "qkv_proj" in message


def test_kv_cache_type_is_not_a_weight_type() -> None:
    description = QuantDescription.from_dict({"m.k_proj.weight": "C8"})
    with pytest.raises(DescriptionError, match="not a linear weight type"):
        description.layer_type("m.k_proj", {})


def test_renamed_modules_are_found_under_their_checkpoint_names() -> None:
    description = QuantDescription.from_dict(
        {"language_model.model.layers.0.mlp.down_proj.weight": "W8A16"}
    )
    description.renames["model."] = "language_model.model."
    assert description.layer_type("model.layers.0.mlp.down_proj", {}) == "W8A16"
