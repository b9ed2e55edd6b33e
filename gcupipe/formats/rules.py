"""The structural rules: each one is a mistake that otherwise surfaces only at serving time.

A rule is a stable name, a one-line summary and a function of a `ModelDir` (and the check
options) returning findings that say what is wrong, naming the file or tensor, and how to fix
it. `format_rules` lists them in one fixed order, the order a person would fix things: the
files, then the rules of the directory's own format (its `Format.rules()`), then the rules every
format shares (the target's rules follow: validation/rules.py). Only header bytes are
read, except by the few rules that need tensor values.
"""

from __future__ import annotations

from collections import defaultdict

from gcupipe.formats.bundle import bundle_findings
from gcupipe.formats.layout import (
    FLOAT_DTYPES,
    expected_weight_names,
    fused_groups,
    moe_expert_names,
)
from gcupipe.formats.modeldir import ModelDir
from gcupipe.formats.registry import format_name, format_of
from gcupipe.formats.results import CheckOptions, Finding, Rule, Skip


def format_rules(md: ModelDir) -> list[Rule]:
    """The layout's rules for `md`, in order: files, the format's own, then the shared ones."""
    fmt = format_of(md)
    own = fmt.rules() if fmt is not None else ()
    shared = [rule for rule in SHARED if rule.name not in {r.name for r in own}]
    return [*FIRST, *own, *shared]


# -- the rules every directory gets ----------------------------------------------------------


def _required_files(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    findings: list[Finding] = []
    if md.config is None:
        findings.append(
            Finding(
                f"{md.path}/config.json is missing or not valid JSON",
                "copy config.json from the source model",
            )
        )
    if not md.safetensors_files:
        findings.append(
            Finding(
                f"{md.path} has no .safetensors weight files",
                "re-run the quantize stage; a model directory needs weights",
            )
        )
    fmt = format_of(md)
    for pattern, fix in fmt.required_files if fmt is not None else ():
        if not list(md.path.glob(pattern)):
            findings.append(Finding(f"no {pattern} ({fmt.name} layout)", fix))  # type: ignore[union-attr]
    return findings


def _safetensors_integrity(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    _ = md.tensors  # reading the headers records the problems
    findings = [
        Finding(
            p.message,
            "re-copy or re-write the shard (an interrupted copy or download truncates files)",
        )
        for p in md.header_problems
    ]
    for index_name, weight_map in md.indexes.items():
        missing_files = sorted({f for f in weight_map.values() if not (md.path / f).is_file()})
        if missing_files:
            findings.append(
                Finding(
                    f"{index_name} points at {missing_files[0]}, which is missing",
                    "copy the missing shard or rewrite the index",
                )
            )
        ghosts = sorted(
            t for t, f in weight_map.items() if t not in md.tensors and f not in missing_files
        )
        if ghosts:
            findings.append(
                Finding(
                    f"{index_name} lists {ghosts[0]}, which no shard holds",
                    "rewrite the index from the shards' headers",
                )
            )
        indexed_files = set(weight_map.values())
        unlisted = sorted(
            n
            for n, info in md.tensors.items()
            if info.file in indexed_files and n not in weight_map
        )
        if unlisted:
            findings.append(
                Finding(
                    f"{index_name} does not list {unlisted[0]}",
                    "rewrite the index from the shards' headers",
                )
            )
    return findings


def _weights_complete(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    if md.config is None:
        raise Skip("no config.json")
    expected = expected_weight_names(md)
    if expected is None:
        raise Skip(f"architecture {md.config.get('model_type')!r} unknown to transformers")
    missing = []
    for tensor in expected:
        prefix = tensor.removesuffix(".weight")
        if not any(
            a in md.tensors for a in (tensor, f"{prefix}.qweight", f"{prefix}.weight_packed")
        ):
            missing.append(tensor)
    if not missing:
        return []
    return [
        Finding(
            f"{len(missing)} tensor(s) the model loads are missing, e.g. {missing[0]} "
            f"(vLLM fails with KeyError: '{missing[0]}')",
            "write every layer of the source model; check the `ignore:` patterns",
        )
    ]


def _module_types(md: ModelDir) -> dict[str, str]:
    fmt = format_of(md)
    return fmt.module_types(md) if fmt is not None else _float_module_types(md)


def _float_module_types(md: ModelDir) -> dict[str, str]:
    return {
        name.removesuffix(".weight"): "FLOAT"
        for name, info in md.tensors.items()
        if name.endswith(".weight") and len(info.shape) == 2
    }


def _fused_share_type(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    types = _module_types(md)
    groups = fused_groups(md, types)
    if groups is None:
        raise Skip("architecture without a module map")
    findings = []
    for key, members in sorted(groups.items()):
        kinds = {types.get(p, "MISSING") for p in members}
        if len(kinds) > 1:
            by_type: dict[str, set[str]] = defaultdict(set)
            for p in members:
                by_type[types.get(p, "MISSING")].add(p.rsplit(".", 1)[-1])
            detail = "; ".join(f"{t}: {', '.join(sorted(v))}" for t, v in sorted(by_type.items()))
            findings.append(
                Finding(
                    f"{key} mixes quant types ({detail})",
                    "quantize every part of a fused module the same way "
                    "(one `overrides:` regex covering the whole group)",
                )
            )
    return findings


def _experts_quantized(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    experts = moe_expert_names(md)
    if not experts:
        raise Skip("no MoE layers")
    if format_of(md) is None:
        raise Skip("float model")
    types = _module_types(md)
    findings = []
    absent = [p for p in experts if p not in types]
    if absent:
        findings.append(
            Finding(
                f"{len(absent)} expert projection(s) are missing, e.g. {absent[0]}",
                "write every expert of every MoE layer",
            )
        )
    floating = [p for p in experts if types.get(p) == "FLOAT"]
    if floating:
        findings.append(
            Finding(
                f"{len(floating)} expert projection(s) stayed FLOAT, e.g. {floating[0]}",
                "quantize every expert (one that saw no calibration tokens "
                "falls back to RTN); never `ignore:` experts",
            )
        )
    return findings


def _no_int8_kv_cache(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    """For formats without their own KV-cache rule: they carry no int8 KV cache at all."""
    if not opts.kv_cache_int8:
        raise Skip("no int8 KV cache")
    name = format_name(md)
    return [
        Finding(
            f"an int8 KV cache was asked for, but the {name} layout carries no int8 "
            "KV-cache scales",
            "use format modelslim or gcu for an int8 KV cache",
        )
    ]


SCALE_LEAVES = frozenset(
    {"weight_scale", "input_scale", "deq_scale", "scales", "out_scales", "in_scales"}
    | {"k_scale", "v_scale"}
)
"""Tensor names (the part after the last dot) that hold quantization scales, in every layout
gcupipe writes or reads: modelslim, compressed-tensors, GPTQ, the gcu layouts, KV caches."""


def _scales_finite(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    from safetensors import safe_open

    by_file: dict[str, list[str]] = defaultdict(list)
    for name, info in md.tensors.items():
        if name.rpartition(".")[2] in SCALE_LEAVES and info.dtype in FLOAT_DTYPES:
            by_file[info.file].append(name)
    if not by_file:
        raise Skip("no float scale tensors (a float model)")
    bad: list[tuple[str, str]] = []
    for file, names in sorted(by_file.items()):
        with safe_open(str(md.path / file), "pt") as handle:
            for name in names:
                values = handle.get_tensor(name).float()
                if not bool(values.isfinite().all()):
                    bad.append((name, "NaN or infinite"))
                elif bool((values == 0).any()):
                    bad.append((name, "zero"))
    if not bad:
        return []
    name, what = bad[0]
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    return [
        Finding(
            f"{name} holds a {what} scale{more}: the served layer computes NaN or infinity",
            "re-quantize the layer (a NaN or inf in the float weights or the calibration "
            "activations gives such scales; `overrides: {LAYER: {skip: true}}` keeps it float)",
        )
    ]


def _bundle_complete(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    return bundle_findings(md, opts.reference_dir)


REQUIRED_FILES = Rule(
    "required-files",
    "config.json, weights and the layout's own files exist",
    _required_files,
)
BUNDLE_COMPLETE = Rule(
    "bundle-complete",
    "the tokenizer, chat template, generation config, license and remote code the source "
    "has (or auto_map names) are here",
    _bundle_complete,
)
SAFETENSORS_INTEGRITY = Rule(
    "safetensors-integrity",
    "every shard has an intact header and all its data; the index matches the shards",
    _safetensors_integrity,
)
FIRST = (REQUIRED_FILES, BUNDLE_COMPLETE, SAFETENSORS_INTEGRITY)
SHARED = (
    Rule(
        "weights-complete",
        "every weight the architecture loads is present (no serving KeyError)",
        _weights_complete,
    ),
    Rule(
        "fused-modules-share-type",
        "modules a serving engine fuses (qkv, gate_up, q_a_proj + "
        "kv_a_proj_with_mqa, experts) share one quant type",
        _fused_share_type,
    ),
    Rule(
        "experts-quantized", "every routed MoE expert is present and quantized", _experts_quantized
    ),
    Rule(
        "kv-cache-scales",
        "int8 KV cache: scales (and offsets) for every attention layer",
        _no_int8_kv_cache,
    ),
    Rule(
        "scales-finite",
        "every quantization scale is finite and nonzero (a NaN scale serves NaN)",
        _scales_finite,
    ),
)
"""Rules every format gets; a format's own rule of the same name takes the shared one's place."""
