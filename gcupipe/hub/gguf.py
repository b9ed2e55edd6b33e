"""Turn a `.gguf` file into a normal safetensors model directory through transformers."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from gcupipe.errors import StageError, require

_DTYPES = ("float32", "float16", "bfloat16")


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = "float32") -> None:
    """Dequantize `gguf_path` with transformers' GGUF reader and save it to `out_dir`.

    transformers marks a model loaded from GGUF as "quantized with gguf" and refuses to save it;
    the weights it holds are already plain floats, so dropping the quantizer and the
    `quantization_config` gives an ordinary checkpoint that reloads with identical logits.
    `out_dir` is written in one step (a sibling temp dir renamed into place), so a failed
    conversion never leaves a half-written model behind.
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    if dtype not in _DTYPES:
        raise StageError(f"gguf: dtype must be one of {', '.join(_DTYPES)}, not {dtype!r}")
    if not gguf_path.is_file():
        raise StageError(f"gguf: file not found: {gguf_path}")
    torch = require("torch", "quant")
    transformers = require("transformers", "quant")
    require("gguf", "quant")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    hf_logging = transformers.utils.logging
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its tqdm bars would garble gcupipe's own display
    try:
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent),
                gguf_file=gguf_path.name,
                dtype=getattr(torch, dtype),
            )
        except Exception as exc:  # transformers raises many kinds for an unreadable file
            raise StageError(
                f"gguf: transformers could not load {gguf_path.name}: {exc}".splitlines()[0]
            ) from exc
        model.hf_quantizer = None
        _drop_quantization_config(model.config)
        model.save_pretrained(str(staging), safe_serialization=True)
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name
            )
        except Exception:  # a GGUF without tokenizer metadata still gives a usable model
            tokenizer = None
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        staging.chmod(0o755)  # mkdtemp makes it private; a model directory is not a secret
        for path in staging.iterdir():
            path.chmod(0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _drop_quantization_config(config: object) -> None:
    """Remove `quantization_config` from a config and any nested sub-config (e.g. text_config)."""
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    for name in ("text_config", "language_config", "llm_config"):
        sub = getattr(config, name, None)
        if sub is not None and sub is not config:
            _drop_quantization_config(sub)
