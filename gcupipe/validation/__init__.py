"""Validation: the structural rules (the layout's, formats/rules.py; the target's loaders',
validation/rules.py), numeric gates and reports for quantized model directories.

`validate_model_dir` runs everything and writes the reports; `enforce` turns failures into
GateFailed (exit code 3); `check_quantization_flag` is the one rule the serve stage re-uses.
Importing this package is light: torch and transformers load only when numbers are computed.
"""

from gcupipe.formats.results import Finding, RuleResult
from gcupipe.validation.api import (
    ValidationOutcome,
    ValidationSettings,
    enforce,
    validate_model_dir,
)
from gcupipe.validation.rules import check_quantization_flag

__all__ = [
    "Finding",
    "RuleResult",
    "ValidationOutcome",
    "ValidationSettings",
    "check_quantization_flag",
    "enforce",
    "validate_model_dir",
]
