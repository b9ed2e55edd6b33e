"""Writing and reading `compressed-tensors`, the layout upstream vLLM loads, through that library.

The config is built from compressed_tensors' QuantizationConfig / QuantizationScheme /
QuantizationArgs, and the tensors of each module come out of the library's own compressor for
the format (pack-quantized for weight-only, int-quantized for W8A8), fed with the dequantized
weight and the exact scale / zero point of our QuantizedLinear, so the library's rounding
reproduces our integers.
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
from gcupipe.quant.scheme import ActivationScheme, KVCacheScale, QuantizedLinear

if TYPE_CHECKING:
    import torch

QUANTIZATION = "compressed-tensors"


def scheme_for(layer: QuantizedLinear, targets: list[str]) -> Any:
    """The compressed_tensors QuantizationScheme describing `layer`."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(
        num_bits=layer.bits,
        type="int",
        symmetric=layer.symmetric,
        strategy="group" if layer.group_size else "channel",
        group_size=layer.group_size or None,
    )
    activations = None
    if layer.activation is ActivationScheme.DYNAMIC:
        activations = QuantizationArgs(
            num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True
        )
    elif layer.activation is ActivationScheme.STATIC:
        symmetric = layer.input_offset is None or float(layer.input_offset.abs().max()) == 0
        activations = QuantizationArgs(
            num_bits=8, type="int", symmetric=symmetric, strategy="tensor", dynamic=False
        )
    return QuantizationScheme(targets=targets, weights=weights, input_activations=activations)


def _format_for(layer: QuantizedLinear) -> str:
    return "int-quantized" if layer.activation is not ActivationScheme.NONE else "pack-quantized"


class CompressedTensorsWriter(FormatWriter):
    name = "compressed-tensors"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.shards = ShardWriter(
            self.out_dir,
            "model",
            "model.safetensors.index.json",
            self.max_shard_bytes,
            parts_dir=self.parts_dir,
        )
        self.groups: dict[str, tuple[Any, list[str]]] = {}  # scheme json -> (scheme, modules)
        self.formats: set[str] = set()

    def add_float(self, name: str, tensor: torch.Tensor) -> None:
        self.shards.add(name, tensor)

    def add_linear(self, prefix: str, layer: QuantizedLinear) -> None:
        import torch
        from compressed_tensors.compressors import BaseCompressor

        scheme = scheme_for(layer, ["Linear"])
        key = scheme.model_dump_json()
        self.groups.setdefault(key, (scheme, []))[1].append(prefix)
        fmt = _format_for(layer)
        self.formats.add(fmt)
        scale = layer.weight_scale.float()
        zero_point = layer.weight_offset.to(torch.int8)
        state: dict[str, torch.Tensor] = {
            "weight": layer.dequantize(),
            "weight_scale": scale,
            "weight_zero_point": zero_point,
        }
        if layer.activation is ActivationScheme.STATIC:
            assert layer.input_scale is not None and layer.input_offset is not None
            state["input_scale"] = layer.input_scale.float().reshape(1)
            state["input_zero_point"] = layer.input_offset.to(torch.int8).reshape(1)
        compressor = BaseCompressor.get_value_from_registry(fmt)
        compressed = compressor.compress(state, scheme)
        for leaf, tensor in compressed.items():
            self.shards.add(f"{prefix}.{leaf}", tensor)
        if layer.bias is not None:
            self.shards.add(f"{prefix}.bias", layer.bias.float())

    def add_kv_cache(self, attn_prefix: str, scale: KVCacheScale, kv_channels: int) -> None:
        raise ValueError("compressed-tensors carries no int8 KV cache (lint catches this)")

    def end_layer(self) -> None:
        self.shards.maybe_flush()

    def layout_state(self) -> dict[str, Any]:
        return {
            "groups": [[key, modules] for key, (_, modules) in self.groups.items()],
            "formats": sorted(self.formats),
        }

    def restore_layout(self, state: dict[str, Any]) -> None:
        from compressed_tensors.quantization import QuantizationScheme

        self.groups = {
            key: (QuantizationScheme.model_validate_json(key), list(modules))
            for key, modules in state["groups"]
        }
        self.formats = set(state["formats"])

    def finish(self, float_linears: Sequence[str] = ()) -> list[str]:
        from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

        files = self.shards.finish()
        if len(self.formats) > 1:
            raise ValueError(f"one compressed-tensors format per model, got {self.formats}")
        groups = {}
        single = len(self.groups) == 1
        for i, (scheme, modules) in enumerate(self.groups.values()):
            targets = ["Linear"] if single else [f"re:^{re.escape(m)}$" for m in modules]
            groups[f"group_{i}"] = scheme.model_copy(update={"targets": targets})
        qconfig = QuantizationConfig(
            config_groups=groups,
            format=next(iter(self.formats), "pack-quantized"),
            quantization_status=QuantizationStatus.COMPRESSED,
            ignore=sorted({"lm_head", *float_linears}),
        )
        config = strip_quantization_config(self.source_config)
        config["quantization_config"] = qconfig.model_dump(exclude_none=True, mode="json")
        (self.out_dir / "config.json").write_text(json.dumps(config, indent=2))
        copy_side_files(self.source_dir, self.out_dir)
        return files


def _scheme_of(prefix: str, groups: dict[str, Any]) -> Any:
    for scheme in groups.values():
        for target in scheme.targets:
            if (
                target == "Linear"
                or target == prefix
                or (target.startswith("re:") and re.match(target[3:], prefix))
            ):
                return scheme
    raise KeyError(f"no config group targets {prefix}")


def read_compressed_tensors(
    path: Path, select: TensorSelector | None = None
) -> QuantizedCheckpoint:
    """A compressed-tensors directory -> QuantizedCheckpoint; only the tensors `select`
    accepts when given."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationConfig

    config = json.loads((path / "config.json").read_text())
    qconfig = QuantizationConfig.model_validate(config["quantization_config"])
    tensors = read_tensors(sorted(path.glob("*.safetensors")), select)
    ckpt = QuantizedCheckpoint(
        format="compressed-tensors", method="", config=config, quantization=QUANTIZATION
    )
    used: set[str] = set()
    for name in list(tensors):
        prefix, _, leaf = name.rpartition(".")
        if leaf != "weight_scale":
            continue
        scheme = _scheme_of(prefix, qconfig.config_groups)
        args = scheme.weights
        scale = tensors[name].float()
        if f"{prefix}.weight_packed" in tensors:
            shape = torch.Size(tensors[f"{prefix}.weight_shape"].tolist())
            q = unpack_from_int32(tensors[f"{prefix}.weight_packed"], args.num_bits, shape)
            used |= {f"{prefix}.weight_packed", f"{prefix}.weight_shape"}
        else:
            q = tensors[f"{prefix}.weight"]
            used.add(f"{prefix}.weight")
        zp = tensors.get(f"{prefix}.weight_zero_point")
        if zp is not None and f"{prefix}.weight_packed" in tensors and not args.symmetric:
            zp = unpack_from_int32(
                zp, args.num_bits, torch.Size((shape[0], scale.shape[-1])), packed_dim=0
            )
        offset = torch.zeros_like(scale) if zp is None else zp.float().reshape(scale.shape)
        used |= {name, f"{prefix}.weight_zero_point"}
        acts = scheme.input_activations
        activation = ActivationScheme.NONE
        if acts is not None:
            activation = ActivationScheme.DYNAMIC if acts.dynamic else ActivationScheme.STATIC
        layer = QuantizedLinear(
            weight=q.to(torch.int8),
            weight_scale=scale,
            weight_offset=offset,
            bits=args.num_bits,
            group_size=args.group_size or 0,
            symmetric=args.symmetric,
            activation=activation,
            method="compressed-tensors",
        )
        if activation is ActivationScheme.STATIC:
            layer.input_scale = tensors[f"{prefix}.input_scale"].float().reshape(1)
            izp = tensors.get(f"{prefix}.input_zero_point")
            layer.input_offset = torch.zeros(1) if izp is None else izp.float().reshape(1)
            used |= {f"{prefix}.input_scale", f"{prefix}.input_zero_point"}
        bias = tensors.get(f"{prefix}.bias")
        if bias is not None:
            layer.bias = bias.float()
            used.add(f"{prefix}.bias")
        ckpt.linears[prefix] = layer
        ckpt.group_size = layer.group_size
        ckpt.method = layer.quant_type.value.lower()
    ckpt.float_tensors = {n: t for n, t in tensors.items() if n not in used}
    return ckpt
