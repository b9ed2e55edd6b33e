"""What a directory should contain: expected weights, fused groups, experts, per-type tensors.

The expected weight names come from the architecture itself (the transformers model class built
on the meta device, no memory), so the rule sees exactly the tensors a loader will ask for.
Shapes and dtypes per quant type follow DESIGN.md section 4.
"""

from __future__ import annotations

import re
from typing import Any

from gcupipe.formats.base import TensorInfo
from gcupipe.validation.modeldir import QUANTIZE_CONFIG, ModelDir
from gcupipe.validation.results import Finding

_FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}
_LAYER_NAME = re.compile(r"^(?P<layer>model\.layers\.\d+)\.(?P<rest>.+)$")


def _transformers_config(md: ModelDir) -> Any | None:
    try:
        import transformers
    except ImportError:
        return None
    raw = dict(md.config or {})
    raw.pop("quantization_config", None)
    model_type = raw.pop("model_type", None)
    try:
        return transformers.AutoConfig.for_model(model_type, **raw)
    except Exception:  # unknown or remote-code architecture
        return None


def expected_weight_names(md: ModelDir) -> list[str] | None:
    """Checkpoint tensor names the architecture loads (MoE experts per expert, as released
    checkpoints name them; lm_head left out when tied)."""
    cached = md.__dict__.get("_expected_weights")
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    config = _transformers_config(md)
    if config is None:
        return None
    import torch
    import transformers

    try:
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
    except Exception:
        return None
    names: list[str] = []
    for name, tensor in model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
            prefix, _, fused = name.rpartition(".")
            parts = ("gate_proj", "up_proj") if fused == "gate_up_proj" else ("down_proj",)
            names += [f"{prefix}.{e}.{p}.weight" for e in range(tensor.shape[0]) for p in parts]
        else:
            names.append(name)
    if getattr(config, "tie_word_embeddings", False):
        names = [n for n in names if n != "lm_head.weight"]
    md.__dict__["_expected_weights"] = names
    return names


def moe_expert_names(md: ModelDir) -> list[str]:
    """Prefixes of every routed expert projection the config implies (DeepSeek-style MoE)."""
    config = md.config or {}
    experts = config.get("n_routed_experts")
    if not isinstance(experts, int) or experts <= 0:
        return []
    first_dense = int(config.get("first_k_dense_replace", 0))
    every = int(config.get("moe_layer_freq", 1) or 1)
    return [f"model.layers.{i}.mlp.experts.{e}.{p}"
            for i in range(first_dense, md.num_layers) if i % every == 0
            for e in range(experts) for p in ("gate_proj", "up_proj", "down_proj")]


def fused_groups(md: ModelDir) -> dict[str, list[str]] | None:
    """Fused module (described for humans) -> the module prefixes present that belong to it."""
    from gcupipe.quant.archs import ARCHS, fused_key

    arch = ARCHS.get(str((md.config or {}).get("model_type")))
    if arch is None:
        return None
    groups: dict[str, list[str]] = {}
    for prefix in md.module_types:
        match = _LAYER_NAME.match(prefix)
        if not match:
            continue
        key = fused_key(arch, match["rest"])
        if key is None:
            continue
        parent = match["rest"].rsplit(".", 1)[0]
        if ".experts." in match["rest"]:
            parent = match["rest"].split(".experts.")[0] + ".experts"
        label = f"{match['layer']}.{parent} ({'experts' if 'experts' in parent else key})"
        groups.setdefault(label, []).append(prefix)
    return {label: members for label, members in groups.items() if len(members) > 1}


def _gcu_settings(md: ModelDir) -> dict[str, Any]:
    settings = dict(md.json_file(QUANTIZE_CONFIG) or {})
    settings.update(md.quantization_config or {})
    return settings


def _want(findings: list[Finding], info: TensorInfo | None, name: str, dtypes: set[str],
          shapes: list[tuple[int, ...]], why: str) -> None:
    if info is None:
        findings.append(Finding(f"{name} is missing ({why})", "re-run the quantize stage"))
        return
    if info.dtype not in dtypes:
        findings.append(Finding(f"{name} is {info.dtype}, {why} needs {'/'.join(sorted(dtypes))}",
                                "re-write it with the format writer, not by hand"))
    if shapes and info.shape not in shapes:
        findings.append(Finding(f"{name} has shape {list(info.shape)}, {why} needs "
                                f"{' or '.join(str(list(s)) for s in shapes)}",
                                "re-write it with the format writer, not by hand"))


def shape_findings(md: ModelDir) -> list[Finding]:
    findings: list[Finding] = []
    if md.format == "modelslim":
        _modelslim_shapes(md, findings)
    elif md.format == "gcu":
        _gcu_shapes(md, findings)
    return findings


def _modelslim_shapes(md: ModelDir, findings: list[Finding]) -> None:
    description = md.description or {}
    tensors = md.tensors
    for name, info in tensors.items():
        kind = description.get(name)
        if kind == "FLOAT" and info.dtype not in _FLOAT_DTYPES:
            findings.append(Finding(f"{name} is typed FLOAT but stored as {info.dtype}",
                                    "type it with its quant type in the description"))
        if kind == "C8" and (info.dtype != "F32" or len(info.shape) != 1):
            findings.append(Finding(f"{name} (C8) is {info.dtype} {list(info.shape)}, needs F32 "
                                    "[kv channels]", "re-write the KV-cache scales"))
    for prefix, kind in md.module_types.items():
        if kind not in ("W8A8", "W8A8_DYNAMIC", "W8A16", "W4A16"):
            continue
        weight = tensors[f"{prefix}.weight"]
        why = f"{kind} ({prefix})"
        if weight.dtype != "I8" or len(weight.shape) != 2:
            findings.append(Finding(f"{prefix}.weight is {weight.dtype} {list(weight.shape)}, "
                                    f"{kind} needs int8 [n, k]", "re-run the quantize stage"))
            continue
        n, stored_k = weight.shape
        k = stored_k * 2 if kind == "W4A16" else stored_k
        scale = tensors.get(f"{prefix}.weight_scale")
        groups = scale.shape[1] if scale is not None and len(scale.shape) == 2 else 1
        allowed: list[tuple[int, ...]] = (
            [(n, 1)] if kind in ("W8A8", "W8A8_DYNAMIC") else [(n, 1), (n, groups)])
        if groups > 1 and k % groups:
            findings.append(Finding(f"{prefix}: {groups} groups do not divide k = {k}",
                                    "pick a group size that divides every layer's input size"))
        for leaf in ("weight_scale", "weight_offset"):
            _want(findings, tensors.get(f"{prefix}.{leaf}"), f"{prefix}.{leaf}", {"F32"},
                  allowed, why)
        if kind == "W8A8":
            for leaf in ("input_scale", "input_offset"):
                _want(findings, tensors.get(f"{prefix}.{leaf}"), f"{prefix}.{leaf}", {"F32"},
                      [(1,)], why)
            _want(findings, tensors.get(f"{prefix}.deq_scale"), f"{prefix}.deq_scale", {"F32"},
                  [(n,)], why)
            _want(findings, tensors.get(f"{prefix}.quant_bias"), f"{prefix}.quant_bias",
                  {"I32"}, [(n,)], why)


def _gcu_shapes(md: ModelDir, findings: list[Finding]) -> None:
    settings = _gcu_settings(md)
    method = md.quant_method
    tensors = md.tensors
    bits = int(settings.get("bits", settings.get("w_bit", 4)))
    group = int(settings.get("group_size", settings.get("q_group_size", -1)))
    for prefix, kind in md.module_types.items():
        why = f"{kind} ({prefix})"
        if method in ("gptq", "awq") and kind in ("GPTQ", "AWQ"):
            qweight = tensors[f"{prefix}.qweight"]
            if qweight.dtype != "I32" or len(qweight.shape) != 2:
                findings.append(Finding(f"{prefix}.qweight is {qweight.dtype} "
                                        f"{list(qweight.shape)}, needs int32 2-D", "re-write it"))
                continue
            if method == "gptq":
                k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
                zeros_shape = (k // group if group > 0 else 1, n * bits // 32)
            else:
                k, n = qweight.shape[0], qweight.shape[1] * 8
                zeros_shape = (k // group if group > 0 else 1, n // 8)
            groups = k // group if group > 0 else 1
            _want(findings, tensors.get(f"{prefix}.qzeros"), f"{prefix}.qzeros", {"I32"},
                  [zeros_shape], why)
            _want(findings, tensors.get(f"{prefix}.scales"), f"{prefix}.scales", {"F16"},
                  [(groups, n)], why)
            if method == "gptq":
                _want(findings, tensors.get(f"{prefix}.g_idx"), f"{prefix}.g_idx", {"I32"},
                      [(k,)], why)
        elif method == "w8a8" and kind == "W8A8":
            n, k = tensors[f"{prefix}.weight"].shape
            _want(findings, tensors.get(f"{prefix}.out_scales"), f"{prefix}.out_scales",
                  {"F32"}, [(n,), (n, 1)], why)
            _want(findings, tensors.get(f"{prefix}.in_scales"), f"{prefix}.in_scales",
                  {"F32", "F16", "BF16"}, [(k,), (1,), ()], why)
