"""What a rule is and what it finds: the vocabulary of the structural rules (formats/rules.py and
each format's own) and of the numeric gates (validation/), one shape for every report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from gcupipe.formats.modeldir import ModelDir

Status = Literal["pass", "fail", "skip"]


@dataclass(frozen=True)
class Finding:
    """One concrete problem: what is wrong (naming the file or tensor) and how to fix it. Names
    come from the files themselves (a JSON key, a tensor name), so a control character in one is
    escaped: a finding stays one line in a log, a report or a JUnit file."""

    message: str
    fix: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "message", _printable(self.message))
        object.__setattr__(self, "fix", _printable(self.fix))


def _printable(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


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


@dataclass(frozen=True)
class CheckOptions:
    """What the caller knows beyond the files: the serve `quantization` value to check (only
    when `check_quantization`; None then means "no flag"), whether an int8 KV cache is expected,
    the float source model, and the target whose loaders judge the files (None: the one the
    layout is made for)."""

    quantization: str | None = None
    check_quantization: bool = False
    kv_cache_int8: bool | None = None
    reference_dir: Path | None = None  # the float source model, when known
    target: str | None = None


RuleFn = Callable[["ModelDir", CheckOptions], list[Finding]]


class Skip(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by a rule that does not apply to this directory, with the reason."""


@dataclass(frozen=True)
class Rule:
    name: str
    summary: str
    check: RuleFn

    def run(self, md: ModelDir, opts: CheckOptions) -> RuleResult:
        """The rule's result; a rule that crashes is reported as that rule failing (a damaged
        directory must still give a report, not a traceback)."""
        try:
            return outcome(self.name, self.summary, self.check(md, opts))
        except Skip as reason:
            return skipped(self.name, self.summary, str(reason))
        except Exception as exc:  # noqa: BLE001
            message = f"could not check: {exc.__class__.__name__}: {exc}".splitlines()[0]
            fix = "fix the problems the other rules report, then re-run"
            return RuleResult(self.name, self.summary, "fail", [Finding(message, fix)])
