"""A vLLM server as a child process: start in its own process group, wait healthy, stop cleanly.

The server runs in a new session so SIGTERM/SIGKILL reach every process vLLM spawned (engine
core, workers) and nothing outlives the stage unless `keep_alive` asks for it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from gcupipe.errors import StageError
from gcupipe.serving.platform import child_tmp, claim_tmp, release_tmp

LOG_TAIL_LINES = 15

_DIAGNOSES: list[tuple[re.Pattern[str], str]] = [
    (
        re.compile(
            r"out of memory|OutOfMemoryError|Cannot allocate memory|"
            r"insufficient memory|not enough memory|KV cache.*(larger|exceed)",
            re.I,
        ),
        "out of memory: lower max_model_len or kv_cache_space_gib, or use a bigger machine",
    ),
    (
        re.compile(
            r"Invalid quantization method|Unknown quantization|quantization method .* not"
            r" supported",
            re.I,
        ),
        "unknown quantization: the vLLM here does not know this --quantization "
        "(for 'gcu', install gcupipe into the server's Python so its vLLM plugin loads)",
    ),
    (
        re.compile(r"address already in use|Errno 98", re.I),
        "port busy: another process listens there; leave `port` unset to get a free one",
    ),
    (re.compile(r"gcu quantization: .*"), ""),  # the plugin's own message says it all
]


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def ensure_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise StageError(
                f"port {port} on {host} is busy ({exc.strerror}): stop what listens there or "
                "leave `port` unset to get a free one"
            ) from exc


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def diagnose(log_text: str) -> str | None:
    """The most likely cause of a failed start, from the server log."""
    for pattern, message in _DIAGNOSES:
        match = pattern.search(log_text)
        if match:
            return message or match.group(0)
    return None


def failure(what: str, log_path: Path) -> StageError:
    """One clear line (what + likely cause) followed by the tail of the log."""
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    cause = diagnose(text)
    line = what + (f": {cause}" if cause else "") + f" (log: {log_path})"
    tail = log_tail(log_path)
    return StageError(line + ("\n--- last lines of the log ---\n" + tail if tail else ""))


def stop_with_parent() -> None:
    """In a child before exec: the kernel sends it SIGTERM when gcupipe's process dies (Linux
    PR_SET_PDEATHSIG); vLLM stops its engine processes on SIGTERM. A no-op elsewhere."""
    import ctypes
    import sys

    if sys.platform != "linux":
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


class ServerProcess:
    """One running server; `stop` is safe to call more than once."""

    def __init__(
        self,
        command: list[str],
        env: dict[str, str],
        log_path: Path,
        cwd: Path,
        outlive: bool = False,
    ):
        """`outlive`: the server may outlive gcupipe (keep_alive); otherwise it is told to stop
        (SIGTERM) if gcupipe dies, even by SIGKILL, so no server is orphaned."""
        self.command = command
        self.env = child_tmp(env)
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            command,
            env=self.env,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # own process group: one killpg reaches every child
            preexec_fn=None if outlive else stop_with_parent,
        )
        claim_tmp(self.env, self.process.pid)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_healthy(
        self,
        base_url: str,
        timeout_s: float,
        poll_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Poll /health until it answers 200; fail early if the process exits."""
        deadline = clock() + timeout_s
        while True:
            code = self.process.poll()
            if code is not None:
                what = f"the vLLM server exited with code {code} during start"
                raise failure(what, self.log_path)
            try:
                with urllib.request.urlopen(base_url + "/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if clock() >= deadline:
                what = f"the vLLM server was not healthy after {timeout_s:g} s"
                raise failure(what, self.log_path)
            time.sleep(poll_s)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the whole process group, SIGKILL whatever is left after `grace_s`."""
        try:
            if self.process.poll() is None:
                _signal_group(self.process.pid, signal.SIGTERM)
                try:
                    self.process.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    _signal_group(self.process.pid, signal.SIGKILL)
                    self.process.wait(timeout=grace_s)
            # workers may outlive the leader for a moment: clear the group either way, and
            # return only once the kill has landed (SIGKILL is delivered asynchronously)
            _signal_group(self.process.pid, signal.SIGKILL)
            _wait_group_gone(self.process.pid, timeout_s=2.0)
        finally:
            self._log.close()
            release_tmp(self.env)

    def detach(self) -> None:
        """Leave the server running (keep_alive): only our handle on its log is closed."""
        self._log.close()


def _wait_group_gone(pgid: int, timeout_s: float) -> None:
    """Wait until no process of the group is left (unreaped zombies of another parent can keep
    it alive in name only: give up after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.02)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_group(pgid: int) -> None:
    """Kill a server left running (keep_alive) with every process of its group."""
    _signal_group(pgid, signal.SIGKILL)
    _wait_group_gone(pgid, timeout_s=2.0)
