"""The one exception hierarchy of gcupipe; each class carries the CLI exit code it maps to."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeGuard


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """` (did you mean 'x'?)` for the closest of `choices`, or nothing: for error messages."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class GcupipeError(Exception):
    """Base of every error gcupipe raises on purpose; the CLI prints it as one clear message."""

    exit_code = 1


class UsageError(GcupipeError):
    """The command line asks for something that cannot be done (bad flag, unknown stage...)."""

    exit_code = 2


@dataclass(frozen=True)
class Mark:
    """A place in a recipe source: a file (or a pseudo-source such as `--set #1`), 1-based."""

    source: str
    line: int = 0
    column: int = 0

    def __str__(self) -> str:
        if self.line <= 0:  # a pseudo-source such as a --set override has no lines
            return self.source
        return f"{self.source}:{self.line}:{self.column}"


class RecipeError(GcupipeError):
    """A recipe is malformed; the message names `file:line:col` and the key path.

    One error may carry several problems (`RecipeError.combine`), one line each, so `lint`
    reports everything it found in one pass."""

    exit_code = 2

    def __init__(self, message: str, mark: Mark | None = None, key_path: str | None = None):
        self.message = message
        self.mark = mark
        self.key_path = key_path
        self.problems: list[RecipeError] = [self]
        super().__init__(self.render())

    def render(self) -> str:
        where = f"{self.mark}: " if self.mark else ""
        key = f"{self.key_path}: " if self.key_path else ""
        return f"{where}{key}{self.message}"

    @classmethod
    def combine(cls, errors: list[RecipeError]) -> RecipeError:
        """One error listing every problem of `errors`, in file order, without duplicates."""
        problems: list[RecipeError] = []
        seen: set[str] = set()
        for error in errors:
            for problem in error.problems:
                if problem.render() not in seen:
                    seen.add(problem.render())
                    problems.append(problem)
        problems.sort(
            key=lambda p: (
                p.mark is None,
                str(p.mark and p.mark.source),
                p.mark.line if p.mark else 0,
                p.mark.column if p.mark else 0,
            )
        )
        combined = (
            problems[0] if len(problems) == 1 else cls("\n".join(p.render() for p in problems))
        )
        combined.problems = problems
        return combined

    def __str__(self) -> str:
        return "\n".join(problem.render() for problem in self.problems)


class StageError(GcupipeError):
    """A stage could not do its work; stages raise it with one line that says what to do."""

    exit_code = 1


class GateFailed(GcupipeError):
    """A validation gate failed: the artifact was built but must not ship."""

    exit_code = 3


class NoSpace(GcupipeError):
    """The run's estimated disk exceeds what its filesystem has free (checked before it runs)."""

    exit_code = 4


class Interrupted(GcupipeError):
    """The run was interrupted (Ctrl-C / SIGINT / SIGTERM)."""

    exit_code = 130


class MissingDependency(GcupipeError):
    """An optional dependency is missing; the message names the `pip install` that fixes it."""

    exit_code = 2

    def __init__(self, module: str, extra: str):
        super().__init__(
            f"this needs the Python package '{module}', which is not installed: "
            f"pip install 'gcupipe[{extra}]'"
        )


def require(module: str, extra: str):  # type: ignore[no-untyped-def]
    """Import an optional heavy module lazily, or raise MissingDependency with the fix."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name.split(".")[0]):
            raise MissingDependency(module, extra) from exc
        raise


def is_disk_full(exc: BaseException | None) -> TypeGuard[OSError]:
    """A write failed because the filesystem is full (or the quota is spent)."""
    import errno

    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
