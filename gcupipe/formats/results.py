"""Outcomes of named rules (structure here, numeric gates in validation/), one shape for reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Status = Literal["pass", "fail", "skip"]


@dataclass(frozen=True)
class Finding:
    """One concrete problem: what is wrong (naming the file or tensor) and how to fix it."""

    message: str
    fix: str


@dataclass
class RuleResult:
    """The outcome of one named rule. A rule that does not apply to a directory (a GPTQ rule on a
    modelslim model) is skipped with the reason, so reports show it was considered."""

    rule: str
    summary: str
    status: Status
    findings: list[Finding] = field(default_factory=list)
    skip_reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status == "fail"

    @property
    def message(self) -> str:
        """One line: the first finding (and how many more), or what passed/why skipped."""
        if self.status == "skip":
            return f"skipped: {self.skip_reason}"
        if not self.findings:
            return "ok"
        more = len(self.findings) - 1
        first = self.findings[0]
        return first.message + (f" (and {more} more)" if more else "") + f"; fix: {first.fix}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["message"] = self.message
        return data


def passed(rule: str, summary: str, **metrics: Any) -> RuleResult:
    return RuleResult(rule, summary, "pass", metrics=dict(metrics))


def skipped(rule: str, summary: str, reason: str) -> RuleResult:
    return RuleResult(rule, summary, "skip", skip_reason=reason)


def outcome(rule: str, summary: str, findings: list[Finding], **metrics: Any) -> RuleResult:
    return RuleResult(
        rule, summary, "fail" if findings else "pass", list(findings), metrics=dict(metrics)
    )
