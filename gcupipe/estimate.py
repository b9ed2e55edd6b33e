"""Preflight estimates (`gcupipe plan --estimate`): per stage, the disk it writes, its peak RSS
and a rough time, before anything runs.

Sizes come from safetensors headers (no tensor data is read) and, for a model that does not
exist yet, from the estimate of the stage that will make it (quantize turns the float model's
tensor list into the quantized one). Memory follows each stage's streaming design, stated where
each stage estimates itself; the constants below were measured here, and
benchmarks/preflight_accuracy.py checks the whole on SmolLM2 and on a 31 GB checkpoint of
DeepSeek-V2-Lite's shape. Times come from two figures this machine measures in about a second
(`Machine.probe`): float32 matmul rate and the write rate of the run directory's filesystem;
they are rough (within a factor of two or so), sizes are not.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from gcupipe.errors import StageError
from gcupipe.formats.modeldir import SAFETENSORS_DTYPE_BYTES, TensorInfo, read_safetensors_header

GB = 1e9
TORCH_PROCESS_BYTES = int(0.45 * GB)
"""RSS of a stage process before its own data: the imports alone (torch, transformers,
safetensors, gcupipe) are 0.26 GB here, and the allocator's slack and small buffers add the
rest; with it quantize came within 10% of the peak measured on SmolLM2 and DeepSeek-V2-Lite."""
VLLM_PROCESS_BYTES = int(2.6 * GB)
"""RSS of vLLM's CPU server and engine-core processes beyond the weights and the KV cache:
interpreters, torch, compiled graphs, the sampler's buffers (1.9 GB measured on SmolLM2, 3.2 GB
on DeepSeek-V2-Lite: the middle keeps both within 15%)."""
VLLM_START_S = 45.0
"""Seconds vLLM's CPU server takes to start before it reads weights (30-60 s measured here)."""


def numel(tensor: TensorInfo) -> int:
    return math.prod(tensor.shape)


def nbytes(tensor: TensorInfo) -> int:
    return numel(tensor) * SAFETENSORS_DTYPE_BYTES[tensor.dtype]


@dataclass(frozen=True)
class ModelShape:
    """A model directory as far as sizes go: its tensors and the bytes of its other files."""

    tensors: tuple[TensorInfo, ...]
    other_bytes: int
    raw_config: dict[str, Any] = field(default_factory=dict)
    source: ModelShape | None = None  # a quantized model's float source, where known

    @property
    def tensor_bytes(self) -> int:
        return sum(nbytes(t) for t in self.tensors)

    @property
    def total_bytes(self) -> int:
        return self.tensor_bytes + self.other_bytes

    @property
    def params(self) -> int:
        return sum(numel(t) for t in self.tensors)

    @cached_property
    def layers(self) -> dict[int, list[TensorInfo]]:
        """Decoder layer index -> its tensors (worked out once: the sizes below all use it)."""
        from gcupipe.quant.checkpoint import layer_relative

        found: dict[int, list[TensorInfo]] = {}
        for tensor in self.tensors:
            relative = layer_relative(tensor.name)
            if relative is not None:
                found.setdefault(relative[0], []).append(tensor)
        return found

    @property
    def largest_layer_bytes(self) -> int:
        return max((sum(nbytes(t) for t in ts) for ts in self.layers.values()), default=0)

    @property
    def largest_layer_params(self) -> int:
        return max((sum(numel(t) for t in ts) for ts in self.layers.values()), default=0)

    @property
    def global_params(self) -> int:
        """Parameters outside the decoder layers (embedding, final norm, lm_head)."""
        in_layers = sum(numel(t) for ts in self.layers.values() for t in ts)
        return self.params - in_layers

    @property
    def hidden_size(self) -> int:
        config = self.raw_config.get("text_config", self.raw_config)
        return int(config.get("hidden_size") or 0)

    @classmethod
    def read(cls, model_dir: Path) -> ModelShape:
        """The shape of an existing model directory, from its safetensors headers."""
        tensors: list[TensorInfo] = []
        other = 0
        for path in sorted(model_dir.iterdir()):
            if not path.is_file():
                continue
            if path.suffix == ".safetensors":
                infos, problem = read_safetensors_header(path)
                if problem is not None:
                    raise StageError(f"{model_dir}: {problem}")
                tensors += infos.values()
            else:
                other += path.stat().st_size
        if not tensors:
            raise StageError(f"{model_dir} has no .safetensors files to estimate from")
        raw: dict[str, Any] = {}
        if (model_dir / "config.json").is_file():
            raw = json.loads((model_dir / "config.json").read_text())
        return cls(tuple(tensors), other, raw)


def model_shape(path: Path | None, otherwise: ModelShape | None = None) -> ModelShape | None:
    """The shape of the model directory a stage's config names, when it exists yet; else
    `otherwise` (the upstream stage's estimate of the model it will make)."""
    if path is not None and (path / "config.json").is_file():
        return ModelShape.read(path)
    return otherwise


@dataclass(frozen=True)
class Machine:
    """What this machine offers, measured or read: memory, cores, and two rates for times."""

    memory_bytes: int
    cores: int
    flops: float  # float32 matmul, all threads
    write_bytes_per_s: float  # written and fsync'd on the run directory's filesystem

    @classmethod
    def nominal(cls) -> Machine:
        """Memory and cores read, rates assumed: for checks that need sizes, not times."""
        import psutil  # type: ignore[import-untyped]

        return cls(psutil.virtual_memory().total, os.cpu_count() or 1, 50e9, 200e6)

    @classmethod
    def probe(cls, run_dir: Path) -> Machine:
        """This machine, its two rates measured (about a second)."""
        import psutil
        import torch

        a = torch.randn(1024, 1024)
        torch.mm(a, a)  # warm the kernel up
        started = time.perf_counter()
        for _ in range(8):
            torch.mm(a, a)
        flops = 8 * 2 * 1024**3 / (time.perf_counter() - started)
        where = existing_ancestor(run_dir)
        probe = where / f".gcupipe-write-probe-{os.getpid()}"
        block = os.urandom(8 << 20)
        try:
            started = time.perf_counter()
            with probe.open("wb") as handle:
                for _ in range(8):
                    handle.write(block)
                handle.flush()
                os.fsync(handle.fileno())
            rate = 64 * (1 << 20) / (time.perf_counter() - started)
        except OSError:
            rate = 100e6  # a full or read-only filesystem: the space check reports it
        finally:
            probe.unlink(missing_ok=True)
        return cls(psutil.virtual_memory().total, os.cpu_count() or 1, flops, rate)

    def io_seconds(self, nbytes: int) -> float:
        return nbytes / self.write_bytes_per_s

    def compute_seconds(self, flops: float) -> float:
        return flops / self.flops


@dataclass(frozen=True)
class Estimate:
    """One stage's preflight figures; None where the stage cannot tell before it runs."""

    disk_bytes: int | None
    peak_rss_bytes: int | None
    seconds: float | None
    model: ModelShape | None = None  # the model the stage hands on (for the stages below)
    basis: str = ""  # how it was worked out, one phrase

    def line(self) -> str:
        def size(value: int | None) -> str:
            return format_bytes(value) if value is not None else "?"

        parts = [f"disk {size(self.disk_bytes)}", f"peak RSS {size(self.peak_rss_bytes)}"]
        parts.append(f"time ~{_duration(self.seconds)}" if self.seconds is not None else "time ?")
        return ", ".join(parts) + (f" ({self.basis})" if self.basis else "")


def format_bytes(value: float) -> str:
    return f"{value / GB:.2f} GB" if value >= 0.1 * GB else f"{value / 1e6:.1f} MB"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def existing_ancestor(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists (where a run directory will be made)."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(existing_ancestor(path)).free


def space_problem(run_dir: Path, needed: int) -> str | None:
    """A sentence when the run directory's filesystem has less free space than `needed`."""
    free = free_bytes(run_dir)
    if needed <= free:
        return None
    return (
        f"the run needs about {format_bytes(needed)} of disk and {existing_ancestor(run_dir)} "
        f"has {format_bytes(free)} free: free some space, or choose another --workdir"
    )


def disk_full_message(exc: OSError, where: Path, needed: int | None = None) -> str:
    """One line for a write that found the disk full: the path, what is free, what is needed."""
    path = Path(exc.filename) if exc.filename else where
    mount = existing_ancestor(path if path.is_absolute() else where)
    need = f"; it needs about {format_bytes(needed)}" if needed else ""
    return (
        f"no space left on the device writing {path} ({format_bytes(free_bytes(mount))} free "
        f"at {mount}{need}): free some space or choose another --workdir, then run again "
        "(`gcupipe plan --estimate` says what the run needs)"
    )
