"""Writing benchmark figures: every script records what it measured, when, and at which commit."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def drop_caches(imports: str = "torch, transformers, gcupipe.cli") -> bool:
    """Empty the page cache (needs root) so a measurement reads its model files from disk, then
    read `imports` back in, so that no measured job pays for cold Python packages (a job that
    imports nothing would otherwise be favoured). Whether the cache was emptied."""
    import sys

    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    subprocess.run([sys.executable, "-c", f"import {imports}"], check=True, capture_output=True)
    return True


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


CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
"""The instruction sets that decide which int8/bf16 kernels torch and vLLM pick."""


def machine_facts() -> dict[str, Any]:
    """What the figures were measured on, read from the machine (never assumed): CPU model and
    the flags that matter, usable cores, memory, and the 1-minute load average at writing."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": model,
        "cpu_flags": [flag for flag in CPU_FLAGS if flag in flags],
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(memory / 2**30, 1),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


class QuietMachine:
    """Timing figures only from a machine with nothing else running. On creation waits (up to
    `wait_s`) for the 1-minute load average to fall below `idle_load`, else exits with status 3;
    `check()` exits likewise when other processes used more than `others_limit` of the
    machine's CPU time since (the whole machine's busy time minus this process
    and its waited-for children), so no results are written from a loaded run."""

    def __init__(self, idle_load: float = 0.5, wait_s: float = 300, others_limit: float = 0.1):
        import sys

        self.others_limit = others_limit
        deadline = time.monotonic() + wait_s
        while os.getloadavg()[0] >= idle_load:
            if time.monotonic() > deadline:
                sys.exit(f"refused: 1-minute load average {os.getloadavg()[0]:.2f} >= {idle_load}")
            time.sleep(10)
        self.start = self._snapshot()

    @staticmethod
    def _snapshot() -> tuple[float, float, float]:
        import resource

        import psutil

        times = psutil.cpu_times()
        busy = times.user + times.nice + times.system + times.irq + times.softirq
        own = sum(
            usage.ru_utime + usage.ru_stime
            for usage in (
                resource.getrusage(resource.RUSAGE_SELF),
                resource.getrusage(resource.RUSAGE_CHILDREN),
            )
        )
        return time.monotonic(), busy, own

    def others_share(self) -> float:
        """Share of the machine's CPU time (cores x wall) used by other processes since."""
        now = self._snapshot()
        wall = (now[0] - self.start[0]) * len(os.sched_getaffinity(0))
        others = (now[1] - self.start[1]) - (now[2] - self.start[2])
        return max(0.0, others) / wall if wall > 0 else 0.0

    def check(self) -> float:
        import sys

        share = self.others_share()
        if share > self.others_limit:
            sys.exit(
                f"refused: other processes used {share:.0%} of the CPU while this ran "
                f"(limit {self.others_limit:.0%}); no results written"
            )
        return share


def write_results(name: str, figures: dict[str, Any], markdown: str) -> Path:
    """benchmarks/results/<name>.json (figures) and <name>.md (the table people read), both
    stamped with the commit and the machine."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    facts = machine_facts()
    meta = {
        "commit": git_commit(),
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {platform.node()}",
        **facts,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps({**meta, **figures}, indent=2) + "\n")
    header = (
        f"_commit {meta['commit']}, {meta['measured_at']}, {facts['cpu']} "
        f"({', '.join(facts['cpu_flags']) or 'no AVX-512'}), {facts['cores']} cores_\n\n"
    )
    path = RESULTS / f"{name}.md"
    path.write_text(header + markdown.rstrip() + "\n")
    return path
