"""Writing benchmark figures: every script records what it measured, when, and at which commit."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        )
        dirty = subprocess.run(  # results written by earlier benchmarks do not count
            ["git", "status", "--porcelain", "--", ":/", ":!/benchmarks/results"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_results(name: str, figures: dict[str, Any], markdown: str) -> Path:
    """benchmarks/results/<name>.json (figures) and <name>.md (the table people read)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "commit": git_commit(),
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {platform.node()}",
    }
    (RESULTS / f"{name}.json").write_text(json.dumps({**meta, **figures}, indent=2) + "\n")
    header = f"_commit {meta['commit']}, {meta['measured_at']}_\n\n"
    path = RESULTS / f"{name}.md"
    path.write_text(header + markdown.rstrip() + "\n")
    return path
