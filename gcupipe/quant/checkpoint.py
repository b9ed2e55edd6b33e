"""Lazy reads of a safetensors checkpoint (one file or sharded with an index), layer by layer,
with the next layer read ahead from disk while the current one is worked on."""

from __future__ import annotations

import json
import re
import struct
import threading
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gcupipe.errors import StageError

if TYPE_CHECKING:
    import torch

_LAYER = re.compile(r"^(?P<prefix>.*?layers)\.(?P<index>\d+)\.(?P<rest>.+)$")


def load_raw_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise StageError(f"{model_dir} has no config.json: is it a model directory?")
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def load_config(model_dir: Path) -> Any:
    """transformers config without quantization_config (the source may carry one)."""
    from transformers import AutoConfig

    raw = load_raw_config(model_dir)
    raw.pop("quantization_config", None)
    model_type = raw.pop("model_type", None)
    if model_type is None:
        raise StageError(f"{model_dir}/config.json has no model_type")
    return AutoConfig.for_model(model_type, **raw)


class CheckpointReader:
    """Tensor names and lazy tensor reads; file handles are opened per read batch and closed by
    `release()`, so memory-mapped pages of finished layers do not accumulate."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(model_dir.glob("*.safetensors"))
            if not files:
                raise StageError(f"{model_dir} has no .safetensors files")
            from safetensors import safe_open

            weight_map = {}
            for file in files:
                with safe_open(str(file), "pt") as handle:
                    for name in handle.keys():
                        weight_map[name] = file.name
        self.weight_map: dict[str, str] = dict(weight_map)
        self._handles: dict[str, Any] = {}
        self._ranges: dict[str, dict[str, tuple[int, int]]] = {}  # file -> name -> bytes
        self._read_ahead: threading.Thread | None = None
        self.layers: dict[int, list[str]] = defaultdict(list)
        self.globals: list[str] = []
        for name in self.weight_map:
            match = _LAYER.match(name)
            if match and match["prefix"] == "model.layers":
                self.layers[int(match["index"])].append(name)
            else:
                self.globals.append(name)

    @property
    def num_layers(self) -> int:
        return max(self.layers) + 1 if self.layers else 0

    def files(self) -> list[Path]:
        return sorted({self.model_dir / f for f in self.weight_map.values()})

    def tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self.weight_map[name]
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.model_dir / file), "pt")
        # A view of the memory-mapped file: tensors that outlive their layer (floats waiting in
        # an output shard) must be cloned by the caller, or they pin the whole input file.
        return self._handles[file].get_tensor(name)  # type: ignore[no-any-return]

    def release(self) -> None:
        self._handles.clear()

    def read_ahead(self, names: list[str]) -> None:
        """Start reading these tensors' bytes from disk in a background thread (into the page
        cache, no memory of this process), so that the disk works while the CPU quantizes the
        layer before; `tensor()` then reads them from memory. One read-ahead at a time."""
        if self._read_ahead is not None:
            self._read_ahead.join()
        ranges = []
        for name in names:
            file = self.weight_map[name]
            if file not in self._ranges:
                self._ranges[file] = _data_ranges(self.model_dir / file)
            start, end = self._ranges[file][name]
            ranges.append((self.model_dir / file, start, end))
        self._read_ahead = threading.Thread(target=_read_ranges, args=(ranges,), daemon=True)
        self._read_ahead.start()


def _data_ranges(path: Path) -> dict[str, tuple[int, int]]:
    """Tensor name -> (first byte, end) in a safetensors file: the 8-byte little-endian header
    length, the JSON header, then the data at the header's offsets."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    base = 8 + length
    return {
        name: (base + entry["data_offsets"][0], base + entry["data_offsets"][1])
        for name, entry in header.items()
    }


def _read_ranges(ranges: list[tuple[Path, int, int]]) -> None:
    buffer = memoryview(bytearray(8 << 20))
    for path, start, end in ranges:
        with path.open("rb", buffering=0) as handle:
            handle.seek(start)
            while start < end:
                got = handle.readinto(buffer[: min(len(buffer), end - start)])
                if not got:
                    break
                start += got


def layer_relative(name: str) -> tuple[int, str] | None:
    """`model.layers.3.mlp.up_proj.weight` -> (3, 'mlp.up_proj.weight')."""
    match = _LAYER.match(name)
    if not match or match["prefix"] != "model.layers":
        return None
    return int(match["index"]), match["rest"]
