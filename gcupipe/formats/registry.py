"""Format name -> writer, and a reader that recognises any of the three layouts."""

from __future__ import annotations

import importlib
from pathlib import Path

from gcupipe.errors import StageError
from gcupipe.formats.base import FormatWriter, QuantizedCheckpoint, TensorSelector

WRITERS: dict[str, str] = {
    "modelslim": "gcupipe.formats.modelslim:ModelslimWriter",
    "gcu": "gcupipe.formats.gcu:GcuWriter",
    "compressed-tensors": "gcupipe.formats.compressed_tensors:CompressedTensorsWriter",
}
# (detector, reader) in the order they are tried
READERS: list[tuple[str, str]] = [
    ("gcupipe.formats.modelslim:is_modelslim", "gcupipe.formats.modelslim:read_modelslim"),
    (
        "gcupipe.formats.compressed_tensors:is_compressed_tensors",
        "gcupipe.formats.compressed_tensors:read_compressed_tensors",
    ),
    ("gcupipe.formats.gcu:is_gcu", "gcupipe.formats.gcu:read_gcu"),
]


def _load(target: str) -> object:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def writer_for(name: str) -> type[FormatWriter]:
    if name not in WRITERS:
        raise StageError(f"unknown format {name!r}; known: {', '.join(WRITERS)}")
    return _load(WRITERS[name])  # type: ignore[return-value]


def detect_format(path: Path) -> str | None:
    for detector, _reader in READERS:
        if _load(detector)(path):  # type: ignore[operator]
            return detector.split(":")[0].rsplit(".", 1)[1].replace("_", "-")
    return None


def read_quantized(path: Path | str, select: TensorSelector | None = None) -> QuantizedCheckpoint:
    """Read any gcupipe output format back into the shared representation; with `select`,
    only the tensors whose names it accepts (select whole module prefixes, e.g. one decoder
    layer: a quantized linear needs all its tensors)."""
    path = Path(path)
    for detector, reader in READERS:
        if _load(detector)(path):  # type: ignore[operator]
            return _load(reader)(path, select)  # type: ignore[operator,no-any-return]
    raise StageError(
        f"{path} is not a quantized model directory gcupipe recognises "
        "(modelslim, gcu, compressed-tensors)"
    )
