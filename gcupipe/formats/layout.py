"""What a directory should contain whatever its format: the weights the architecture loads,
the fused module groups, the MoE experts; and the tensor check the formats' shape rules share.

The expected weight names come from the architecture itself (the transformers model class built
on the meta device, no memory), so the rules see exactly the tensors a loader will ask for.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from gcupipe.formats.modeldir import ModelDir, TensorInfo
from gcupipe.formats.results import Finding

FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}
_LAYER_NAME = re.compile(r"^(?P<layer>model\.layers\.\d+)\.(?P<rest>.+)$")


def _transformers_config(raw_config: dict[str, Any]) -> Any | None:
    try:
        import transformers
    except ImportError:
        return None
    raw = dict(raw_config)
    raw.pop("quantization_config", None)
    model_type = raw.pop("model_type", None)
    try:
        return transformers.AutoConfig.for_model(model_type, **raw)
    except Exception:  # unknown or remote-code architecture
        return None


def expected_weights(md: ModelDir) -> dict[str, tuple[int, ...]] | None:
    """Checkpoint tensor name -> shape, for every tensor the architecture loads (MoE experts per
    expert, as released checkpoints name them; lm_head left out when tied). None when
    transformers does not know the architecture."""
    cached = md.__dict__.get("_expected_weights")
    if cached is None:
        cached = expected_weights_for_config(md.config or {})
        md.__dict__["_expected_weights"] = cached
    return cached


def expected_weights_for_config(raw_config: dict[str, Any]) -> dict[str, tuple[int, ...]] | None:
    """`expected_weights` of a config.json's contents (built once per distinct config: the
    meta-device model takes a tenth of a second)."""
    try:
        key = json.dumps(raw_config, sort_keys=True)
    except (TypeError, ValueError):
        return _expected_weights(raw_config)
    cached = _expected_weights_by_json(key)
    return None if cached is None else dict(cached)


@functools.lru_cache(maxsize=64)
def _expected_weights_by_json(key: str) -> dict[str, tuple[int, ...]] | None:
    return _expected_weights(json.loads(key))


def _expected_weights(raw_config: dict[str, Any]) -> dict[str, tuple[int, ...]] | None:
    config = _transformers_config(raw_config)
    if config is None:
        return None
    import torch
    import transformers

    try:
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
    except Exception:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name.removesuffix(".gate_up_proj")
            experts, rows, k = tensor.shape
            for e in range(experts):
                for part in ("gate_proj", "up_proj"):
                    shapes[f"{prefix}.{e}.{part}.weight"] = (rows // 2, k)
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name.removesuffix(".down_proj")
            for e in range(tensor.shape[0]):
                shapes[f"{prefix}.{e}.down_proj.weight"] = tuple(tensor.shape[1:])
        else:
            shapes[name] = tuple(tensor.shape)
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    return shapes


def expected_weight_names(md: ModelDir) -> list[str] | None:
    shapes = expected_weights(md)
    return None if shapes is None else list(shapes)


def linear_shapes(md: ModelDir) -> dict[str, tuple[int, int]]:
    """Module prefix -> (out, in) features of every 2-D weight the architecture loads."""
    shapes = expected_weights(md) or {}
    return {
        name.removesuffix(".weight"): (shape[0], shape[1])
        for name, shape in shapes.items()
        if name.endswith(".weight") and len(shape) == 2 and "embed_tokens" not in name
    }


def moe_expert_names(md: ModelDir) -> list[str]:
    """Prefixes of every routed expert projection the config implies (DeepSeek-style MoE)."""
    config = md.config or {}
    experts = config.get("n_routed_experts")
    if not isinstance(experts, int) or experts <= 0:
        return []
    first_dense = int(config.get("first_k_dense_replace", 0))
    every = int(config.get("moe_layer_freq", 1) or 1)
    return [
        f"model.layers.{i}.mlp.experts.{e}.{p}"
        for i in range(first_dense, md.num_layers)
        if i % every == 0
        for e in range(experts)
        for p in ("gate_proj", "up_proj", "down_proj")
    ]


def fused_groups(md: ModelDir, module_types: dict[str, str]) -> dict[str, list[str]] | None:
    """Fused module (described for humans) -> the module prefixes present that belong to it."""
    from gcupipe.quant.archs import ARCHS, fused_key

    arch = ARCHS.get(str((md.config or {}).get("model_type")))
    if arch is None:
        return None
    groups: dict[str, list[str]] = {}
    for prefix in module_types:
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


def want(
    findings: list[Finding],
    info: TensorInfo | None,
    name: str,
    dtypes: set[str],
    shapes: list[tuple[int, ...]],
    why: str,
) -> None:
    if info is None:
        findings.append(Finding(f"{name} is missing ({why})", "re-run the quantize stage"))
        return
    if info.dtype not in dtypes:
        findings.append(
            Finding(
                f"{name} is {info.dtype}, {why} needs {'/'.join(sorted(dtypes))}",
                "re-write it with the format writer, not by hand",
            )
        )
    if shapes and info.shape not in shapes:
        findings.append(
            Finding(
                f"{name} has shape {list(info.shape)}, {why} needs "
                f"{' or '.join(str(list(s)) for s in shapes)}",
                "re-write it with the format writer, not by hand",
            )
        )
