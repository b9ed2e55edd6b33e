"""Assemble a runnable torch model from a config, float tensors and quantized linears.

The model is the architecture's own transformers class (so norms, rotary embeddings, attention
and MoE routing are exactly upstream's), with every quantized linear swapped for a
`RuntimeLinear` and, for DeepSeek-V2 MoE layers, the fused expert tensors swapped for per-expert
quantized linears. Format readers provide the inputs; this module never parses a format.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gcupipe.errors import StageError, require

if TYPE_CHECKING:
    import torch

    from gcupipe.quant.scheme import KVCacheScale, QuantizedLinear

_EXPERT = re.compile(
    r"^(?P<experts>.+\.mlp\.experts)\.(?P<index>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)$"
)


def load_config(model_dir: Path | str) -> Any:
    """The transformers config of `model_dir`, without any quantization_config (the runtime does
    its own quantized math; transformers must not try to apply a quantizer)."""
    transformers = require("transformers", "quant")
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    raw.pop("quantization_config", None)
    if isinstance(raw.get("text_config"), dict):
        raw["text_config"].pop("quantization_config", None)
    model_type = raw.pop("model_type", None)
    if model_type is None:
        raise StageError(f"{model_dir}/config.json has no model_type")
    return transformers.AutoConfig.for_model(model_type, **raw)


def load_float_model(model_dir: Path | str, dtype: str = "float32") -> Any:
    """An unquantized checkpoint as its transformers model, in eval mode."""
    torch = require("torch", "quant")
    transformers = require("transformers", "quant")
    transformers.utils.logging.disable_progress_bar()  # a tqdm bar garbles logs and CI output
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=getattr(torch, dtype), attn_implementation="sdpa"
        )
    except Exception as exc:  # transformers raises many kinds for an unloadable directory
        raise StageError(f"cannot load the float model {model_dir}: {exc}".splitlines()[0]) from exc
    return model.eval()


def _fuse_float_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert float checkpoint tensors -> transformers' fused 3D expert parameters."""
    torch_ = require("torch", "quant")
    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    rest: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        match = _EXPERT.match(name.removesuffix(".weight")) if name.endswith(".weight") else None
        if match is None:
            rest[name] = tensor
            continue
        groups.setdefault(match["experts"], {}).setdefault(int(match["index"]), {})[
            match["proj"]
        ] = tensor
    for prefix, experts in groups.items():
        order = sorted(experts)
        rest[f"{prefix}.gate_up_proj"] = torch_.stack(
            [torch_.cat([experts[e]["gate_proj"], experts[e]["up_proj"]], dim=0) for e in order]
        )
        rest[f"{prefix}.down_proj"] = torch_.stack([experts[e]["down_proj"] for e in order])
    return rest


def _experts_class() -> type:
    torch_ = require("torch", "quant")

    class QuantizedExperts(torch_.nn.Module):  # type: ignore[name-defined,misc]
        """Per-expert quantized gate/up/down projections behind transformers' experts API
        (hidden_states, top_k_index, top_k_weights), as vLLM's fused-MoE kernels see them."""

        def __init__(self, gate: list[Any], up: list[Any], down: list[Any], act_fn: Any):
            super().__init__()
            self.num_experts = len(gate)
            self.gate_proj = torch_.nn.ModuleList(gate)
            self.up_proj = torch_.nn.ModuleList(up)
            self.down_proj = torch_.nn.ModuleList(down)
            self.act_fn = act_fn

        def forward(self, hidden_states: Any, top_k_index: Any, top_k_weights: Any) -> Any:
            out = torch_.zeros_like(hidden_states)
            for expert in range(self.num_experts):
                token_idx, slot = torch_.where(top_k_index == expert)
                if token_idx.numel() == 0:
                    continue
                x = hidden_states[token_idx]
                h = self.act_fn(self.gate_proj[expert](x)) * self.up_proj[expert](x)
                h = self.down_proj[expert](h) * top_k_weights[token_idx, slot, None]
                out.index_add_(0, token_idx, h.to(out.dtype))
            return out

    return QuantizedExperts


def build_model(
    config: Any,
    float_tensors: Mapping[str, torch.Tensor],
    linears: Mapping[str, QuantizedLinear],
    kv_scales: Sequence[KVCacheScale] = (),
    *,
    dtype: str = "float32",
    linear_factory: Callable[[QuantizedLinear, str], Any] | None = None,
) -> Any:
    """A transformers model of `config` whose quantized linears (keyed by module prefix, e.g.
    `model.layers.0.self_attn.q_proj`) run through `linear_factory` (default RuntimeLinear).

    Raises StageError naming the tensors the checkpoint lacks, the runtime's form of the
    serving-time KeyError."""
    torch = require("torch", "quant")
    transformers = require("transformers", "quant")
    from gcupipe.runtime.linear import RuntimeLinear

    factory = linear_factory or (lambda layer, name: RuntimeLinear(layer, name))
    from transformers.initialization import no_init_weights

    config = copy.deepcopy(config)  # the attention choice below is stored on the config
    with no_init_weights():
        model = transformers.AutoModelForCausalLM.from_config(
            config, dtype=getattr(torch, dtype), attn_implementation="sdpa"
        )
    model.eval()
    expert_linears = {p: q for p, q in linears.items() if _EXPERT.match(p)}
    plain_linears = {p: q for p, q in linears.items() if p not in expert_linears}
    state = _fuse_float_experts(
        {
            n: t.to(getattr(torch, dtype)) if t.is_floating_point() else t
            for n, t in float_tensors.items()
        }
    )
    missing, unexpected = model.load_state_dict(state, strict=False)
    covered = {f"{p}.weight" for p in plain_linears} | {f"{p}.bias" for p in plain_linears}
    covered |= {
        f"{m['experts']}.{part}"
        for p in expert_linears
        if (m := _EXPERT.match(p))
        for part in ("gate_up_proj", "down_proj")
    }
    if getattr(config, "tie_word_embeddings", False):
        covered.add("lm_head.weight")
    really_missing = sorted(set(missing) - covered)
    if really_missing:
        raise StageError(
            f"the checkpoint lacks {len(really_missing)} tensor(s) the model needs, e.g. "
            f"{really_missing[0]} (a serving engine fails with KeyError on these)"
        )
    if unexpected:
        raise StageError(
            f"the checkpoint has {len(unexpected)} tensor(s) the model does not "
            f"use, e.g. {sorted(unexpected)[0]}"
        )
    for prefix, layer in plain_linears.items():
        bias = float_tensors.get(f"{prefix}.bias")
        if layer.bias is None and bias is not None:  # formats may keep the bias as a FLOAT tensor
            layer = dataclasses.replace(layer, bias=bias.float())
        try:
            model.get_submodule(prefix)
        except AttributeError as exc:
            raise StageError(f"quantized layer {prefix} is not a module of this model") from exc
        model.set_submodule(prefix, factory(layer, prefix))
    _install_experts(model, expert_linears, factory)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    if kv_scales:
        from gcupipe.runtime.kv_cache import install_int8_kv

        install_int8_kv(
            model,
            {s.layer_index: (s.k_scale, s.k_offset, s.v_scale, s.v_offset) for s in kv_scales},
        )
    return model


def _install_experts(
    model: Any,
    expert_linears: Mapping[str, QuantizedLinear],
    factory: Callable[[QuantizedLinear, str], Any],
) -> None:
    groups: dict[str, dict[str, dict[int, Any]]] = {}
    for prefix, layer in expert_linears.items():
        match = _EXPERT.match(prefix)
        assert match is not None
        groups.setdefault(match["experts"], {}).setdefault(match["proj"], {})[
            int(match["index"])
        ] = factory(layer, prefix)
    experts_cls = _experts_class()
    for experts_prefix, parts in groups.items():
        original = model.get_submodule(experts_prefix)
        count = original.num_experts
        for proj in ("gate_proj", "up_proj", "down_proj"):
            have = parts.get(proj, {})
            if sorted(have) != list(range(count)):
                absent = sorted(set(range(count)) - set(have))
                raise StageError(
                    f"{experts_prefix}: {proj} of experts {absent} are not "
                    f"quantized while others are (every expert must share one type)"
                )
        model.set_submodule(
            experts_prefix,
            experts_cls(
                [parts["gate_proj"][e] for e in range(count)],
                [parts["up_proj"][e] for e in range(count)],
                [parts["down_proj"][e] for e in range(count)],
                original.act_fn,
            ),
        )
