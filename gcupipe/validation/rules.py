"""The named structural rules: each one is a mistake that otherwise surfaces only at serving time.

Every rule is a function of a `ModelDir` (and the check options) returning findings that say
what is wrong, naming the file or tensor, and how to fix it. Rules register in the order a human
would fix things (files before tensors before layout details); rules_gcu.py and flag.py add the
target-specific ones.
"""

from __future__ import annotations

from collections import defaultdict

from gcupipe.formats.tokenizer import TOKENIZER_FILES
from gcupipe.validation.flag import quantization_flag_rule
from gcupipe.validation.layout import (
    expected_weight_names,
    fused_groups,
    moe_expert_names,
    shape_findings,
)
from gcupipe.validation.modeldir import (
    DESCRIPTION,
    DESCRIPTION_META,
    QUANT_TYPES,
    QUANTIZE_CONFIG,
    ModelDir,
)
from gcupipe.validation.registry import CheckOptions, Skip, rule
from gcupipe.validation.results import Finding


@rule("required-files", "config.json, weights, tokenizer and the layout's own files exist")
def required_files(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    findings: list[Finding] = []
    if md.config is None:
        findings.append(Finding(f"{md.path}/config.json is missing or not valid JSON",
                                "copy config.json from the source model"))
    if not md.safetensors_files:
        findings.append(Finding(f"{md.path} has no .safetensors weight files",
                                "re-run the quantize stage; a model directory needs weights"))
    if md.format == "modelslim":
        if not list(md.path.glob("quant_model_weight_*.safetensors")):
            findings.append(Finding("no quant_model_weight_<type>-*.safetensors files",
                                    "weights of the modelslim layout must use that file name"))
        if not list(md.path.glob("quant_model_weight_*.safetensors.index.json")):
            findings.append(Finding("no quant_model_weight_<type>.safetensors.index.json",
                                    "write the index next to the weight shards"))
    if md.format == "gcu" and not (md.path / QUANTIZE_CONFIG).is_file():
        findings.append(Finding(f"{QUANTIZE_CONFIG} is missing",
                                f"write {QUANTIZE_CONFIG} (quant_method {md.quant_method}, "
                                "bits, group_size) as the vLLM-GCU loaders expect"))
    if opts.reference_dir is not None:  # only the source tells whether a tokenizer exists
        lost = [f for f in TOKENIZER_FILES if (opts.reference_dir / f).is_file()
                and not (md.path / f).is_file()]
        if lost:
            findings.append(Finding(f"the source model has {lost[0]} but this directory does "
                                    "not (vLLM needs the tokenizer to serve)",
                                    "copy the source model's tokenizer files unchanged"))
    return findings


@rule("safetensors-integrity", "every shard has an intact header and all its data; the index "
      "matches the shards")
def safetensors_integrity(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    _ = md.tensors  # reading the headers records the problems
    findings = [Finding(p.message, "re-copy or re-write the shard (an interrupted copy or "
                        "download truncates files)") for p in md.header_problems]
    for index_name, weight_map in md.indexes.items():
        missing_files = sorted({f for f in weight_map.values() if not (md.path / f).is_file()})
        if missing_files:
            findings.append(Finding(f"{index_name} points at {missing_files[0]}, which is "
                                    "missing", "copy the missing shard or rewrite the index"))
        ghosts = sorted(t for t, f in weight_map.items()
                        if t not in md.tensors and f not in missing_files)
        if ghosts:
            findings.append(Finding(f"{index_name} lists {ghosts[0]}, which no shard holds",
                                    "rewrite the index from the shards' headers"))
        indexed_files = set(weight_map.values())
        unlisted = sorted(n for n, info in md.tensors.items()
                          if info.file in indexed_files and n not in weight_map)
        if unlisted:
            findings.append(Finding(f"{index_name} does not list {unlisted[0]}",
                                    "rewrite the index from the shards' headers"))
    return findings


@rule("no-quantization-config", "a modelslim config.json carries no quantization_config")
def no_quantization_config(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    if md.format != "modelslim":
        raise Skip(f"{md.format} layout")
    config = md.config or {}
    keys = [key for key, holder in (("quantization_config", config),
                                    ("text_config.quantization_config",
                                     config.get("text_config")))
            if isinstance(holder, dict) and "quantization_config" in holder]
    return [Finding(f"config.json has {key} (quant_method {md.quant_method!r}) next to "
                    f"{DESCRIPTION}: vLLM prefers it and loads the wrong method",
                    f"delete {key} from config.json") for key in keys]


@rule("description-matches-tensors",
      "quant_model_description.json lists every saved tensor, with a known type, and nothing else")
def description_matches(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    if md.format != "modelslim":
        raise Skip(f"{md.format} layout")
    description = md.description or {}
    listed = {k: v for k, v in description.items() if k not in DESCRIPTION_META}
    findings: list[Finding] = []
    unlisted = sorted(set(md.tensors) - set(listed))
    if unlisted:
        findings.append(Finding(f"{len(unlisted)} saved tensor(s) are not in {DESCRIPTION}, "
                                f"e.g. {unlisted[0]}",
                                "list each saved tensor with its type (FLOAT for float ones)"))
    ghosts = sorted(set(listed) - set(md.tensors))
    if ghosts:
        findings.append(Finding(f"{DESCRIPTION} lists {len(ghosts)} tensor(s) no shard holds, "
                                f"e.g. {ghosts[0]}", "remove them, or write the missing tensors"))
    bad = sorted(k for k, v in listed.items() if v not in QUANT_TYPES)
    if bad:
        findings.append(Finding(f"{DESCRIPTION} gives {bad[0]} the unknown type "
                                f"{listed[bad[0]]!r}",
                                f"use one of {', '.join(sorted(QUANT_TYPES))}"))
    for key in ("model_quant_type", "version"):
        if key not in description:
            findings.append(Finding(f"{DESCRIPTION} has no {key!r}", f"add {key}"))
    return findings


@rule("weights-complete", "every weight the architecture loads is present (no serving KeyError)")
def weights_complete(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    if md.config is None:
        raise Skip("no config.json")
    expected = expected_weight_names(md)
    if expected is None:
        raise Skip(f"architecture {md.config.get('model_type')!r} unknown to transformers")
    missing = []
    for tensor in expected:
        prefix = tensor.removesuffix(".weight")
        if not any(a in md.tensors for a in (tensor, f"{prefix}.qweight",
                                             f"{prefix}.weight_packed")):
            missing.append(tensor)
    if not missing:
        return []
    return [Finding(f"{len(missing)} tensor(s) the model loads are missing, e.g. {missing[0]} "
                    f"(vLLM fails with KeyError: '{missing[0]}')",
                    "write every layer of the source model; check the `ignore:` patterns")]


@rule("tensor-dtypes-shapes", "each quantized layer's tensors have the dtypes and shapes of its "
      "type")
def tensor_dtypes_shapes(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    if md.format in ("float", "compressed-tensors"):
        raise Skip(f"{md.format} layout (its own library defines the tensors)")
    return shape_findings(md)


@rule("fused-modules-share-type", "modules a serving engine fuses (qkv, gate_up, "
      "q_a_proj + kv_a_proj_with_mqa, experts) share one quant type")
def fused_share_type(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    groups = fused_groups(md)
    if groups is None:
        raise Skip("architecture without a module map")
    findings = []
    for key, members in sorted(groups.items()):
        types = {md.module_types.get(p, "MISSING") for p in members}
        if len(types) > 1:
            by_type: dict[str, set[str]] = defaultdict(set)
            for p in members:
                by_type[md.module_types.get(p, "MISSING")].add(p.rsplit(".", 1)[-1])
            detail = "; ".join(f"{t}: {', '.join(sorted(v))}" for t, v in sorted(by_type.items()))
            findings.append(Finding(f"{key} mixes quant types ({detail})",
                                    "quantize every part of a fused module the same way "
                                    "(one `overrides:` regex covering the whole group)"))
    return findings


@rule("experts-quantized", "every routed MoE expert is present and quantized")
def experts_quantized(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    experts = moe_expert_names(md)
    if not experts:
        raise Skip("no MoE layers")
    if not md.quantized:
        raise Skip("float model")
    findings = []
    absent = [p for p in experts if p not in md.module_types]
    if absent:
        findings.append(Finding(f"{len(absent)} expert projection(s) are missing, e.g. "
                                f"{absent[0]}", "write every expert of every MoE layer"))
    floating = [p for p in experts if md.module_types.get(p) == "FLOAT"]
    if floating:
        findings.append(Finding(f"{len(floating)} expert projection(s) stayed FLOAT, e.g. "
                                f"{floating[0]}",
                                "quantize every expert (one that saw no calibration tokens "
                                "falls back to RTN); never `ignore:` experts"))
    return findings


@rule("compressed-tensors-scales", "compressed-tensors: every quantized weight carries its "
      "scale (and its shape when packed)")
def compressed_tensors_scales(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    if md.format != "compressed-tensors":
        raise Skip(f"{md.format} layout")
    missing = []
    for prefix, kind in sorted(md.module_types.items()):
        needs = {"INT8": ("weight_scale",), "PACKED": ("weight_scale", "weight_shape")}
        for leaf in needs.get(kind, ()):
            if f"{prefix}.{leaf}" not in md.tensors:
                missing.append(f"{prefix}.{leaf}")
    if not missing:
        return []
    return [Finding(f"{len(missing)} compressed-tensors parameter(s) are missing, e.g. "
                    f"{missing[0]} (vLLM cannot decompress the weight without it)",
                    "re-write the model through the compressed-tensors writer")]


# The target's loader rules come after the layout rules, the serve flag last.
from gcupipe.validation import rules_gcu  # noqa: E402,F401

rule("quantization-flag", "the serve `quantization` value matches the files")(
    quantization_flag_rule)
