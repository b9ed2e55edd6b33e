"""Which accelerator vLLM will run on here (GCU, Ascend, CUDA or CPU) and the environment each
needs."""

from __future__ import annotations

import importlib.util
import os
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
    if len(str(tmp_dir.resolve())) > MAX_SOCKET_DIR_CHARS:
        # vLLM puts IPC sockets in TMPDIR and a socket path must fit in 107 bytes: a short
        # directory of this child's own, which `release_tmp` removes once the child is gone
        tmp_dir = Path(tempfile.mkdtemp(prefix=SHORT_TMP_PREFIX))
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


def release_tmp(env: dict[str, str]) -> None:
    """Remove the short TMPDIR `platform_env` made outside the run for a child that has ended
    (torch leaves ~150 MB of precompiled headers there); a TMPDIR in the run dir stays."""
    import shutil

    tmp_dir = Path(env.get("TMPDIR", ""))
    if tmp_dir.name.startswith(SHORT_TMP_PREFIX) and tmp_dir.parent == Path(tempfile.gettempdir()):
        shutil.rmtree(tmp_dir, ignore_errors=True)
