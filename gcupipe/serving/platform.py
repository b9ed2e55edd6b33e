"""Which accelerator vLLM will run on here (GCU, CUDA or CPU) and the environment each needs."""

from __future__ import annotations

import enum
import importlib.util
import os
from pathlib import Path


class Platform(enum.StrEnum):
    GCU = "gcu"
    CUDA = "cuda"
    CPU = "cpu"


def detect_platform() -> Platform:
    """GCU when the vLLM-GCU plugin is importable, CUDA when torch sees a GPU, else CPU.

    `GCUPIPE_PLATFORM` overrides the detection (CI machines that only plan, tests)."""
    forced = os.environ.get("GCUPIPE_PLATFORM")
    if forced:
        return Platform(forced.lower())
    if importlib.util.find_spec("vllm_gcu") is not None:
        return Platform.GCU
    try:
        import torch

        if torch.cuda.is_available():
            return Platform.CUDA
    except ImportError:  # pragma: no cover - torch is a dependency of vLLM
        pass
    return Platform.CPU


def platform_env(platform: Platform, run_dir: Path, kv_cache_space_gib: int) -> dict[str, str]:
    """Environment for a vLLM child process: keeps caches, sockets and temp files in the run.

    On CPU, vLLM sees only its NUMA node's memory and its default KV-cache fraction fails to
    start, so the KV cache gets an explicit size; the in-process engine starts twice as fast."""
    cache_root = run_dir / "vllm-cache"
    tmp_dir = run_dir / "tmp"
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    env = {"VLLM_CACHE_ROOT": str(cache_root), "TMPDIR": str(tmp_dir)}
    if platform is Platform.CPU:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_space_gib)
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env
