"""The output formats: the `gcupipe.formats` entry-point group (built-ins register there too),
and the questions every caller asks of them: which format a directory is, read it back."""

from __future__ import annotations

from pathlib import Path

from gcupipe.errors import StageError
from gcupipe.formats.base import QuantizedCheckpoint, TensorSelector
from gcupipe.formats.format import Format
from gcupipe.formats.modeldir import ModelDir
from gcupipe.plugins import Registry

FORMATS: Registry[Format] = Registry(
    "gcupipe.formats", "format", lambda obj: isinstance(obj, Format), "known: {names}"
)


def format_of(md: ModelDir | Path) -> Format | None:
    """The format of a directory, or None for a plain (float) checkpoint."""
    md = md if isinstance(md, ModelDir) else ModelDir(Path(md))
    formats = sorted(
        (FORMATS.get(name) for name in FORMATS.names()), key=lambda f: (f.detect_order, f.name)
    )
    return next((fmt for fmt in formats if fmt.detect(md)), None)


def format_name(md: ModelDir | Path) -> str:
    fmt = format_of(md)
    return fmt.name if fmt is not None else "float"


def read_quantized(path: Path | str, select: TensorSelector | None = None) -> QuantizedCheckpoint:
    """Read any registered output format back into the shared representation; with `select`,
    only the tensors whose names it accepts (select whole module prefixes, e.g. one decoder
    layer: a quantized linear needs all its tensors)."""
    path = Path(path)
    fmt = format_of(path)
    if fmt is None:
        raise StageError(
            f"{path} is not a quantized model directory gcupipe recognises "
            f"({', '.join(FORMATS.names())})"
        )
    return fmt.read(path, select)
