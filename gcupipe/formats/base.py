"""What every format shares: the writer/reader interface, sharded output, copied side files.

A writer receives, in checkpoint order, float tensors, `QuantizedLinear`s (by module prefix) and
KV-cache scales, and writes output shards as it goes (the streaming quantizer never holds more
than about one layer of output). A reader turns a directory back into a `QuantizedCheckpoint`,
the input of the reference runtime (runtime/model.py: build_model).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar

from gcupipe.checksums import remember_sha256
from gcupipe.formats.bundle import LICENSE_NAMES

if TYPE_CHECKING:
    import torch

    from gcupipe.quant.scheme import KVCacheScale, QuantizedLinear

# Files of a model directory that are neither weights nor config: tokenizer, remote code, etc.
SIDE_FILE_SUFFIXES = (".py", ".json", ".model", ".txt", ".tiktoken", ".jinja", ".md")
NOT_COPIED = {
    "config.json",
    "model.safetensors.index.json",
    "quantize_config.json",
    "quant_model_description.json",
    "int8_kv_cache.json",
    "recipe.yaml",
}


def copy_side_files(source_dir: Path, out_dir: Path) -> list[str]:
    """Copy tokenizer, generation config, remote-code and license files unchanged."""
    copied = []
    for path in sorted(source_dir.iterdir()):
        if not path.is_file() or path.name in NOT_COPIED or path.name.startswith("."):
            continue
        side_file = path.suffix in SIDE_FILE_SUFFIXES or path.name in LICENSE_NAMES
        if side_file and not path.name.endswith(".safetensors.index.json"):
            shutil.copy2(path, out_dir / path.name)
            copied.append(path.name)
    return copied


def strip_quantization_config(config: dict[str, Any]) -> dict[str, Any]:
    config = dict(config)
    config.pop("quantization_config", None)
    if isinstance(config.get("text_config"), dict):
        config["text_config"] = dict(config["text_config"])
        config["text_config"].pop("quantization_config", None)
    return config


_DTYPES = {  # torch dtype name -> (safetensors dtype, bytes per element)
    "float32": ("F32", 4),
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
    "float64": ("F64", 8),
    "int8": ("I8", 1),
    "uint8": ("U8", 1),
    "int16": ("I16", 2),
    "int32": ("I32", 4),
    "int64": ("I64", 8),
    "bool": ("BOOL", 1),
}


def safetensors_header(
    entries: Iterable[tuple[str, str, Sequence[int]]], metadata: dict[str, str] | None = None
) -> bytes:
    """The leading bytes of a safetensors file holding `entries` (name, torch dtype name, shape)
    in the given order: the 8-byte header length, then the JSON header padded to 8 bytes (the
    format aligns the data start). The data follows, tensor after tensor, in that order."""
    header: dict[str, Any] = {"__metadata__": metadata or {}}
    offset = 0
    for name, dtype, shape in entries:
        code, size = _DTYPES[dtype]
        for dim in shape:
            size *= dim
        header[name] = {
            "dtype": code,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded


def write_tensor_bytes(handle: BinaryIO, tensor: torch.Tensor, digest: Any = None) -> None:
    """Append one tensor's data to an open safetensors file, from its own memory (and to a
    running hashlib `digest`, when given)."""
    import torch

    if tensor.numel():
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        data = memoryview(flat.numpy())  # type: ignore[arg-type]
        handle.write(data)
        if digest is not None:
            digest.update(data)


def write_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file straight from the tensors' memory (the library's save_file
    builds a bytes copy of every tensor first, doubling a shard's memory), hashing it on the
    way out so the engine need not read it back (checksums.py)."""
    ordered = sorted(tensors.items())
    entries = [(n, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in ordered]
    digest = hashlib.sha256()
    with path.open("wb") as handle:
        header = safetensors_header(entries, metadata)
        handle.write(header)
        digest.update(header)
        for _name, tensor in ordered:
            write_tensor_bytes(handle, tensor, digest)
    remember_sha256(path, digest.hexdigest())


TensorSelector = Callable[[str], bool]
"""Which tensor names a reader returns (None: all); called once for every name in the files."""


def read_tensors(
    files: Iterable[Path], select: TensorSelector | None = None
) -> dict[str, torch.Tensor]:
    """The selected tensors of safetensors `files`, read one by one through `safe_open`: a
    reader asked for one decoder layer touches only that layer's bytes, so a checkpoint larger
    than memory can still be read a layer at a time."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():
                if select is None or select(name):
                    tensors[name] = handle.get_tensor(name)
    return tensors


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise): streaming frees a
    shard's worth of tensors at a time, and peak RSS is what the memory budget measures."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


class ShardWriter:
    """Writes safetensors shards of about `max_shard_bytes`, then names them
    `<stem>-0000i-of-0000N.safetensors` (or `<stem>.safetensors` for one) plus an index.

    Shards are written as numbered parts into `parts_dir` (default: `out_dir`) and moved into
    `out_dir` by `finish`; `state`/`restore` carry the written parts over to a resumed run.
    A part is written in a background thread while the caller goes on with the next layer (one
    part in flight: the next flush waits for it); `when_written` runs a callback once every
    part flushed so far is on disk."""

    def __init__(
        self,
        out_dir: Path,
        stem: str,
        index_name: str,
        max_shard_bytes: int = 2 << 30,
        always_numbered: bool = False,
        parts_dir: Path | None = None,
    ):
        self.always_numbered = always_numbered
        self.out_dir = out_dir
        self.parts_dir = parts_dir or out_dir
        self.stem = stem
        self.index_name = index_name
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.parts: list[tuple[str, list[str]]] = []  # (part file name, its tensor names)
        self.total_bytes = 0
        self.names: set[str] = set()
        self._lock = threading.Lock()
        self._writing: threading.Thread | None = None
        self._written = True  # the part in flight, if any, is on disk
        self._after: list[Callable[[], None]] = []  # to run when it is
        self._error: BaseException | None = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names:
            raise ValueError(f"tensor {name} written twice")
        tensor = tensor.detach()
        self.pending[name] = (tensor if tensor.device.type == "cpu" else tensor.cpu()).contiguous()
        size = tensor.numel() * tensor.element_size()
        self.pending_bytes += size
        self.total_bytes += size
        self.names.add(name)

    def maybe_flush(self) -> None:
        """Flush when the pending tensors fill a shard (call between layers)."""
        if self.pending_bytes >= self.max_shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        self.wait()
        part = f".part{len(self.parts):05d}.safetensors"
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        tensors, self.pending, self.pending_bytes = self.pending, {}, 0
        self.parts.append((part, list(tensors)))
        self._written, self._after = False, []
        self._writing = threading.Thread(target=self._write, args=(part, tensors), daemon=True)
        self._writing.start()

    def _write(self, part: str, tensors: dict[str, torch.Tensor]) -> None:
        try:
            write_safetensors(self.parts_dir / part, tensors, {"format": "pt"})
            del tensors
            _release_freed_memory()
            with self._lock:
                self._written = True
                callbacks, self._after = self._after, []
            for callback in callbacks:
                callback()
        except BaseException as exc:  # raised in the caller's thread by the next wait()
            self._error = exc

    def when_written(self, callback: Callable[[], None]) -> None:
        """Run `callback` once every part flushed so far is on disk (now, if it is)."""
        with self._lock:
            if not self._written:
                self._after.append(callback)
                return
        callback()

    def wait(self) -> None:
        """Until the part in flight is on disk; re-raises what its writing raised."""
        if self._writing is not None:
            self._writing.join()
            self._writing = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def state(self) -> dict[str, Any] | None:
        """The parts written so far, as JSON; None while tensors are still buffered."""
        if self.pending:
            return None
        return {"parts": self.parts, "total_bytes": self.total_bytes}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from `state`: its parts are in `parts_dir`; any later part is dropped."""
        self.parts = [(part, list(names)) for part, names in state["parts"]]
        self.total_bytes = int(state["total_bytes"])
        self.names = {name for _, names in self.parts for name in names}
        kept = {part for part, _ in self.parts}
        for path in self.parts_dir.glob(".part*.safetensors"):
            if path.name not in kept:
                path.unlink()

    def finish(self) -> list[str]:
        self.flush()
        self.wait()
        count = len(self.parts)
        weight_map: dict[str, str] = {}
        names = []
        for i, (part, tensor_names) in enumerate(self.parts):
            final = (
                f"{self.stem}.safetensors"
                if count == 1 and not self.always_numbered
                else f"{self.stem}-{i + 1:05d}-of-{count:05d}.safetensors"
            )
            os.replace(self.parts_dir / part, self.out_dir / final)
            names.append(final)
            weight_map.update({n: final for n in tensor_names})
        if count > 1 or self.always_numbered:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.out_dir / self.index_name).write_text(json.dumps(index, indent=2))
        return names


@dataclass
class QuantizedCheckpoint:
    """A quantized model directory read back: everything the reference runtime needs."""

    format: str
    method: str
    config: dict[str, Any]
    float_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    linears: dict[str, QuantizedLinear] = field(default_factory=dict)
    kv_scales: list[KVCacheScale] = field(default_factory=list)
    quantization: str | None = None  # vLLM --quantization value
    group_size: int = 0


@dataclass(frozen=True)
class WriteOptions:
    """What a serving target asks of a writer beyond the layout itself (targets/ decide)."""

    deq_scale_int64: bool = False
    """modelslim static W8A8: `deq_scale` as int64 holding the fp32 bits (vllm-ascend creates
    it so for float16 models, methods/w8a8_static.py) instead of float32."""


class FormatWriter:
    """Base of the format writers; see the module docstring for the call order.

    `parts_dir`: where shards wait until `finish` (the quantize stage's scratch, so a killed
    run's finished layers survive it). A writer that can resume implements `layout_state` and
    `restore_layout` for what it gathers besides the tensors (types seen, skip lists, ...)."""

    name: ClassVar[str] = ""
    shards: ShardWriter

    def __init__(
        self,
        out_dir: Path,
        source_dir: Path,
        source_config: dict[str, Any],
        method: str,
        max_shard_bytes: int = 2 << 30,
        options: WriteOptions | None = None,
        parts_dir: Path | None = None,
    ):
        self.out_dir = out_dir
        self.source_dir = source_dir
        self.source_config = source_config
        self.method = method
        self.max_shard_bytes = max_shard_bytes
        self.options = options or WriteOptions()
        self.parts_dir = parts_dir

    def add_float(self, name: str, tensor: torch.Tensor) -> None:
        raise NotImplementedError

    def add_linear(self, prefix: str, layer: QuantizedLinear) -> None:
        raise NotImplementedError

    def add_kv_cache(self, attn_prefix: str, scale: KVCacheScale, kv_channels: int) -> None:
        raise NotImplementedError

    def end_layer(self) -> None:
        """Called after each decoder layer: a chance to flush a full shard."""

    def state(self) -> dict[str, Any] | None:
        """Everything written so far, as JSON, when a resumed run can continue from here: all
        tensors are in parts (nothing buffered) and the layout can resume; else None."""
        layout = self.layout_state()
        shards = self.shards.state() if layout is not None else None
        return None if shards is None else {"shards": shards, "layout": layout}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from what `state` returned in an interrupted run."""
        self.shards.restore(state["shards"])
        self.restore_layout(state["layout"])

    def when_written(self, callback: Callable[[], None]) -> None:
        """Run `callback` once everything flushed so far is on disk."""
        self.shards.when_written(callback)

    def layout_state(self) -> dict[str, Any] | None:
        """What the layout gathered besides the tensors, as JSON (None: cannot resume)."""
        return None

    def restore_layout(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def finish(self, float_linears: Sequence[str] = ()) -> list[str]:
        """Write what is still buffered and the layout's JSON files; the weight file names.
        `float_linears`: the linear layers the quantizer kept in float (the stage's report), for
        layouts whose config lists them (a skip list)."""
        raise NotImplementedError
