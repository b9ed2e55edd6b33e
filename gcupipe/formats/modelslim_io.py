"""Writing and reading the modelslim layout (the seed's msModelSlim / vllm-ascend, DESIGN.md 4.1).

quant_model_description.json lists every saved tensor with its type, plus `lm_head.weight:
FLOAT` when the embeddings are tied (vLLM still builds an lm_head and vllm-ascend looks its type
up); weights go to quant_model_weight_<type>-0000i-of-0000N.safetensors + index; config.json
has no quantization_config (vLLM reads the description through the plugin's config filenames).
Static W8A8 `deq_scale` is float32, or int64 carrying the fp32 bits when the target asks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gcupipe.formats.base import (
    FormatWriter,
    QuantizedCheckpoint,
    ShardWriter,
    TensorSelector,
    copy_side_files,
    read_tensors,
    strip_quantization_config,
)
from gcupipe.quant.packing import pack_int4_modelslim, unpack_int4_modelslim
from gcupipe.quant.scheme import (
    TYPE_STRENGTH,
    ActivationScheme,
    KVCacheScale,
    QuantizedLinear,
    QuantType,
)

if TYPE_CHECKING:
    import torch

DESCRIPTION = "quant_model_description.json"
TIED_LM_HEAD = "lm_head.weight"
"""Listed (FLOAT) without a tensor when the embeddings are tied."""
QUANTIZATION = "gcu"  # the vLLM --quantization name of the gcupipe plugin for this layout
_KV = re.compile(
    r"^(?P<attn>.*\.layers\.(?P<index>\d+)\.[^.]+)\.(?P<kv>k|v)_proj\.kv_cache_"
    r"(?P<what>scale|offset)$"
)


class ModelslimWriter(FormatWriter):
    name = "modelslim"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.description: dict[str, str] = {}
        self.types: set[QuantType] = set()
        self.group_sizes: set[int] = set()
        self.kv = False
        self.shards = ShardWriter(
            self.out_dir,
            "quant_model_weight",
            "",
            self.max_shard_bytes,
            always_numbered=True,
            parts_dir=self.parts_dir,
        )

    def _add(self, name: str, tensor: torch.Tensor, kind: QuantType) -> None:
        self.shards.add(name, tensor)
        self.description[name] = kind.value

    def add_float(self, name: str, tensor: torch.Tensor) -> None:
        self._add(name, tensor, QuantType.FLOAT)

    def add_linear(self, prefix: str, layer: QuantizedLinear) -> None:
        import torch

        kind = layer.quant_type
        self.types.add(kind)
        self.group_sizes.add(layer.group_size)
        weight = pack_int4_modelslim(layer.weight) if layer.bits == 4 else layer.weight
        self._add(f"{prefix}.weight", weight.to(torch.int8), kind)
        self._add(f"{prefix}.weight_scale", layer.weight_scale.float(), kind)
        self._add(f"{prefix}.weight_offset", layer.weight_offset.float(), kind)
        if kind is QuantType.W8A8:
            assert layer.input_scale is not None and layer.input_offset is not None
            self._add(f"{prefix}.input_scale", layer.input_scale.float().reshape(1), kind)
            self._add(f"{prefix}.input_offset", layer.input_offset.float().reshape(1), kind)
            deq_scale = layer.deq_scale().float()
            if self.options.deq_scale_int64:
                deq_scale = fp32_bits_as_int64(deq_scale)
            self._add(f"{prefix}.deq_scale", deq_scale, kind)
            self._add(f"{prefix}.quant_bias", layer.quant_bias(), kind)
        if layer.bias is not None:
            self._add(f"{prefix}.bias", layer.bias.float(), kind)

    def add_kv_cache(self, attn_prefix: str, scale: KVCacheScale, kv_channels: int) -> None:
        import torch

        self.kv = True
        for kv, s, o in (
            ("k", scale.k_scale, scale.k_offset),
            ("v", scale.v_scale, scale.v_offset),
        ):
            self._add(
                f"{attn_prefix}.{kv}_proj.kv_cache_scale",
                torch.full((kv_channels,), s, dtype=torch.float32),
                QuantType.C8,
            )
            self._add(
                f"{attn_prefix}.{kv}_proj.kv_cache_offset",
                torch.full((kv_channels,), o, dtype=torch.float32),
                QuantType.C8,
            )

    def end_layer(self) -> None:
        self.shards.maybe_flush()

    def layout_state(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "types": sorted(t.value for t in self.types),
            "group_sizes": sorted(self.group_sizes),
            "kv": self.kv,
        }

    def restore_layout(self, state: dict[str, Any]) -> None:
        self.description = dict(state["description"])
        self.types = {QuantType(t) for t in state["types"]}
        self.group_sizes = set(state["group_sizes"])
        self.kv = bool(state["kv"])

    def finish(self, float_linears: Sequence[str] = ()) -> list[str]:
        # every tensor is listed with its type in the description: float linears need no list
        strongest = max(self.types, key=TYPE_STRENGTH.index, default=QuantType.FLOAT)
        stem = f"quant_model_weight_{strongest.value.lower()}"
        self.shards.stem = stem
        self.shards.index_name = f"{stem}.safetensors.index.json"
        # temp files were named with the provisional stem; finish() renames them
        files = self.shards.finish()
        description: dict[str, Any] = {
            "model_quant_type": strongest.value,
            "version": "1.0.0",
            "group_size": max(self.group_sizes, default=0),
        }
        if self.kv:
            description["kv_cache_type"] = "C8"
        description.update(self.description)
        if self.source_config.get("tie_word_embeddings") and TIED_LM_HEAD not in description:
            description[TIED_LM_HEAD] = QuantType.FLOAT.value
        (self.out_dir / DESCRIPTION).write_text(json.dumps(description, indent=2))
        config = strip_quantization_config(self.source_config)
        (self.out_dir / "config.json").write_text(json.dumps(config, indent=2))
        copy_side_files(self.source_dir, self.out_dir)
        return files


def fp32_bits_as_int64(values: torch.Tensor) -> torch.Tensor:
    """float32 values -> int64 whose low 32 bits are their IEEE bits, high bits zero."""
    import torch

    return values.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def read_modelslim(path: Path, select: TensorSelector | None = None) -> QuantizedCheckpoint:
    """A modelslim directory -> QuantizedCheckpoint (shared representation); only the tensors
    `select` accepts (a whole module prefix at a time) when given."""
    description = json.loads((path / DESCRIPTION).read_text())
    tensors = read_tensors(sorted(path.glob("quant_model_weight*.safetensors")), select)
    types = {k: v for k, v in description.items() if isinstance(v, str) and k in tensors}
    config = json.loads((path / "config.json").read_text())
    ckpt = QuantizedCheckpoint(
        format="modelslim",
        method=str(description.get("model_quant_type", "")).lower(),
        config=config,
        quantization=QUANTIZATION,
        group_size=int(description.get("group_size", 0)),
    )
    kv: dict[int, dict[str, float]] = {}
    for name, tensor in tensors.items():
        kind = types.get(name, "FLOAT")
        if kind == QuantType.C8.value:
            match = _KV.match(name)
            if match:
                kv.setdefault(int(match["index"]), {})[f"{match['kv']}_{match['what']}"] = float(
                    tensor.reshape(-1)[0]
                )
            continue
        if kind == QuantType.FLOAT.value:
            ckpt.float_tensors[name] = tensor
        elif name.endswith(".weight"):
            prefix = name[: -len(".weight")]
            ckpt.linears[prefix] = _linear(prefix, QuantType(kind), tensors)
    ckpt.kv_scales = [  # a selection may hold one of k and v: only whole layers count
        KVCacheScale(i, v["k_scale"], v["k_offset"], v["v_scale"], v["v_offset"])
        for i, v in sorted(kv.items())
        if len(v) == 4
    ]
    return ckpt


def _linear(prefix: str, kind: QuantType, tensors: dict[str, torch.Tensor]) -> QuantizedLinear:
    weight = tensors[f"{prefix}.weight"]
    bits = 4 if kind is QuantType.W4A16 else 8
    if bits == 4:
        weight = unpack_int4_modelslim(weight)
    scale = tensors[f"{prefix}.weight_scale"].float()
    offset = tensors[f"{prefix}.weight_offset"].float()
    groups = scale.shape[1] if scale.ndim == 2 else 1
    group_size = weight.shape[1] // groups if groups > 1 else 0
    activation = {
        QuantType.W8A8: ActivationScheme.STATIC,
        QuantType.W8A8_DYNAMIC: ActivationScheme.DYNAMIC,
    }.get(kind, ActivationScheme.NONE)
    bias = tensors.get(f"{prefix}.bias")
    layer = QuantizedLinear(
        weight=weight,
        weight_scale=scale.reshape(weight.shape[0], -1),
        weight_offset=offset.reshape(weight.shape[0], -1),
        bits=bits,
        group_size=group_size,
        symmetric=bool((offset == 0).all()),
        activation=activation,
        bias=None if bias is None else bias.float(),
    )
    if activation is ActivationScheme.STATIC:
        layer.input_scale = tensors[f"{prefix}.input_scale"].float().reshape(1)
        layer.input_offset = tensors[f"{prefix}.input_offset"].float().reshape(1)
        if layer.bias is None:  # recover the float bias from the integer one
            deq = layer.deq_scale()
            rowsum = weight.long().sum(dim=1).float()
            quant_bias = tensors[f"{prefix}.quant_bias"].float()
            layer.bias = (quant_bias + rowsum * layer.input_offset) * deq
    return layer
