"""`check_structure`: the layout's rules (formats/rules.py), then the ones that ask the target
(targets/): its own, does its loader find every parameter it creates, do its kernels compute
what gcupipe's reference runtime computes, and is the serve flag right for it.

- loader-parameters: `Target.expected` rebuilds the parameter set the target's quantization
  classes create for this directory's modules (names, dtypes, shapes); every one must be in the
  files, with a dtype and shape it takes.
- loader-numerics: for a few modules (the first decoder layer's, one routed expert, the last
  layer's down projection), the target's own kernel (targets/kernels.py, decoding the raw
  tensors on its own) against the reference runtime (the format reader and RuntimeLinear), in
  float64 on the same inputs: they must agree to 1e-6 of the largest output. The runtime is in
  turn held to the float model by validate's per-layer SQNR, so the target's formula is too.
- quantization-flag: the serve `quantization` value is one the target's loaders accept for the
  files (the seed guide serves a W8A8 model with quantization="w4a16").
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from gcupipe.errors import StageError
from gcupipe.formats.format import QuantizationFlag
from gcupipe.formats.layout import linear_shapes
from gcupipe.formats.modeldir import ModelDir
from gcupipe.formats.registry import format_of
from gcupipe.formats.results import CheckOptions, Finding, Rule, RuleResult, Skip, outcome
from gcupipe.formats.rules import format_rules
from gcupipe.targets.base import ModelFacts, Target
from gcupipe.targets.registry import target_for

if TYPE_CHECKING:
    from gcupipe.formats.format import Format

NUMERIC_TOLERANCE = 1e-6
"""Of the largest output: float64 on both sides, the same stored values; what is left is
summation order (~1e-12). A layout slip (a nibble order, a zero-point convention, a scale that
divides instead of multiplies) moves outputs by far more than this."""
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _sampled(prefixes: list[str]) -> list[str]:
    """The modules the numeric check runs: every one of the first decoder layer, the first
    routed expert of the first MoE layer, and the last layer's down projections."""
    layers = [int(m.group(1)) for p in prefixes if (m := _LAYER.match(p))]
    if not layers:
        return []
    last = max(layers)
    experts = [p for p in prefixes if ".mlp.experts.0." in p]
    first_moe = min((int(m.group(1)) for p in experts if (m := _LAYER.match(p))), default=-1)
    chosen = []
    for prefix in prefixes:
        match = _LAYER.match(prefix)
        index = int(match.group(1)) if match else -1
        expert = ".mlp.experts." in prefix
        if (index == 0 and not expert) or (index == first_moe and ".mlp.experts.0." in prefix):
            chosen.append(prefix)
        elif index == last and prefix.endswith("down_proj") and not expert:
            chosen.append(prefix)
    return chosen


def _module(prefix: str) -> Callable[[str], bool]:
    """A reader selector for one module's tensors."""
    return lambda name: name.startswith(prefix + ".")


def target_of(md: ModelDir, opts: CheckOptions) -> tuple[Target, Format]:
    fmt = format_of(md)
    if fmt is None:
        raise Skip("a float model: every target loads it")
    return target_for(opts.target, fmt), fmt


def _loader_parameters(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    target, fmt = target_of(md, opts)
    facts = ModelFacts.from_config(md.config or {})
    expected = target.expected(md, fmt, facts)
    if not expected:
        raise Skip(f"{target.summary} reads the {fmt.name} layout through its own library")
    findings = []
    for want in expected:
        info = md.tensors.get(want.name)
        if info is None:
            findings.append(
                Finding(
                    f"{want.name} is missing: {want.loader} creates this "
                    f"parameter on {target.summary}",
                    f"re-write the model for target {target.name} with the quantize stage",
                )
            )
        elif want.dtypes and info.dtype not in want.dtypes:
            findings.append(
                Finding(
                    f"{want.name} is {info.dtype}; {want.loader} creates it as "
                    f"{'/'.join(sorted(want.dtypes))}",
                    f"re-write the model for target {target.name}",
                )
            )
        elif want.shape is not None and tuple(info.shape) != want.shape:
            findings.append(
                Finding(
                    f"{want.name} has shape {list(info.shape)}; {want.loader} "
                    f"creates {list(want.shape)}",
                    f"re-write the model for target {target.name}",
                )
            )
    if len(findings) > 3:
        findings = findings[:3] + [Finding(f"... and {len(findings) - 3} more", "as above")]
    return findings


def _loader_numerics(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    import torch

    from gcupipe.formats.registry import read_quantized
    from gcupipe.runtime.linear import RuntimeLinear

    target, fmt = target_of(md, opts)
    shapes = linear_shapes(md)
    sampled = _sampled(list(shapes))
    findings, compared = [], 0
    generator = torch.Generator().manual_seed(0)
    for prefix in sampled:
        kernel = target.emulate(md, fmt, prefix)
        if kernel is None:
            continue
        checkpoint = read_quantized(md.path, _module(prefix))
        layer = checkpoint.linears.get(prefix)
        if layer is None:
            findings.append(
                Finding(
                    f"{prefix}: {target.summary}'s kernel reads a quantized "
                    "layer that gcupipe's reader does not",
                    "re-write the model with the quantize stage",
                )
            )
            continue
        x = torch.randn(8, shapes[prefix][1], generator=generator, dtype=torch.float64)
        if layer.input_scale is not None:  # static activations: stay inside the calibration
            x = x * 30 * float(layer.input_scale.reshape(-1)[0])
        with torch.no_grad():
            want = RuntimeLinear(layer)(x)
            got = kernel(x)
        compared += 1
        error = float((got - want).abs().max())
        scale = float(want.abs().max()) or 1.0
        if error > NUMERIC_TOLERANCE * scale:
            findings.append(
                Finding(
                    f"{prefix}: {target.summary}'s kernel computes outputs "
                    f"{error / scale:.2e} (relative) away from gcupipe's "
                    "runtime on the same files: the layout is read "
                    "differently",
                    "re-write the model with the quantize "
                    "stage; report a gcupipe bug if it persists",
                )
            )
    if not compared:
        raise Skip("no quantized layer among the sampled ones")
    return findings


def quantization_flag_findings(
    md: ModelDir, quantization: str | None, target_name: str | None
) -> list[Finding]:
    fmt = format_of(md)
    try:
        expected = (
            target_for(target_name, fmt).quantization(md, fmt) if fmt is not None else FLOAT_FLAG
        )
    except StageError as exc:
        return [Finding(str(exc), "serve another export on this target")]
    asked = _normalise(quantization)
    if asked in expected.accepted:
        return []
    right = (
        "leave quantization unset"
        if expected.value is None
        else (f"serve with quantization={expected.value!r}")
    )
    if asked is None:
        return [
            Finding(
                f"no quantization value given, but the files are {expected.what}; "
                f"vLLM would load them as float weights",
                right,
            )
        ]
    return [
        Finding(
            f"quantization={quantization!r} does not match the files: they are "
            f"{expected.what}; the right value is {expected.value!r}",
            right,
        )
    ]


def _normalise(value: str | None) -> str | None:
    if value is None or str(value).strip().lower() in ("", "none", "null", "auto"):
        return None
    return str(value).strip().lower()


def _quantization_flag(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    if not opts.check_quantization:
        raise Skip("no serve `quantization` value given to check")
    return quantization_flag_findings(md, opts.quantization, opts.target)


def check_quantization_flag(
    model_dir: Path | str, quantization: str | None, target: str | None = None
) -> RuleResult:
    """The serve stage's check before vLLM starts: fails, naming the right value, when
    `quantization` is not what `target`'s loaders need for the files in `model_dir`."""
    md = ModelDir(Path(model_dir))
    findings = quantization_flag_findings(md, quantization, target)
    return outcome(QUANTIZATION_FLAG.name, QUANTIZATION_FLAG.summary, findings)


def check_structure(md: ModelDir, opts: CheckOptions | None = None) -> list[RuleResult]:
    """Every rule that applies to `md`, in order: the layout's, the target's own, the loader
    emulation, the serve flag last."""
    opts = opts or CheckOptions()
    fmt = format_of(md)
    own = target_for(opts.target, fmt).rules() if fmt is not None else ()
    rules = [*format_rules(md), *own, LOADER_PARAMETERS, LOADER_NUMERICS, QUANTIZATION_FLAG]
    return [rule.run(md, opts) for rule in rules]


FLOAT_FLAG = QuantizationFlag(None, frozenset({None}), "an unquantized model")
LOADER_PARAMETERS = Rule(
    "loader-parameters",
    "every parameter the target's quantization classes "
    "create is in the files, with a dtype and shape they take",
    _loader_parameters,
)
LOADER_NUMERICS = Rule(
    "loader-numerics",
    "the target's own kernels compute what the reference runtime computes on sampled layers",
    _loader_numerics,
)
QUANTIZATION_FLAG = Rule(
    "quantization-flag",
    "the serve `quantization` value matches the files for the target",
    _quantization_flag,
)
