"""Validation: named structural rules, numeric gates and reports for quantized model dirs.

`validate_model_dir` runs everything and writes the reports; `enforce` turns failures into
GateFailed (exit code 3); `check_quantization_flag` is the one rule the serve stage re-uses.
Importing this package is light: torch and transformers load only when numbers are computed.
"""

from gcupipe.validation.api import (
    ValidationOutcome,
    ValidationSettings,
    enforce,
    validate_model_dir,
)
from gcupipe.validation.flag import check_quantization_flag, expected_quantization
from gcupipe.validation.results import Finding, RuleResult

__all__ = [
    "Finding",
    "RuleResult",
    "ValidationOutcome",
    "ValidationSettings",
    "check_quantization_flag",
    "enforce",
    "expected_quantization",
    "validate_model_dir",
]
