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


def test_w8a8_dynamic_experts_round_their_inputs_to_int8() -> None:
    """In fp32 the expert output is the int8 GEMM of per-token int8 inputs, not a float GEMM of
    the float inputs over the same integer weights: the two differ by far more than the
    tolerance the math is checked at, so removing the input rounding would fail here."""
    experts, layer = _experts("W8A8_DYNAMIC")
    method = GcuFusedMoEMethod(None, "W8A8_DYNAMIC", 0, "mlp.experts")
    method.process_weights_after_loading(layer)
    x = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(3))
    topk_ids = torch.tensor([[0, 1], [2, 3], [1, 2]])
    topk_weights = torch.full((3, TOP_K), 0.5)
    got = method.apply(layer, x, topk_weights, topk_ids, None, None)

    def unrounded(q):  # type: ignore[no-untyped-def]
        return lambda row: row @ (q.weight.float() * q.weight_scale).t()

    float_inputs = torch.zeros_like(x)
    for t in range(3):
        for slot in range(TOP_K):
            gate, up, down = (unrounded(q) for q in experts[int(topk_ids[t, slot])])
            row = x[t : t + 1]
            float_inputs[t] += 0.5 * down(torch.nn.functional.silu(gate(row)) * up(row))[0]
    assert (got - float_inputs).abs().max() > 100 * 1e-5


def _moe_config(activation: str = "silu", gated: bool = True):  # type: ignore[no-untyped-def]
    return SimpleNamespace(is_act_and_mul=gated, activation=SimpleNamespace(value=activation))


def _create(method, hidden: int = HIDDEN, inter: int = INTER) -> None:  # type: ignore[no-untyped-def]
    method.create_weights(torch.nn.Module(), EXPERTS, hidden, inter, torch.float32)


def test_moe_shapes_and_activations_the_method_cannot_serve_are_refused() -> None:
    prefix = "model.layers.1.mlp.experts"
    method = GcuFusedMoEMethod(_moe_config(gated=False), "W8A16", 0, prefix)
    with pytest.raises(DescriptionError, match="not SiLU-gated"):
        _create(method)
    method = GcuFusedMoEMethod(_moe_config(), "W4A16", 16, prefix)
    with pytest.raises(DescriptionError, match="odd k=33"):
        _create(method, inter=33)
    method = GcuFusedMoEMethod(_moe_config(), "W8A16", 48, prefix)
    with pytest.raises(DescriptionError, match="group_size 48 does not divide the 64"):
        _create(method)


def test_expert_parallel_layers_are_refused_at_run_time() -> None:
    _, layer = _experts("W8A16")
    method = GcuFusedMoEMethod(None, "W8A16", 16, "mlp.experts")
    layer.expert_map = torch.arange(EXPERTS)
    x = torch.zeros(1, HIDDEN)
    with pytest.raises(DescriptionError, match="expert parallelism"):
        method.apply(
            layer, x, torch.ones(1, TOP_K), torch.zeros(1, TOP_K, dtype=torch.long), None, None
        )


def _config(**types: str):  # type: ignore[no-untyped-def]
    from gcupipe.vllm_plugin.config import GcuQuantConfig

    return GcuQuantConfig.from_config(
        {"model_quant_type": "W8A8_DYNAMIC", "version": "1.0.0", "group_size": 0, **types}
    )


def _bare(cls):  # type: ignore[no-untyped-def]
    """An instance that passes isinstance without vLLM's engine set-up (the method only looks
    at its type and `moe_config`)."""
    return cls.__new__(cls)


def test_a_quantized_lm_head_is_refused_with_the_tensor_name() -> None:
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    config = _config(**{"lm_head.weight": "W8A8_DYNAMIC"})
    with pytest.raises(DescriptionError, match=r"'lm_head\.weight' is W8A8_DYNAMIC.*FLOAT"):
        config.get_quant_method(_bare(ParallelLMHead), "lm_head")
    assert (
        _config(**{"lm_head.weight": "FLOAT"}).get_quant_method(_bare(ParallelLMHead), "lm_head")
        is None
    )


def test_experts_of_mixed_types_are_refused_and_float_experts_use_vllms_method(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vllm.model_executor.layers.fused_moe import RoutedExperts, unquantized_fused_moe_method

    prefix = "model.layers.1.mlp.experts"
    mixed = _config(
        **{f"{prefix}.0.up_proj.weight": "W8A8_DYNAMIC", f"{prefix}.1.up_proj.weight": "W8A16"}
    )
    with pytest.raises(DescriptionError, match=r"mix types \['W8A16', 'W8A8_DYNAMIC'\]"):
        mixed.get_quant_method(_bare(RoutedExperts), prefix)
    experts = _bare(RoutedExperts)
    experts.moe_config = _moe_config()
    quantized = _config(**{f"{prefix}.0.up_proj.weight": "W8A16"})
    method = quantized.get_quant_method(experts, prefix)
    assert isinstance(method, GcuFusedMoEMethod) and method.quant_type == "W8A16"
    # FLOAT experts: vLLM's own unquantized method, given the layer's MoE config
    monkeypatch.setattr(
        unquantized_fused_moe_method, "UnquantizedFusedMoEMethod", lambda moe: ("vllm's", moe)
    )
    floats = _config(**{f"{prefix}.0.up_proj.weight": "FLOAT"})
    assert floats.get_quant_method(experts, prefix) == ("vllm's", experts.moe_config)
