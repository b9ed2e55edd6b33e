"""What a serving target is to gcupipe: the loaders of one vLLM build, written down as data.

A `Target` (gcu, ascend, cuda, cpu) says, for an output format, which method x format x model
combinations its loaders accept (`problems`, asked at lint time, each answer naming the loader
that would reject the artifact), what `--quantization` and KV-cache flags serve it, how the
quantizer must calibrate for it (symmetric activations or KV), and, for an artifact on disk, the
exact parameter set its quantization classes would create for every module (`expected`) and the
formula its kernels compute (`emulate`). Validate matches the files against `expected` tensor by
tensor and runs `emulate` on a few layers: the target's loader is the arbiter, not gcupipe's own
reader. The facts come from reading the loaders' sources (shared/TARGETS.md names them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

    from gcupipe.formats.base import WriteOptions
    from gcupipe.formats.format import Combination, Format, QuantizationFlag
    from gcupipe.formats.modeldir import ModelDir
    from gcupipe.formats.results import Rule


@dataclass(frozen=True)
class ModelFacts:
    """What a model's config.json says that loaders care about."""

    model_type: str
    moe: bool
    mla: bool  # DeepSeek's multi-head latent attention: the KV cache holds the latent
    tied_embeddings: bool
    dtype: str  # the checkpoint's torch_dtype: the params dtype vLLM builds with by default

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelFacts:
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        merged = {**(text or {}), **config}
        experts = merged.get("n_routed_experts") or merged.get("num_experts") or 0
        return cls(
            model_type=str(merged.get("model_type", "")),
            moe=bool(experts),
            mla=bool(merged.get("kv_lora_rank")),
            tied_embeddings=bool(merged.get("tie_word_embeddings", False)),
            dtype=str(merged.get("torch_dtype") or merged.get("dtype") or "bfloat16"),
        )


@dataclass(frozen=True)
class Expected:
    """One tensor a target's loader creates a parameter for (and so reads from the files)."""

    name: str
    dtypes: frozenset[str]  # safetensors codes the parameter takes (a cast is fine within them)
    shape: tuple[int, ...] | None  # None: any shape (the loader reshapes or broadcasts)
    loader: str  # the class and file that creates the parameter, for messages


Emulation = Callable[["torch.Tensor"], "torch.Tensor"]
"""x [tokens, k] -> the layer's output [tokens, n] as the target's kernel computes it."""


class Target:
    """Base of the target profiles; subclasses fill in the facts of their loaders."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    sources: ClassVar[str] = ""  # which loader sources the facts were read from
    formats: ClassVar[tuple[str, ...]] = ()  # the layouts its loaders read
    device_resource: ClassVar[str | None] = None  # the Ray resource of one of its accelerators

    def loads(self, fmt: Format) -> bool:
        return fmt.name in self.formats or self.name in fmt.targets

    def problems(
        self, fmt: Format, combo: Combination, facts: ModelFacts | None
    ) -> list[tuple[str, str]]:
        """(config key, message) for what this target's loaders reject; `facts` is None when
        the model's config is not at hand yet (then only model-independent checks run)."""
        if not self.loads(fmt):
            formats = " or ".join(self.formats)
            return [("format", f"{self.summary} loads {formats}, not the {fmt.name} layout")]
        if combo.kv_cache and facts is not None and facts.mla:
            return [
                (
                    "kv_cache",
                    "vLLM's MLA attention caches the compressed latent, not "
                    "per-head K and V: gcupipe calibrates no int8 scales for it; drop kv_cache",
                )
            ]
        return []

    def quantization(self, md: ModelDir, fmt: Format) -> QuantizationFlag:
        """vLLM's `--quantization` for a directory on this target (StageError when this target
        cannot load it at all)."""
        return self.flag(
            fmt, fmt.quantization_flag(md), ModelFacts.from_config(md.config or {}).moe
        )

    def planned_quantization(
        self, fmt: Format, combo: Combination, moe: bool
    ) -> QuantizationFlag | None:
        """The same for what quantize will write (lint time); None when only the files say."""
        base = fmt.planned_quantization_flag(combo)
        return None if base is None else self.flag(fmt, base, moe)

    def flag(self, fmt: Format, base: QuantizationFlag, moe: bool) -> QuantizationFlag:
        """The target's `--quantization` given the layout's own answer `base`: the same unless
        this target's loaders differ."""
        return base

    def kv_cache_dtype(self) -> str | None:
        """The `--kv-cache-dtype` an int8 KV cache is served with here (None: none exists)."""
        return None

    def static_activations_symmetric(self, fmt: str) -> bool:
        """Static int8 activations must be symmetric (no zero point) for this format here."""
        return False

    def kv_cache_symmetric(self, fmt: str, method: str) -> bool:
        """The int8 KV cache must be symmetric (its loader reads no zero point)."""
        return False

    def write_options(self, fmt: str, facts: ModelFacts) -> WriteOptions:
        """What the format writer must do differently for this target."""
        from gcupipe.formats.base import WriteOptions

        return WriteOptions()

    def expected(self, md: ModelDir, fmt: Format, facts: ModelFacts) -> list[Expected]:
        """Every tensor the target's quantization classes read for this directory's modules
        (the non-linear tensors are the architecture's and checked by weights-complete)."""
        return []

    def rules(self) -> tuple[Rule, ...]:
        """Rules of this target's loaders beyond the parameter set (description entries...)."""
        return ()

    def emulate(self, md: ModelDir, fmt: Format, prefix: str) -> Emulation | None:
        """The target's kernel for one quantized linear, from the raw tensors in the files
        (None: a layer this target leaves in float)."""
        return None
