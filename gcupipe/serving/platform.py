"""Which accelerator vLLM will run on here (GCU, Ascend, CUDA or CPU) and the environment each
needs."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

from gcupipe.platform import Platform

MAX_SOCKET_DIR_CHARS = 60
SHORT_TMP_PREFIX = "gcupipe-vllm-"


def detect_platform() -> Platform:
    """GCU or Ascend when that vLLM plugin is importable, CUDA when torch sees a GPU, else CPU.

    `GCUPIPE_PLATFORM` overrides the detection (CI machines that only plan, tests)."""
    forced = os.environ.get("GCUPIPE_PLATFORM")
    if forced:
        return Platform(forced.lower())
    if importlib.util.find_spec("vllm_gcu") is not None:
        return Platform.GCU
    if importlib.util.find_spec("vllm_ascend") is not None:
        return Platform.ASCEND
    torch = sys.modules.get("torch")
    if torch is not None:  # already imported: ask it
        return Platform.CUDA if torch.cuda.is_available() else Platform.CPU
    # `gcupipe plan` must stay light: the NVIDIA driver's device files say it without torch
    if Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/version").exists():
        return Platform.CUDA
    return Platform.CPU


def platform_env(platform: Platform, run_dir: Path, kv_cache_space_gib: int) -> dict[str, str]:
    """Environment for a vLLM child process: keeps caches, sockets and temp files in the run.

    On CPU, vLLM sees only its NUMA node's memory and its default KV-cache fraction fails to
    start, so the KV cache gets an explicit size; the in-process engine starts twice as fast."""
    cache_root = run_dir / "vllm-cache"
    tmp_dir = run_dir / "tmp"
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    env = {
        "VLLM_CACHE_ROOT": str(cache_root),
        "TMPDIR": str(tmp_dir),
        # torch's compile cache would land in TMPDIR, which may be outside the run dir
        "TORCHINDUCTOR_CACHE_DIR": str(cache_root / "torchinductor"),
    }
    if platform is Platform.CPU:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_space_gib)
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


# vLLM puts IPC sockets in TMPDIR and a socket path must fit in 107 bytes: a child whose run
# directory is longer gets a short TMPDIR of its own in the system's, made just before it starts
# (`child_tmp`), marked with the child's pid (`claim_tmp`) and removed once it is gone
# (`release_tmp`). One left by a gcupipe killed outright is swept by the next child's
# `child_tmp` once neither its maker nor its child is alive (torch leaves ~150 MB there).
_OWNER_FILE = ".gcupipe-owner"


def child_tmp(env: dict[str, str]) -> dict[str, str]:
    """`env` with a TMPDIR short enough for vLLM's sockets."""
    tmp_dir = Path(env.get("TMPDIR") or tempfile.gettempdir())
    if len(str(tmp_dir.resolve())) <= MAX_SOCKET_DIR_CHARS:
        return env
    _sweep_short_tmp()
    short = tempfile.mkdtemp(prefix=f"{SHORT_TMP_PREFIX}{os.getpid()}-")
    return {**env, "TMPDIR": short}


def claim_tmp(env: dict[str, str], child_pid: int) -> None:
    """Record the child that uses a short TMPDIR (a keep_alive server outlives its maker)."""
    tmp_dir = Path(env.get("TMPDIR", ""))
    if _is_short_tmp(tmp_dir):
        (tmp_dir / _OWNER_FILE).write_text(str(child_pid))


def release_tmp(env: dict[str, str]) -> None:
    """Remove the short TMPDIR `child_tmp` made for a child that has ended; a TMPDIR in the
    run dir stays."""
    tmp_dir = Path(env.get("TMPDIR", ""))
    if _is_short_tmp(tmp_dir):
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _is_short_tmp(path: Path) -> bool:
    return path.name.startswith(SHORT_TMP_PREFIX) and path.parent == Path(tempfile.gettempdir())


def _sweep_short_tmp() -> None:
    for path in Path(tempfile.gettempdir()).glob(f"{SHORT_TMP_PREFIX}*"):
        maker = path.name[len(SHORT_TMP_PREFIX) :].split("-")[0]
        try:
            child = (path / _OWNER_FILE).read_text().strip()
        except OSError:
            child = ""
        pids = [int(pid) for pid in (maker, child) if pid.isdigit()]
        if pids and not any(_alive(pid) for pid in pids):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
