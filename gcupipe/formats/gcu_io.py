"""Writing and reading the `gcu` layouts, what the vLLM-GCU loaders read (DESIGN.md 4.2).

- W4A16 / W8A16: standard GPTQ tensors (qweight, qzeros, scales, g_idx; zero-1 convention;
  8-bit symmetric only) or, for method awq, AWQ gemm tensors. quant_method gptq / awq.
- W8A8 (static, symmetric per-tensor activations): weight int8 [n,k], out_scales fp32 [n] =
  weight_scale * input_scale, in_scales [k] (the input scale repeated). quant_method w8a8; the
  GCU loader inverts in_scales at load and computes y = (round(x / in_scale) @ W^T) * out_scales.
- INT8 KV cache: per-tensor checkpoint tensors on each attention module, under the names vLLM
  0.9.2's loaders land on the parameters the GCU KV methods create: `<attn>.k_scale` and
  `<attn>.v_scale` (maybe_remap_kv_scale_name maps them to `<attn>.attn.k_scale`), and for
  w8a8 (whose Int8KVCacheMethod also creates zero points, which no remap rule reaches)
  `<attn>.attn.k_zero` / `<attn>.attn.v_zero`. GPTQ/AWQ attach vLLM's BaseKVCacheMethod, which
  has no zero points: their KV cache is symmetric. (No json: vLLM 0.9.2 has no
  `--quantization-param-path`, and its QuantParamSchema takes float8_e4m3fn only.)
- Skip lists: AWQ's `modules_to_not_convert` (a substring match, also required by the MoE
  loader moe_wna16_gcu); GPTQ's `dynamic` "-:" rules (read by upstream vLLM; vLLM-GCU reads no
  skip list for GPTQ or w8a8, which the gcu target refuses at lint).
config.json gets the `quantization_config`; quantize_config.json repeats it.
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
from gcupipe.formats.modeldir import QUANTIZE_CONFIG, ModelDir
from gcupipe.quant.packing import pack_awq, pack_gptq, unpack_awq, unpack_gptq
from gcupipe.quant.scheme import ActivationScheme, KVCacheScale, QuantizedLinear, QuantType

if TYPE_CHECKING:
    import torch

KV_LEAVES = {"k_scale": "k_scale", "v_scale": "v_scale", "attn.k_zero": "k_offset",
             "attn.v_zero": "v_offset"}  # fmt: skip
"""Tensor name under the attention module -> the KVCacheScale field it holds."""
METHODS = ("gptq", "awq", "w8a8")
"""quant_method values of the gcu layouts, as the vLLM-GCU loaders name them."""
_KV = re.compile(
    r"^.*\.layers\.(?P<index>\d+)\.self_attn\.(?P<leaf>k_scale|v_scale|attn\.[kv]_zero)$"
)


class GcuWriter(FormatWriter):
    name = "gcu"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.shards = ShardWriter(
            self.out_dir,
            "model",
            "model.safetensors.index.json",
            self.max_shard_bytes,
            parts_dir=self.parts_dir,
        )
        self.kinds: set[tuple[str, int, int, bool]] = set()
        self.quantized: list[str] = []
        self.dtype = str(
            self.source_config.get("torch_dtype") or self.source_config.get("dtype") or "float16"
        )

    def add_float(self, name: str, tensor: torch.Tensor) -> None:
        self.shards.add(name, tensor)

    def add_linear(self, prefix: str, layer: QuantizedLinear) -> None:
        import torch

        kind = layer.quant_type
        self.quantized.append(prefix)
        if kind is QuantType.W8A8_DYNAMIC:
            raise ValueError("the gcu format has no dynamic W8A8 layout (lint catches this)")
        if kind is QuantType.W8A8:
            assert layer.input_scale is not None and layer.input_offset is not None
            if float(layer.input_offset.abs().max()) != 0:
                raise ValueError(f"{prefix}: gcu w8a8 needs symmetric activations")
            if layer.group_size:
                raise ValueError(f"{prefix}: gcu w8a8 needs per-channel weights")
            self.kinds.add(("w8a8", 8, 0, True))
            self.shards.add(f"{prefix}.weight", layer.weight.to(torch.int8))
            self.shards.add(f"{prefix}.out_scales", layer.deq_scale().float())
            model_dtype = getattr(torch, self.dtype, torch.float16)
            in_scales = layer.input_scale.float().reshape(1).repeat(layer.in_features)
            self.shards.add(f"{prefix}.in_scales", in_scales.to(model_dtype))
        else:
            layout = layout_method(self.method, layer.activation, layer.bits)
            self.kinds.add((layout, layer.bits, layer.group_size, layer.symmetric))
            if layout == "awq":
                tensors = pack_awq(layer.weight, layer.weight_offset, layer.weight_scale)
            else:
                tensors = pack_gptq(
                    layer.weight,
                    layer.weight_offset,
                    layer.weight_scale,
                    layer.bits,
                    layer.group_size,
                )
            for leaf, tensor in tensors.items():
                self.shards.add(f"{prefix}.{leaf}", tensor)
        if layer.bias is not None:
            self.shards.add(
                f"{prefix}.bias",
                layer.bias.to(torch.float16 if "16" in self.dtype else torch.float32),
            )

    def add_kv_cache(self, attn_prefix: str, scale: KVCacheScale, kv_channels: int) -> None:
        import torch

        zero_points = any(k[0] == "w8a8" for k in self.kinds)
        if not zero_points and (scale.k_offset or scale.v_offset):
            raise ValueError(
                f"{attn_prefix}: the gcu {self.method} KV cache is symmetric (vLLM's "
                "BaseKVCacheMethod reads no zero point); calibrate it symmetric"
            )
        for leaf, field_name in KV_LEAVES.items():
            if leaf.endswith("_zero") and not zero_points:
                continue
            value = getattr(scale, field_name)
            self.shards.add(f"{attn_prefix}.{leaf}", torch.tensor(value, dtype=torch.float32))

    def end_layer(self) -> None:
        self.shards.maybe_flush()

    def layout_state(self) -> dict[str, Any]:
        return {"kinds": sorted(self.kinds), "quantized": self.quantized}

    def restore_layout(self, state: dict[str, Any]) -> None:
        self.kinds = {(k[0], k[1], k[2], k[3]) for k in state["kinds"]}
        self.quantized = list(state["quantized"])

    def _quantization_config(self, float_linears: Sequence[str]) -> dict[str, Any]:
        layouts = {k[0] for k in self.kinds}
        if len(layouts) != 1 or len({k[1:] for k in self.kinds}) != 1:
            raise ValueError(f"the gcu format needs one scheme for all layers, got {self.kinds}")
        layout, bits, group_size, symmetric = next(iter(self.kinds))
        skipped = sorted(float_linears)
        if layout == "w8a8":  # W8A8Config.from_config reads group_size only
            return {"quant_method": "w8a8", "group_size": -1}
        if layout == "awq":
            _check_substring_skips(skipped, self.quantized)
            return {
                "quant_method": "awq",
                "bits": bits,
                "w_bit": bits,
                "group_size": group_size,
                "q_group_size": group_size,
                "zero_point": True,
                "version": "gemm",
                "modules_to_not_convert": skipped,
            }
        config: dict[str, Any] = {
            "quant_method": "gptq",
            "bits": bits,
            "group_size": group_size or -1,
            "desc_act": False,
            "static_groups": False,
            "sym": symmetric,
            "lm_head": False,
            "checkpoint_format": "gptq",
        }
        if skipped:  # vLLM GPTQ "dynamic": a "-:" regex keeps matching modules unquantized
            config["dynamic"] = {f"-:{re.escape(p)}$": {} for p in skipped}
        return config

    def finish(self, float_linears: Sequence[str] = ()) -> list[str]:
        files = self.shards.finish()
        qconfig = self._quantization_config(float_linears)
        config = strip_quantization_config(self.source_config)
        config["quantization_config"] = qconfig
        (self.out_dir / "config.json").write_text(json.dumps(config, indent=2))
        (self.out_dir / QUANTIZE_CONFIG).write_text(json.dumps(qconfig, indent=2))
        copy_side_files(self.source_dir, self.out_dir)
        return files


def layout_method(method: str, activation: ActivationScheme, bits: int) -> str:
    """The quant_method the writer gives a quantize method's output (w8a8, awq or gptq)."""
    if activation is ActivationScheme.STATIC:
        return "w8a8"
    return "awq" if method == "awq" and bits == 4 else "gptq"


def _check_substring_skips(skipped: list[str], quantized: list[str]) -> None:
    """vLLM's is_layer_skipped_awq keeps a module float when any entry is a substring of its
    name: an entry must not reach a module that was quantized (`mlp.gate` would take
    `mlp.gate_proj` along)."""
    for entry in skipped:
        caught = next((p for p in quantized if entry in p), None)
        if caught is not None:
            raise ValueError(
                f"modules_to_not_convert entry {entry!r} would also keep {caught!r} float "
                "(vLLM matches substrings); quantize both or neither"
            )


def gcu_settings(md: ModelDir) -> dict[str, Any]:
    """The layout's settings as the loaders see them: quantize_config.json, overridden by
    config.json's quantization_config."""
    settings = dict(md.json_file(QUANTIZE_CONFIG) or {})
    settings.update(md.quantization_config or {})
    return settings


def bits_and_group_size(settings: dict[str, Any]) -> tuple[int, int]:
    """(bits, group size; 0 = per channel), under either GPTQ's or AWQ's key names."""
    bits = int(settings.get("bits", settings.get("w_bit", 8)))
    return bits, max(int(settings.get("group_size", settings.get("q_group_size", -1))), 0)


def read_gcu(path: Path, select: TensorSelector | None = None) -> QuantizedCheckpoint:
    """A gcu directory -> QuantizedCheckpoint; only the tensors `select` accepts when given."""
    md = ModelDir(path)
    qc = gcu_settings(md)
    config = md.config or {}
    tensors = read_tensors(md.safetensors_files, select)
    method = qc["quant_method"]
    bits, group_size = bits_and_group_size(qc)
    label = "w8a16" if method == "gptq" and bits == 8 else method
    ckpt = QuantizedCheckpoint(
        format="gcu", method=label, config=config, quantization=method, group_size=group_size
    )
    used: set[str] = set()
    for name in tensors:
        prefix, _, leaf = name.rpartition(".")
        if leaf == "qweight":
            if method == "awq":
                q, offset, scale = unpack_awq(
                    tensors[name], tensors[f"{prefix}.qzeros"], tensors[f"{prefix}.scales"]
                )
            else:
                q, offset, scale = unpack_gptq(
                    tensors[name], tensors[f"{prefix}.qzeros"], tensors[f"{prefix}.scales"], bits
                )
            ckpt.linears[prefix] = QuantizedLinear(
                weight=q,
                weight_scale=scale,
                weight_offset=offset,
                bits=bits,
                group_size=group_size,
                symmetric=bool((offset == 0).all()),
                method=method,
            )
            used |= {name, f"{prefix}.qzeros", f"{prefix}.scales", f"{prefix}.g_idx"}
        elif leaf == "out_scales":
            input_scale = tensors[f"{prefix}.in_scales"].float().reshape(-1)[:1]
            ckpt.linears[prefix] = QuantizedLinear(
                weight=tensors[f"{prefix}.weight"],
                weight_scale=(tensors[name].float() / input_scale).reshape(-1, 1),
                weight_offset=tensors[name].new_zeros(tensors[name].shape[0], 1).float(),
                activation=ActivationScheme.STATIC,
                input_scale=input_scale,
                input_offset=input_scale.new_zeros(1),
                method="w8a8",
            )
            used |= {name, f"{prefix}.in_scales", f"{prefix}.weight"}
    kv: dict[int, dict[str, float]] = {}
    for name, tensor in tensors.items():
        match = _KV.match(name)
        if match:
            kv.setdefault(int(match["index"]), {})[KV_LEAVES[match["leaf"]]] = float(tensor)
            used.add(name)
    for prefix, layer in ckpt.linears.items():
        bias = tensors.get(f"{prefix}.bias")
        if bias is not None:
            layer.bias = bias.float()
            used.add(f"{prefix}.bias")
    ckpt.float_tensors = {n: t for n, t in tensors.items() if n not in used}
    ckpt.kv_scales = [  # a selection may hold part of a layer's: only whole layers count
        KVCacheScale(i, v["k_scale"], v.get("k_offset", 0.0), v["v_scale"], v.get("v_offset", 0.0))
        for i, v in sorted(kv.items())
        if {"k_scale", "v_scale"} <= set(v)
    ]
    return ckpt
