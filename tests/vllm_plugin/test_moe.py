"""The plugin's fused-MoE method outside a running engine: its expert math against the reference
runtime, and its refusal of expert types vLLM's MoE path cannot serve."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from types import SimpleNamespace  # noqa: E402

from gcupipe.quant.methods import LayerSpec  # noqa: E402
from gcupipe.quant.packing import pack_int4_modelslim  # noqa: E402
from gcupipe.quant.rtn import rtn_linear  # noqa: E402
from gcupipe.quant.scheme import ActivationScheme  # noqa: E402
from gcupipe.runtime.linear import RuntimeLinear  # noqa: E402
from gcupipe.vllm_plugin.description import DescriptionError  # noqa: E402
from gcupipe.vllm_plugin.moe import GcuFusedMoEMethod  # noqa: E402

EXPERTS, HIDDEN, INTER, TOP_K = 4, 64, 32, 2
SPECS = {
    "W8A8_DYNAMIC": LayerSpec(bits=8, activation=ActivationScheme.DYNAMIC),
    "W8A16": LayerSpec(bits=8, group_size=16, symmetric=False),
    "W4A16": LayerSpec(bits=4, group_size=16, symmetric=False),
}


def _experts(quant_type: str):  # type: ignore[no-untyped-def]
    """Random experts quantized by the quantizer (per expert: gate, up, down), and a layer
    holding them stacked as vLLM's weight loader leaves them."""
    generator = torch.Generator().manual_seed(1)
    spec = SPECS[quant_type]
    experts = []
    for _ in range(EXPERTS):
        gate, up = (torch.randn(INTER, HIDDEN, generator=generator) * 0.2 for _ in range(2))
        down = torch.randn(HIDDEN, INTER, generator=generator) * 0.2
        experts.append([rtn_linear(w, None, spec) for w in (gate, up, down)])
    pack = pack_int4_modelslim if quant_type == "W4A16" else (lambda q: q)

    def stack(parts, leaf):  # type: ignore[no-untyped-def]
        tensors = [torch.cat([getattr(q, leaf) for q in p]) for p in parts]
        return torch.stack([pack(t) if leaf == "weight" else t.float() for t in tensors])

    layer = SimpleNamespace(expert_map=None, apply_router_weight_on_input=False)
    for stem, parts in (("w13", [e[:2] for e in experts]), ("w2", [e[2:] for e in experts])):
        for leaf in ("weight", "weight_scale", "weight_offset"):
            setattr(layer, f"{stem}_{leaf}", stack(parts, leaf))
    return experts, layer


@pytest.mark.parametrize("quant_type", list(SPECS))
def test_quantized_experts_compute_what_the_runtime_computes(quant_type: str) -> None:
    """Each token's output is the router-weighted sum of its experts, each expert the reference
    runtime's linears (int8 GEMMs of per-token int8 inputs for W8A8_DYNAMIC, down_proj
    included); the weights stay integer in memory."""
    experts, layer = _experts(quant_type)
    method = GcuFusedMoEMethod(None, quant_type, SPECS[quant_type].group_size, "mlp.experts")
    method.process_weights_after_loading(layer)
    assert layer.w13_weight.dtype == layer.w2_weight.dtype == torch.int8
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(7, HIDDEN, generator=generator)
    topk_ids = torch.tensor([[0, 1], [1, 0], [2, 3], [3, 1], [0, 2], [1, 2], [3, 0]])
    topk_weights = torch.rand(7, TOP_K, generator=generator)
    got = method.apply(layer, x, topk_weights, topk_ids, None, None)

    expected = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(TOP_K):
            gate, up, down = (RuntimeLinear(q) for q in experts[int(topk_ids[t, slot])])
            row = x[t : t + 1]
            y = down(torch.nn.functional.silu(gate(row)) * up(row))
            expected[t] += topk_weights[t, slot] * y[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # and the experts matter: a wrong routing gives a different output
    wrong = method.apply(layer, x, topk_weights, topk_ids.flip(0), None, None)
    assert (wrong - expected).abs().max() > 1e-2


def test_static_w8a8_experts_are_refused_with_the_reason() -> None:
    with pytest.raises(DescriptionError, match=r"model\.layers\.1\.mlp\.experts.*W8A8.*input"):
        GcuFusedMoEMethod(None, "W8A8", 0, "model.layers.1.mlp.experts")
