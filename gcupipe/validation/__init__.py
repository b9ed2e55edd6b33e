"""Validation: named structural rules, numeric gates and reports for quantized model dirs."""
