"""The rule registry: a rule is a stable name, a one-line summary and a check function."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gcupipe.validation.modeldir import ModelDir
from gcupipe.validation.results import Finding, RuleResult, outcome, skipped


@dataclass(frozen=True)
class CheckOptions:
    """What the caller knows beyond the files: the serve `quantization` value to check (only
    when `check_quantization`; None then means "no flag"), whether an int8 KV cache is expected,
    and the float source model."""

    quantization: str | None = None
    check_quantization: bool = False
    kv_cache_int8: bool | None = None
    reference_dir: Path | None = None  # the float source model, when known


RuleFn = Callable[[ModelDir, CheckOptions], list[Finding]]


class Skip(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by a rule that does not apply to this directory, with the reason."""


@dataclass(frozen=True)
class Rule:
    name: str
    summary: str
    check: RuleFn

    def run(self, md: ModelDir, opts: CheckOptions) -> RuleResult:
        try:
            findings = self.check(md, opts)
        except Skip as reason:
            return skipped(self.name, self.summary, str(reason))
        return outcome(self.name, self.summary, findings)


RULES: list[Rule] = []


def rule(name: str, summary: str) -> Callable[[RuleFn], RuleFn]:
    """Register a rule under a stable name (the name is what reports and JUnit show)."""

    def register(fn: RuleFn) -> RuleFn:
        RULES.append(Rule(name, summary, fn))
        return fn

    return register


def check_structure(md: ModelDir, opts: CheckOptions | None = None) -> list[RuleResult]:
    """Run every registered rule; a rule that crashes is reported as that rule failing (a
    damaged directory must still give a report, not a traceback)."""
    from gcupipe.validation import rules  # noqa: F401  (importing registers the rules)

    opts = opts or CheckOptions()
    results = []
    for item in RULES:
        try:
            result = item.run(md, opts)
        except Exception as exc:  # noqa: BLE001
            result = RuleResult(item.name, item.summary, "fail", [Finding(
                f"could not check: {exc.__class__.__name__}: {exc}".splitlines()[0],
                "fix the problems the other rules report, then re-run")])
        results.append(result)
    return results
