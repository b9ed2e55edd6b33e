"""Calibration coverage of MoE experts: how many calibration tokens the router sent to each
routed expert while a calibrated method (GPTQ, AWQ, static W8A8) ran, and the gate on it.

An expert that saw too few tokens was quantized from too little data or by the RTN fallback
(quant/gptq.py: fallback_reason); the gate `min_expert_tokens` makes that visible and fails it.
"""

from __future__ import annotations

import statistics
from typing import Any

from gcupipe.formats.results import Finding, RuleResult, outcome, skipped

RULE = "expert-coverage"
SUMMARY = "every routed MoE expert saw at least min_expert_tokens calibration tokens"
BINS = (0, 1, 16, 64, 256, 1024, 4096)  # histogram lower edges


def coverage_metrics(expert_tokens: dict[str, int]) -> dict[str, Any]:
    """min / median / max tokens per expert and a histogram (lower bin edge -> experts)."""
    counts = list(expert_tokens.values())
    histogram: dict[str, int] = {}
    for low, high in zip(BINS, (*BINS[1:], None), strict=True):
        label = f"{low}+" if high is None else str(low) if high == low + 1 else f"{low}-{high - 1}"
        histogram[label] = sum(1 for c in counts if c >= low and (high is None or c < high))
    return {
        "experts": len(counts),
        "min": min(counts),
        "median": statistics.median(counts),
        "max": max(counts),
        "histogram": histogram,
        "fewest": sorted(expert_tokens.items(), key=lambda item: item[1])[:5],
    }


def coverage_gate(expert_tokens: dict[str, int] | None, minimum: int | None) -> RuleResult:
    if not expert_tokens:
        return skipped(RULE, SUMMARY, "no calibrated MoE experts upstream")
    metrics = coverage_metrics(expert_tokens)
    if minimum is None:
        return outcome(RULE, SUMMARY, [], **metrics)
    starved = sorted(name for name, count in expert_tokens.items() if count < minimum)
    findings = []
    if starved:
        first = starved[0]
        findings.append(
            Finding(
                f"{len(starved)} of {len(expert_tokens)} experts saw fewer than "
                f"min_expert_tokens {minimum} calibration tokens (first: {first}, "
                f"{expert_tokens[first]} tokens)",
                "calibrate on more samples or longer sequences (calibration.samples, seq_len), "
                "or on text closer to the model's domain",
            )
        )
    return outcome(RULE, SUMMARY, findings, starved=len(starved), **metrics)
