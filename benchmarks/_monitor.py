"""Measuring a job: peak RSS of its whole process tree and the storage bytes it read and
wrote, sampled while it runs (used by the benchmarks that run gcupipe stage by stage)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from _results import drop_caches

REPO = Path(__file__).resolve().parents[1]


class TreeMonitor:
    """Peak RSS of a process and its descendants, and their storage bytes read / written."""

    def __init__(self, pid: int, interval_s: float = 0.2):
        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak_rss = 0
        self.io: dict[int, tuple[int, int]] = {}  # pid -> last (read_bytes, write_bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            rss = 0
            for process in processes:
                try:
                    rss += process.memory_info().rss
                    counters = process.io_counters()
                    self.io[process.pid] = (counters.read_bytes, counters.write_bytes)
                except psutil.Error:
                    continue
            self.peak_rss = max(self.peak_rss, rss)
            self._stop.wait(self.interval_s)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {
            "peak_rss_gb": self.peak_rss / 1e9,
            "read_gb": sum(r for r, _ in self.io.values()) / 1e9,
            "written_gb": sum(w for _, w in self.io.values()) / 1e9,
        }


def measured(
    command: list[str],
    env: dict[str, str] | None = None,
    log: Path | None = None,
    kill_when: Any = None,
) -> dict[str, Any]:
    """Run `command`, monitoring its process tree; `kill_when()` -> True sends SIGKILL."""
    drop_caches("torch, transformers, vllm, gcupipe.cli")
    started = time.perf_counter()
    out = log.open("w") if log is not None else subprocess.DEVNULL
    process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    monitor = TreeMonitor(process.pid)
    while process.poll() is None:
        if kill_when is not None and kill_when():
            for child in psutil.Process(process.pid).children(recursive=True):
                child.kill()
            process.send_signal(signal.SIGKILL)
        time.sleep(0.2)
    figures = monitor.stop()
    figures.update({"wall_s": time.perf_counter() - started, "returncode": process.returncode})
    synced = time.perf_counter()
    os.sync()  # what the job left in the page cache is part of its writing
    figures["sync_s"] = time.perf_counter() - synced
    return figures
