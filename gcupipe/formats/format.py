"""What an output format is to gcupipe: one `Format` per layout, holding everything about it.

A format module (formats/modelslim.py, gcu.py, compressed_tensors.py, or a plugin's) defines a
subclass and registers an instance in the `gcupipe.formats` entry-point group. Everything else
asks the descriptor, never the format's name: which directory is which (`detect`), how to write
and read it, which methods and settings it can hold (`problems`, at lint time), what vLLM's
`--quantization` its own target needs (`quantization_flag`; targets/ knows what each target's
loaders need beyond that), what `gcupipe inspect` says, and its structural rules (`rules`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from gcupipe.formats.base import FormatWriter, QuantizedCheckpoint, TensorSelector
    from gcupipe.formats.modeldir import ModelDir
    from gcupipe.formats.results import Rule
    from gcupipe.quant.scheme import ActivationScheme


@dataclass(frozen=True)
class Combination:
    """What the quantize stage asks a format to hold (checked by `Format.problems`)."""

    method: str
    bits: int
    group_size: int
    symmetric: bool
    activation: ActivationScheme
    kv_cache: bool
    float_linears: tuple[str, ...] = ()  # decoder linears kept in float (when the model is known)


@dataclass(frozen=True)
class QuantizationFlag:
    """vLLM's `--quantization` for a directory: the value to pass on the layout's own target
    (None: leave it unset), every value that also loads it, and what the files are, in words."""

    value: str | None
    accepted: frozenset[str | None]
    what: str


@dataclass
class Description:
    """What `gcupipe inspect` reports about a directory beyond its files."""

    method: str
    group_size: int = 0
    layer_types: dict[str, str] = field(default_factory=dict)  # module prefix -> type
    kv_cache: str | None = None  # "int8" when KV-cache scales are present


class Format:
    """Base of the format descriptors; subclasses set the class attributes and implement the
    methods (the defaults suit a format that needs nothing special)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    writer_class: ClassVar[str | type[FormatWriter]] = ""
    """The writer, or "module:Class" to import it only when a model is written."""
    detect_order: ClassVar[int] = 100
    """Formats are asked in this order (then by name): one whose evidence is a file of its own
    goes before those that read config.json's quantization_config."""
    symmetric_activations: ClassVar[bool] = False
    """Static int8 activations must be symmetric (offset 0) in this layout."""
    native_target: ClassVar[str] = "gcu"
    """The target the layout is made for: the one that applies when a recipe names none."""
    targets: ClassVar[tuple[str, ...]] = ()
    """Targets that load this format besides those whose profile lists it (for a plugin's own
    format: the targets know only the built-in ones)."""
    required_files: ClassVar[tuple[tuple[str, str], ...]] = ()
    """(glob, how to fix) pairs: files a directory of this format must have besides config.json
    and weights."""

    def detect(self, md: ModelDir) -> bool:
        """Whether `md` is a directory of this format (formats claim disjoint evidence)."""
        raise NotImplementedError

    def writer(self) -> type[FormatWriter]:
        from gcupipe.plugins import import_target

        if not isinstance(self.writer_class, str):
            return self.writer_class
        cls: type[FormatWriter] = import_target(self.writer_class, "format", self.name)
        return cls

    def read(self, path: Path, select: TensorSelector | None = None) -> QuantizedCheckpoint:
        """The directory back in the shared representation (only the tensors `select` takes)."""
        raise NotImplementedError

    def problems(self, combo: Combination) -> list[tuple[str, str]]:
        """(config key, message) for each part of `combo` this format cannot hold, naming the
        loader that would reject it; empty when it can."""
        return []

    def quantization_flag(self, md: ModelDir) -> QuantizationFlag:
        """vLLM's `--quantization` for the directory on the layout's own target."""
        raise NotImplementedError

    def planned_quantization_flag(self, combo: Combination) -> QuantizationFlag | None:
        """The same, for what the writer will make of `combo` (lint time); None when only the
        written files can say."""
        return None

    def module_types(self, md: ModelDir) -> dict[str, str]:
        """Linear module prefix -> quant type (FLOAT for a float weight), from the headers."""
        return {}

    def describe(self, md: ModelDir) -> Description:
        raise NotImplementedError

    def rules(self) -> tuple[Rule, ...]:
        """This format's own structural rules, in the order a person would fix them."""
        return ()
