"""Does the serve `quantization` value match the files? (The seed guide serves a W8A8 model with
quantization="w4a16"; this rule fails that with the value that is right.)

vLLM takes config.json's quantization_config when present and raises if it disagrees with the
requested value; the modelslim layout has none, so vLLM trusts the flag and a wrong one loads
int8 tensors as something they are not (or fails with a KeyError deep in a loader).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gcupipe.validation.modeldir import DESCRIPTION, ModelDir
from gcupipe.validation.registry import CheckOptions, Skip
from gcupipe.validation.results import Finding, RuleResult, outcome

RULE = "quantization-flag"
SUMMARY = "the serve `quantization` value matches the files"


@dataclass(frozen=True)
class Expected:
    """The value to pass (None = leave it unset), every value that also works, and what the
    files are, in words, for messages."""

    value: str | None
    accepted: frozenset[str | None]
    what: str


def expected_quantization(md: ModelDir) -> Expected:
    """The vLLM `quantization` value the files in `md` need."""
    if md.format == "modelslim":
        kind = (md.description or {}).get("model_quant_type", "quantized")
        return Expected("gcu", frozenset({"gcu", "ascend"}),
                        f"{kind} in the modelslim layout ({DESCRIPTION})")
    if md.format == "gcu":
        method = str(md.quant_method)
        return Expected(method, frozenset({method, f"{method}_gcu"}),
                        f"{method} in the vLLM-GCU layout (config.json quantization_config)")
    if md.format == "compressed-tensors":
        return Expected(None, frozenset({None, "compressed-tensors"}),
                        "compressed-tensors (config.json quantization_config; vLLM detects it)")
    return Expected(None, frozenset({None}), "an unquantized model")


def _normalise(value: str | None) -> str | None:
    if value is None or str(value).strip().lower() in ("", "none", "null", "auto"):
        return None
    return str(value).strip().lower()


def flag_findings(md: ModelDir, quantization: str | None) -> list[Finding]:
    expected = expected_quantization(md)
    asked = _normalise(quantization)
    if asked in expected.accepted:
        return []
    right = "leave quantization unset" if expected.value is None else (
        f"serve with quantization={expected.value!r}")
    if asked is None:
        return [Finding(f"no quantization value given, but the files are {expected.what}; "
                        f"vLLM would load them as float weights", right)]
    return [Finding(f"quantization={quantization!r} does not match the files: they are "
                    f"{expected.what}; the right value is {expected.value!r}", right)]


def check_quantization_flag(model_dir: Path | str, quantization: str | None) -> RuleResult:
    """The serve stage's check: a RuleResult that fails, naming the right value, when
    `quantization` is not what the files in `model_dir` need."""
    md = ModelDir(Path(model_dir))
    return outcome(RULE, SUMMARY, flag_findings(md, quantization))


def quantization_flag_rule(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    if not opts.check_quantization:
        raise Skip("no serve `quantization` value given to check")
    return flag_findings(md, opts.quantization)
