"""`modelslim`: the seed's msModelSlim / vllm-ascend layout, served with quantization "gcu"
through gcupipe's plugin (vLLM-GCU and any vLLM) or "ascend" (vllm-ascend). Its descriptor and
the rules of its loaders: quant_model_description.json lists every saved tensor with its type,
and the weights it describes have that type's tensors (DESIGN.md 4.1). Writing and reading it:
modelslim_io.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gcupipe.formats.base import QuantizedCheckpoint, TensorSelector
from gcupipe.formats.format import Combination, Description, Format, QuantizationFlag
from gcupipe.formats.layout import FLOAT_DTYPES, want
from gcupipe.formats.modeldir import ModelDir
from gcupipe.formats.modelslim_io import DESCRIPTION, QUANTIZATION, TIED_LM_HEAD, read_modelslim
from gcupipe.formats.results import CheckOptions, Finding, Rule, Skip
from gcupipe.quant.scheme import QuantType


def description(md: ModelDir) -> dict[str, Any]:
    return md.json_file(DESCRIPTION) or {}


def _module_types(md: ModelDir) -> dict[str, str]:
    listed = description(md)
    return {
        name.removesuffix(".weight"): str(listed.get(name, "UNLISTED"))
        for name, info in md.tensors.items()
        if name.endswith(".weight") and len(info.shape) == 2
    }


QUANT_TYPES = {kind.value for kind in QuantType}
DESCRIPTION_META = {
    "model_quant_type",
    "version",
    "group_size",
    "kv_cache_type",
    "kv_quant_type",
    "fa_quant_type",
    "reduce_quant_type",
    "metadata",
}


def _no_quantization_config(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    config = md.config or {}
    holders = (
        ("quantization_config", config),
        ("text_config.quantization_config", config.get("text_config")),
    )
    keys = [
        key
        for key, holder in holders
        if isinstance(holder, dict) and "quantization_config" in holder
    ]
    return [
        Finding(
            f"config.json has {key} (quant_method {md.quant_method!r}) next to {DESCRIPTION}: "
            "vLLM prefers it and loads the wrong method",
            f"delete {key} from config.json",
        )
        for key in keys
    ]


def _description_matches(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    listed_all = description(md)
    listed = {k: v for k, v in listed_all.items() if k not in DESCRIPTION_META}
    findings: list[Finding] = []
    unlisted = sorted(set(md.tensors) - set(listed))
    if unlisted:
        findings.append(
            Finding(
                f"{len(unlisted)} saved tensor(s) are not in {DESCRIPTION}, e.g. {unlisted[0]}",
                "list each saved tensor with its type (FLOAT for float ones)",
            )
        )
    tied = bool((md.config or {}).get("tie_word_embeddings"))
    ghosts = sorted(set(listed) - set(md.tensors) - ({TIED_LM_HEAD} if tied else set()))
    if ghosts:
        findings.append(
            Finding(
                f"{DESCRIPTION} lists {len(ghosts)} tensor(s) no shard holds, e.g. {ghosts[0]}",
                "remove them, or write the missing tensors",
            )
        )
    bad = sorted(k for k, v in listed.items() if v not in QUANT_TYPES)
    if bad:
        findings.append(
            Finding(
                f"{DESCRIPTION} gives {bad[0]} the unknown type {listed[bad[0]]!r}",
                f"use one of {', '.join(sorted(QUANT_TYPES))}",
            )
        )
    for key in ("model_quant_type", "version"):
        if key not in listed_all:
            findings.append(Finding(f"{DESCRIPTION} has no {key!r}", f"add {key}"))
    return findings


def _shapes(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    listed = description(md)
    tensors = md.tensors
    findings: list[Finding] = []
    for name, info in tensors.items():
        kind = listed.get(name)
        if kind == "FLOAT" and info.dtype not in FLOAT_DTYPES:
            findings.append(
                Finding(
                    f"{name} is typed FLOAT but stored as {info.dtype}",
                    "type it with its quant type in the description",
                )
            )
        if kind == "C8" and (info.dtype != "F32" or len(info.shape) != 1):
            findings.append(
                Finding(
                    f"{name} (C8) is {info.dtype} {list(info.shape)}, needs F32 [kv channels]",
                    "re-write the KV-cache scales",
                )
            )
    for prefix, kind in _module_types(md).items():
        if kind not in ("W8A8", "W8A8_DYNAMIC", "W8A16", "W4A16"):
            continue
        weight = tensors[f"{prefix}.weight"]
        why = f"{kind} ({prefix})"
        if weight.dtype != "I8" or len(weight.shape) != 2:
            findings.append(
                Finding(
                    f"{prefix}.weight is {weight.dtype} {list(weight.shape)}, "
                    f"{kind} needs int8 [n, k]",
                    "re-run the quantize stage",
                )
            )
            continue
        n, stored_k = weight.shape
        k = stored_k * 2 if kind == "W4A16" else stored_k
        scale = tensors.get(f"{prefix}.weight_scale")
        groups = scale.shape[1] if scale is not None and len(scale.shape) == 2 else 1
        per_channel_only = kind in ("W8A8", "W8A8_DYNAMIC")
        allowed: list[tuple[int, ...]] = [(n, 1)] if per_channel_only else [(n, 1), (n, groups)]
        if groups > 1 and k % groups:
            findings.append(
                Finding(
                    f"{prefix}: {groups} groups do not divide k = {k}",
                    "pick a group size that divides every layer's input size",
                )
            )
        for leaf in ("weight_scale", "weight_offset"):
            name = f"{prefix}.{leaf}"
            want(findings, tensors.get(name), name, {"F32"}, allowed, why)
        if kind == "W8A8":
            for leaf in ("input_scale", "input_offset"):
                name = f"{prefix}.{leaf}"
                want(findings, tensors.get(name), name, {"F32"}, [(1,)], why)
            name = f"{prefix}.deq_scale"  # int64: fp32 bits, for targets that read it so
            want(findings, tensors.get(name), name, {"F32", "I64"}, [(n,)], why)
            name = f"{prefix}.quant_bias"
            want(findings, tensors.get(name), name, {"I32"}, [(n,)], why)
    return findings


def _group_size(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    declared = int(description(md).get("group_size", 0) or 0)
    grouped = {}
    for prefix, kind in _module_types(md).items():
        scale = md.tensors.get(f"{prefix}.weight_scale")
        weight = md.tensors.get(f"{prefix}.weight")
        if kind not in ("W8A16", "W4A16") or scale is None or weight is None:
            continue
        if len(scale.shape) == 2 and scale.shape[1] > 1:
            k = weight.shape[1] * (2 if kind == "W4A16" else 1)
            grouped[prefix] = (k, scale.shape[1])
    if not grouped:
        if declared:
            return [
                Finding(
                    f"{DESCRIPTION} says group_size {declared} but every layer has "
                    "per-channel scales",
                    "write group_size 0 for per-channel scales",
                )
            ]
        raise Skip("per-channel scales")
    for prefix, (k, groups) in sorted(grouped.items()):
        if k % groups or (declared and k // groups != declared):
            return [
                Finding(
                    f"{prefix} has {groups} scale groups over k = {k}, which is not "
                    f"group_size {declared}",
                    "re-run the quantize stage (scales and the description disagree)",
                )
            ]
    return []


def _kv_cache(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    listed = description(md)
    c8 = [n for n, t in listed.items() if t == "C8"]
    declared = listed.get("kv_cache_type") == "C8"
    if not (declared or c8 or opts.kv_cache_int8):
        raise Skip("no int8 KV cache")
    findings = []
    if c8 and not declared:
        findings.append(
            Finding(
                f"C8 tensors are saved but {DESCRIPTION} has no kv_cache_type: C8",
                'add "kv_cache_type": "C8"',
            )
        )
    missing = [
        f"model.layers.{i}.self_attn.{kv}_proj.kv_cache_{what}"
        for i in range(md.num_layers)
        for kv in ("k", "v")
        for what in ("scale", "offset")
    ]
    missing = [name for name in missing if name not in md.tensors]
    if missing:
        findings.append(
            Finding(
                f"{len(missing)} KV-cache tensor(s) are missing, e.g. {missing[0]}",
                "calibrate the KV cache over every attention layer (kv_cache: {dtype: int8})",
            )
        )
    return findings


RULES = (
    Rule(
        "no-quantization-config",
        "a modelslim config.json carries no quantization_config",
        _no_quantization_config,
    ),
    Rule(
        "description-matches-tensors",
        "quant_model_description.json lists every saved "
        "tensor, with a known type, and nothing else",
        _description_matches,
    ),
    Rule(
        "tensor-dtypes-shapes",
        "each quantized layer's tensors have the dtypes and shapes of its type",
        _shapes,
    ),
    Rule(
        "group-size",
        "per-group scales divide every layer's input size as the description says",
        _group_size,
    ),
    Rule(
        "kv-cache-scales",
        "int8 KV cache: C8 scales and offsets for every attention layer",
        _kv_cache,
    ),
)


def _flag(kind: str) -> QuantizationFlag:
    """gcupipe's `gcu` plugin reads the layout on any vLLM (the ascend target names its own)."""
    what = f"{kind} in the modelslim layout ({DESCRIPTION})"
    return QuantizationFlag(QUANTIZATION, frozenset({QUANTIZATION}), what)


class ModelslimFormat(Format):
    name = "modelslim"
    summary = "the msModelSlim / vllm-ascend layout (quant_model_description.json)"
    writer_class = "gcupipe.formats.modelslim_io:ModelslimWriter"
    detect_order = 10  # its description file is evidence of its own
    required_files = (
        ("quant_model_weight_*.safetensors", "weights of the modelslim layout use that name"),
        ("quant_model_weight_*.safetensors.index.json", "write the index next to the shards"),
    )

    def detect(self, md: ModelDir) -> bool:
        return (md.path / DESCRIPTION).is_file()

    def read(self, path: Path, select: TensorSelector | None = None) -> QuantizedCheckpoint:
        return read_modelslim(path, select)

    def quantization_flag(self, md: ModelDir) -> QuantizationFlag:
        return _flag(str(description(md).get("model_quant_type", "quantized")))

    def planned_quantization_flag(self, combo: Combination) -> QuantizationFlag:
        return _flag(combo.method.upper())

    def module_types(self, md: ModelDir) -> dict[str, str]:
        return _module_types(md)

    def describe(self, md: ModelDir) -> Description:
        listed = description(md)
        return Description(
            method=str(listed.get("model_quant_type", "")).lower(),
            group_size=int(listed.get("group_size", 0)),
            layer_types={
                name.removesuffix(".weight"): kind
                for name, kind in listed.items()
                if name.endswith(".weight") and isinstance(kind, str) and kind != "FLOAT"
            },
            kv_cache="int8" if listed.get("kv_cache_type") == "C8" else None,
        )

    def rules(self) -> tuple[Rule, ...]:
        return RULES


FORMAT = ModelslimFormat()
