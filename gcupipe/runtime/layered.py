"""Perplexity of a model that does not fit in memory: one decoder layer at a time.

Every evaluation window is embedded first; then each decoder layer is built from its own tensors
(quantized linears swapped for the runtime's target-kernel modules), run over all windows, and
dropped before the next is read. Peak memory is one layer plus the hidden states of the windows
(8k tokens x hidden 4096 x 4 bytes = 128 MB), so a model larger than RAM can still be scored.
The arithmetic is the same as the whole-model runtime's, so both give the same perplexity.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gcupipe.errors import require
from gcupipe.runtime.perplexity import PerplexityResult, windows

_LAYER = re.compile(r"^model\.layers\.(?P<index>\d+)\.(?P<rest>.+)$")


class _FloatSource:
    """Lazily read float checkpoint tensors (quant.checkpoint's reader)."""

    def __init__(self, model_dir: Path):
        from gcupipe.quant.checkpoint import CheckpointReader

        self.reader = CheckpointReader(model_dir)
        self.num_layers = self.reader.num_layers

    def global_tensor(self, name: str) -> Any | None:
        return self.reader.tensor(name) if name in self.reader.weight_map else None

    def layer(self, index: int) -> tuple[dict[str, Any], dict[str, Any], Any]:
        from gcupipe.quant.checkpoint import layer_relative

        tensors = {layer_relative(n)[1]: self.reader.tensor(n)  # type: ignore[index]
                   for n in self.reader.layers[index]}
        self.reader.release()
        return tensors, {}, None


class _QuantizedSource:
    """A quantized checkpoint read through its format reader, handed out layer by layer (each
    layer's tensors are dropped once used)."""

    def __init__(self, model_dir: Path):
        from gcupipe.formats.registry import read_quantized

        checkpoint = read_quantized(model_dir)
        self.floats = checkpoint.float_tensors
        self.linears = checkpoint.linears
        self.kv = {s.layer_index: (s.k_scale, s.k_offset, s.v_scale, s.v_offset)
                   for s in checkpoint.kv_scales}
        indices = [int(m["index"]) for n in list(self.floats) + list(self.linears)
                   if (m := _LAYER.match(n))]
        self.num_layers = max(indices) + 1 if indices else 0

    def global_tensor(self, name: str) -> Any | None:
        return self.floats.get(name)

    def layer(self, index: int) -> tuple[dict[str, Any], dict[str, Any], Any]:
        prefix = f"model.layers.{index}."
        floats = {n[len(prefix):]: self.floats.pop(n) for n in list(self.floats)
                  if n.startswith(prefix)}
        linears = {n[len(prefix):]: self.linears.pop(n) for n in list(self.linears)
                   if n.startswith(prefix)}
        return floats, linears, self.kv.get(index)


def _build(config: Any, index: int, floats: dict[str, Any], linears: dict[str, Any],
           kv: Any) -> Any:
    torch = require("torch", "quant")
    from gcupipe.quant.layer_module import build_layer
    from gcupipe.runtime.kv_cache import attach_int8_kv
    from gcupipe.runtime.linear import RuntimeLinear

    tensors = dict(floats)
    has_bias = _linears_with_bias(config, index)
    for name, layer in linears.items():  # placeholders, replaced right below
        tensors[f"{name}.weight"] = torch.empty(layer.out_features, layer.in_features,
                                                device="meta")
        if name in has_bias and f"{name}.bias" not in floats:
            tensors[f"{name}.bias"] = torch.empty(layer.out_features, device="meta")
    module = build_layer(config, index, tensors)
    for name, layer in linears.items():
        bias = floats.get(f"{name}.bias")
        if layer.bias is None and bias is not None:
            import dataclasses

            layer = dataclasses.replace(layer, bias=bias.float())
        module.set_submodule(name, RuntimeLinear(layer, f"model.layers.{index}.{name}"))
    if kv is not None and hasattr(module, "self_attn"):
        attach_int8_kv(module.self_attn, kv)
    return module


def _linears_with_bias(config: Any, index: int) -> set[str]:
    """Names of the layer's nn.Linear modules that carry a bias (a skeleton on the meta device:
    readers may hand a bias to every linear, e.g. one recovered from a static quant_bias)."""
    torch = require("torch", "quant")
    from gcupipe.quant.layer_module import _find_class, _modeling_module

    with torch.device("meta"):
        skeleton = _find_class(_modeling_module(config), "DecoderLayer")(config, index)
    return {name for name, module in skeleton.named_modules()
            if isinstance(module, torch.nn.Linear) and module.bias is not None}


def layered_perplexity(model_dir: Path | str, token_ids: Sequence[int], window: int = 512,
                       stride: int = 512, on_layer: Callable[[int, int], None] | None = None
                       ) -> PerplexityResult:
    """Perplexity of `model_dir` (float or any gcupipe format) with the DATA.md convention,
    holding one decoder layer in memory at a time."""
    torch = require("torch", "quant")
    from gcupipe.quant.layer_module import _find_class, _modeling_module, rotary_embeddings
    from gcupipe.runtime.load import detect
    from gcupipe.runtime.model import load_config

    model_dir = Path(model_dir)
    config = load_config(model_dir)
    source: Any = (_FloatSource(model_dir) if detect(model_dir) == "float"
                   else _QuantizedSource(model_dir))
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    spans = windows(len(ids), window, stride)
    started = time.perf_counter()
    embed = source.global_tensor("model.embed_tokens.weight").float()
    hidden = [torch.nn.functional.embedding(ids[b:e], embed).unsqueeze(0) for b, e, _ in spans]
    rotary = {n: rotary_embeddings(config, n) for n in {e - b for b, e, _ in spans}}
    with torch.inference_mode():
        for index in range(source.num_layers):
            layer = _build(config, index, *source.layer(index))
            hidden = [layer(h, attention_mask=None, position_embeddings=rotary[h.shape[1]])
                      for h in hidden]
            hidden = [h[0] if isinstance(h, tuple) else h for h in hidden]
            del layer
            if on_layer is not None:
                on_layer(index, source.num_layers)
        norm = _find_class(_modeling_module(config), "RMSNorm")(config.hidden_size,
                                                                eps=config.rms_norm_eps)
        norm.weight.data = source.global_tensor("model.norm.weight").float()
        head = source.global_tensor("lm_head.weight")
        head = embed if head is None else head.float()
        nll_sum, scored = 0.0, 0
        for (begin, end, first), h in zip(spans, hidden, strict=True):
            logits = torch.nn.functional.linear(norm(h)[0], head)
            log_probs = torch.log_softmax(logits[first - begin - 1 : end - begin - 1].float(), -1)
            nll_sum -= float(log_probs.gather(1, ids[first:end].unsqueeze(1)).sum())
            scored += end - first
    return PerplexityResult(math.exp(nll_sum / scored), nll_sum, scored, len(spans), window,
                            stride, time.perf_counter() - started)
