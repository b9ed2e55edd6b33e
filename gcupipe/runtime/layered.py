"""Perplexity of a model that does not fit in memory: one decoder layer at a time.

Every evaluation window is embedded first; then each decoder layer is built from its own tensors
(quantized linears swapped for the runtime's target-kernel modules), run over all windows, and
dropped before the next is read. Peak memory is one layer plus the hidden states of the windows
(8k tokens x hidden 4096 x 4 bytes = 128 MB), so a model larger than RAM can still be scored.
The arithmetic is the same as the whole-model runtime's, so both give the same perplexity.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gcupipe.errors import StageError, require
from gcupipe.runtime.perplexity import PerplexityResult, WindowScorer

_LAYER = re.compile(r"^model\.layers\.(?P<index>\d+)\.(?P<rest>.+)$")

LayerProbe = Callable[[int, Any, list[Any]], None]
"""Called with (layer index, the built layer, its inputs: one [1, T, hidden] state per window)
before the layer runs: a caller can measure something else on the same activations."""


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

        tensors = {
            layer_relative(n)[1]: self.reader.tensor(n)  # type: ignore[index]
            for n in self.reader.layers[index]
        }
        self.reader.release()
        return tensors, {}, None


def _kv_by_layer(scales: Sequence[Any]) -> dict[int, tuple[float, float, float, float]]:
    return {s.layer_index: (s.k_scale, s.k_offset, s.v_scale, s.v_offset) for s in scales}


class _QuantizedSource:
    """A quantized checkpoint read through its format reader a part at a time: the tensors
    outside the decoder layers once, then each layer's own tensors when that layer is built."""

    def __init__(self, model_dir: Path):
        from gcupipe.formats.registry import read_quantized

        self.model_dir = model_dir
        layers: set[int] = set()

        def outside_layers(name: str) -> bool:
            match = _LAYER.match(name)
            if match:
                layers.add(int(match["index"]))
            return match is None

        checkpoint = read_quantized(model_dir, outside_layers)
        self.floats = checkpoint.float_tensors
        self.kv = _kv_by_layer(checkpoint.kv_scales)  # the gcu layout keeps them in a json
        self.num_layers = max(layers) + 1 if layers else 0

    def global_tensor(self, name: str) -> Any | None:
        return self.floats.get(name)

    def layer(self, index: int) -> tuple[dict[str, Any], dict[str, Any], Any]:
        from gcupipe.formats.registry import read_quantized

        prefix = f"model.layers.{index}."
        checkpoint = read_quantized(self.model_dir, lambda name: name.startswith(prefix))
        floats = {n[len(prefix) :]: t for n, t in checkpoint.float_tensors.items()}
        linears = {n[len(prefix) :]: q for n, q in checkpoint.linears.items()}
        kv = _kv_by_layer(checkpoint.kv_scales).get(index, self.kv.get(index))
        return floats, linears, kv


def _build(
    config: Any, index: int, floats: dict[str, Any], linears: dict[str, Any], kv: Any
) -> Any:
    torch = require("torch", "quant")
    from gcupipe.quant.layer_module import build_layer
    from gcupipe.runtime.kv_cache import attach_int8_kv
    from gcupipe.runtime.linear import RuntimeLinear

    tensors = dict(floats)
    has_bias = _linears_with_bias(config, index)
    for name, layer in linears.items():  # placeholders, replaced right below
        tensors[f"{name}.weight"] = torch.empty(
            layer.out_features, layer.in_features, device="meta"
        )
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
    from gcupipe.quant.layer_module import find_class, modeling_module

    with torch.device("meta"):
        skeleton = find_class(modeling_module(config), "DecoderLayer")(config, index)
    return {
        name
        for name, module in skeleton.named_modules()
        if isinstance(module, torch.nn.Linear) and module.bias is not None
    }


class ModelLayers:
    """A model directory (float or any gcupipe format) handed out one built decoder layer at a
    time, with what is needed to run one on hidden states."""

    def __init__(self, model_dir: Path | str):
        from gcupipe.runtime.load import detect
        from gcupipe.runtime.model import load_config

        self.model_dir = model_dir = Path(model_dir)
        self.config = load_config(model_dir)
        self.source: Any = (
            _FloatSource(model_dir) if detect(model_dir) == "float" else _QuantizedSource(model_dir)
        )
        self.num_layers: int = self.source.num_layers
        self._rotary: dict[int, Any] = {}

    def global_tensor(self, name: str) -> Any | None:
        return self.source.global_tensor(name)

    def required_tensor(self, name: str) -> Any:
        tensor = self.global_tensor(name)
        if tensor is None:
            raise StageError(f"{self.model_dir} has no tensor {name}: is it a complete model?")
        return tensor

    def build(self, index: int) -> Any:
        """Decoder layer `index`, read from the checkpoint now (nothing of it is kept here)."""
        return _build(self.config, index, *self.source.layer(index))

    def forward(self, layer: Any, hidden: Any) -> Any:
        """`layer` run on one window's [1, T, hidden] state at positions 0..T-1."""
        from gcupipe.quant.layer_module import rotary_embeddings

        length = hidden.shape[1]
        if length not in self._rotary:
            self._rotary[length] = rotary_embeddings(self.config, length)
        out = layer(hidden, attention_mask=None, position_embeddings=self._rotary[length])
        return out[0] if isinstance(out, tuple) else out


def layered_perplexity(
    model_dir: Path | str | ModelLayers,
    token_ids: Sequence[int],
    window: int = 512,
    stride: int = 512,
    on_layer: Callable[[int, int], None] | None = None,
    probe: LayerProbe | None = None,
) -> PerplexityResult:
    """Perplexity and per-position scores of `model_dir` (float or any gcupipe format) with the
    DATA.md convention, holding one decoder layer in memory at a time; `probe` sees each layer
    and its inputs first."""
    torch = require("torch", "quant")
    from gcupipe.quant.layer_module import find_class, modeling_module

    model = model_dir if isinstance(model_dir, ModelLayers) else ModelLayers(model_dir)
    config = model.config
    scorer = WindowScorer(token_ids, window, stride)
    embed = model.required_tensor("model.embed_tokens.weight").float()
    hidden = [
        torch.nn.functional.embedding(scorer.ids[b:e], embed).unsqueeze(0)
        for b, e, _ in scorer.spans
    ]
    with torch.inference_mode():
        for index in range(model.num_layers):
            layer = model.build(index)
            if probe is not None:
                probe(index, layer, hidden)
            hidden = [model.forward(layer, h) for h in hidden]
            del layer
            if on_layer is not None:
                on_layer(index, model.num_layers)
        norm = find_class(modeling_module(config), "RMSNorm")(
            config.hidden_size, eps=config.rms_norm_eps
        )
        norm.weight.data = model.required_tensor("model.norm.weight").float()
        head = model.global_tensor("lm_head.weight")
        head = embed if head is None else head.float()
        for span, h in zip(scorer.spans, hidden, strict=True):
            scorer.add(span, torch.nn.functional.linear(norm(h)[0], head))
    return scorer.result()
