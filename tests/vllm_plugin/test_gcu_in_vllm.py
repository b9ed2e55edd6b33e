"""Real vLLM on this CPU loads modelslim artifacts through quantization="gcu" and computes what
the reference runtime computes, for every weight type, on tiny Llama and Qwen2 models, and on a
tiny DeepSeek-V2 (MLA + MoE) with quantized experts."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from gcupipe.formats.registry import read_quantized  # noqa: E402
from gcupipe.platform import Platform  # noqa: E402
from gcupipe.quant.methods import LayerSpec  # noqa: E402
from gcupipe.quant.observers import scale_offset_from_range  # noqa: E402
from gcupipe.quant.rtn import rtn_linear  # noqa: E402
from gcupipe.quant.scheme import ActivationScheme, KVCacheScale  # noqa: E402
from gcupipe.runtime.model import build_model, load_config  # noqa: E402
from gcupipe.serving.platform import platform_env  # noqa: E402
from gcupipe.serving.runner import offline_spec, run_offline_spec  # noqa: E402
from gcupipe.testing.serving import servable_tiny_model  # noqa: E402
from gcupipe.vllm_plugin import LOW_MEMORY_ENV  # noqa: E402

pytestmark = pytest.mark.slow

SPECS = {
    "W8A8_DYNAMIC": LayerSpec(bits=8, activation=ActivationScheme.DYNAMIC),
    "W8A8": LayerSpec(bits=8, activation=ActivationScheme.STATIC),
    "W8A16": LayerSpec(bits=8),
    "W4A16": LayerSpec(bits=4, group_size=64, symmetric=False),
}
ARCHS = ("llama", "qwen2")
PROMPTS = [[5, 17, 99, 3, 200, 41, 7, 128], [64, 65, 66, 67, 1, 250, 12]]
GREEDY_TOKENS = 6
TOP_LOGPROBS = 5
LOGPROB_ATOL = 2e-3
"""vLLM (float32, its own attention/RMSNorm kernels) vs the runtime (transformers sdpa) on the
same integer math: measured differences are ~1e-5; an activation rounding flip moves a
logprob by ~1e-4 on these tiny models. 2e-3 catches any real format error (those are > 0.05)."""


DEEPSEEK_KINDS = ("W8A8_DYNAMIC", "W4A16")
DEEPSEEK_LOGPROB_ATOL = 3e-2
"""DeepSeek-V2 runs in bf16 in vLLM (its CPU MLA needs it), the reference in fp32: measured
differences are up to ~1.2e-2 (bf16 rounding; the experts compute the reference's own integer
math, vllm_plugin/moe.py). Expert layout errors move these logprobs by far more: gate and up
swapped ~0.1, experts permuted ~0.23, experts dropped ~0.15."""


BF16_LOGPROB_ATOL = 5e-2
"""Models served in bf16 on vLLM's own kernels (compressed-tensors W8A8 without the plugin, and
the plugin's layers on the kernels it chose: oneDNN int8, CPU WNA16): compared with the fp32
reference, bf16 rounding moves these logprobs by ~1e-2; a wrong scale or layout moves them by
> 0.1. (Greedy tokens of a random model are near ties in bf16, so they are not compared.)"""

KERNELS = {
    "W8A8_DYNAMIC": "CPUInt8ScaledMMLinearKernel",
    "W8A8": "CPUInt8ScaledMMLinearKernel",
    "W4A16": "CPUWNA16LinearKernel",
}
"""The vLLM kernel each type runs on in bf16 here (W8A16 has none on CPU: dequantized)."""


def _no_kernels() -> str | None:
    """Why the plugin leaves vLLM's quantized CPU GEMMs alone on this machine, or None."""
    from gcupipe.vllm_plugin.linear import cpu_kernels_unusable

    return cpu_kernels_unusable()


def _calibrate(model_dir: Path) -> dict[str, tuple[float, float]]:
    """Per-linear input min/max on the test prompts (static W8A8 needs input ranges)."""
    from gcupipe.runtime.model import load_float_model

    model = load_float_model(model_dir)
    ranges: dict[str, tuple[float, float]] = {}

    def hook(name):  # type: ignore[no-untyped-def]
        def record(module, args):  # type: ignore[no-untyped-def]
            x = args[0].detach()
            low, high = ranges.get(name, (0.0, 0.0))
            ranges[name] = (min(low, float(x.min())), max(high, float(x.max())))

        return record

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            module.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        for ids in PROMPTS:
            model(torch.tensor([ids]))
    return ranges


def write_modelslim(
    source: Path, out: Path, kind: str, kv_cache: bool = False, fmt: str = "modelslim"
) -> Path:
    """Quantize every decoder linear of `source` by RTN and write it with the real writer."""
    from safetensors.torch import load_file

    from gcupipe.formats.registry import FORMATS

    spec = SPECS[kind]
    state = load_file(str(source / "model.safetensors"))
    ranges = _calibrate(source) if spec.activation is ActivationScheme.STATIC else {}
    config = json.loads((source / "config.json").read_text())
    out.mkdir(parents=True)
    writer = FORMATS.get(fmt).writer()(out, source, config, kind.lower())
    written = set()
    for name, tensor in state.items():
        prefix, _, leaf = name.rpartition(".")
        is_linear = ".layers." in name and leaf == "weight" and tensor.ndim == 2
        if is_linear:
            layer = rtn_linear(tensor, state.get(f"{prefix}.bias"), spec)
            if spec.activation is ActivationScheme.STATIC:
                low, high = ranges[prefix]
                scale, offset = scale_offset_from_range(
                    torch.tensor([low]), torch.tensor([high]), 8, symmetric=False
                )
                layer.input_scale, layer.input_offset = scale.reshape(1), offset.reshape(1)
            writer.add_linear(prefix, layer)
            written.add(prefix)
    for name, tensor in state.items():
        prefix, _, leaf = name.rpartition(".")
        if prefix not in written:
            writer.add_float(name, tensor)
    if kv_cache:  # C8 tensors as the int8 KV-cache calibration writes them
        kv_channels = config["num_key_value_heads"] * config["head_dim"]
        for index in range(config["num_hidden_layers"]):
            writer.add_kv_cache(
                f"model.layers.{index}.self_attn",
                KVCacheScale(index, 0.05, 0.0, 0.05, 0.0),
                kv_channels,
            )
    writer.finish()
    return out


def runtime_logprobs(model_dir: Path, rows: list[dict], transform=None) -> list:  # type: ignore[no-untyped-def]
    """The reference runtime's next-token log-probs at every step vLLM decoded, fed vLLM's own
    tokens (teacher forcing): one [steps, vocab] tensor per prompt. Where vLLM and the runtime
    would have picked different tokens at a near-tie, both still score the same sequence.
    `transform` may change the quantized layers first (a witness of what a wrong load costs)."""
    from gcupipe.runtime.load import detect

    if detect(model_dir) == "float":
        from gcupipe.runtime.model import load_float_model

        model = load_float_model(model_dir)
    else:
        ckpt = read_quantized(model_dir)
        linears = transform(ckpt.linears) if transform else ckpt.linears
        model = build_model(load_config(model_dir), ckpt.float_tensors, linears)
    out = []
    with torch.no_grad():
        for ids, row in zip(PROMPTS, rows, strict=True):
            sequence = list(ids) + row["token_ids"]
            logits = model(torch.tensor([sequence[:-1]])).logits[0, len(ids) - 1 :]
            out.append(torch.log_softmax(logits.double(), dim=-1))
    return out


def worst_logprob_gap(rows: list[dict], expected: list) -> float:
    """Largest |vLLM log-prob - expected log-prob| over every step and every token vLLM
    reported (its top TOP_LOGPROBS and the chosen one)."""
    worst = 0.0
    for row, want in zip(rows, expected, strict=True):
        assert len(row["logprobs"]) == len(row["token_ids"]) == want.shape[0]
        for step, reported in enumerate(row["logprobs"]):
            assert len(reported) >= TOP_LOGPROBS
            for token, logprob in reported.items():
                worst = max(worst, abs(logprob - float(want[step, int(token)])))
    return worst


def assert_same_decoding(rows: list[dict], others: list[dict], atol: float) -> None:
    """Two vLLM runs that must compute the same thing: equal log-probs at every step while
    their tokens agree; a first divergence is allowed only at a near-tie (the top two tokens
    of that step within `atol`)."""
    for row, other in zip(rows, others, strict=True):
        for step, (mine, theirs) in enumerate(zip(row["logprobs"], other["logprobs"], strict=True)):
            common = set(mine) & set(theirs)
            assert common, step
            for token in common:
                assert math.isclose(mine[token], theirs[token], abs_tol=atol), (step, token)
            if row["token_ids"][step] != other["token_ids"][step]:
                top = sorted(mine.values(), reverse=True)[:2]
                assert top[0] - top[1] <= 2 * atol, ("diverged at a clear choice", step, top)
                break


def rolled_scales(linears: dict) -> dict:
    """Every quantized layer's per-channel scales shifted by one output channel: the kind of
    layout slip a loader can make (scales and rows out of step)."""
    import dataclasses

    return {
        prefix: dataclasses.replace(layer, weight_scale=layer.weight_scale.roll(1, dims=0))
        for prefix, layer in linears.items()
    }


EXPERT_GAIN = 4.0


def deepseek_source(root: Path) -> Path:
    """Tiny DeepSeek-V2 with the MLA sizes vLLM's CPU backend supports (kv_lora_rank 512,
    rope 64) and grouped routing set.

    Its expert weights (routed and shared) are scaled by EXPERT_GAIN: at the random init's
    size the MoE output hardly reaches the logits (zeroing every expert moves a logprob by only
    ~1e-2, no more than bf16 rounding), so a wrong expert layout could pass unseen."""
    from safetensors.torch import load_file, save_file

    source = servable_tiny_model(
        "deepseek_v2",
        root / "deepseek-float",
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        n_group=1,
        topk_group=1,
    )
    weights = source / "model.safetensors"
    state = load_file(str(weights))
    for name in state:
        if "experts." in name:
            state[name] = state[name] * EXPERT_GAIN
    save_file(state, str(weights), metadata={"format": "pt"})
    return source


def deepseek_modelslim(source: Path, out: Path, kind: str) -> Path:
    """Every decoder linear quantized as gcupipe's quantize stage does it, routed and shared
    experts included; only the router (`mlp.gate`) stays FLOAT, as in the seed's artifacts."""
    from safetensors.torch import load_file

    from gcupipe.formats.registry import FORMATS

    out.mkdir()
    config = json.loads((source / "config.json").read_text())
    writer = FORMATS.get("modelslim").writer()(out, source, config, kind.lower())
    for name, tensor in load_file(str(source / "model.safetensors")).items():
        quantize = ".layers." in name and tensor.ndim == 2 and not name.endswith("mlp.gate.weight")
        if quantize:
            writer.add_linear(name.removesuffix(".weight"), rtn_linear(tensor, None, SPECS[kind]))
        else:
            writer.add_float(name, tensor)
    writer.finish()
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):  # type: ignore[no-untyped-def]
    """Every (arch, type) model generated by ONE vLLM child process (start-up dominates)."""
    root = tmp_path_factory.mktemp("gcu-vllm")
    jobs, models = [], {}
    for arch in ARCHS:
        source = servable_tiny_model(arch, root / f"{arch}-float")
        models[(arch, "float")] = source
        for kind in SPECS:
            model_dir = write_modelslim(source, root / f"{arch}-{kind.lower()}", kind)
            models[(arch, kind)] = model_dir
            jobs.append(
                {
                    "llm": {
                        "model": str(model_dir),
                        "quantization": "gcu",
                        "dtype": "float32",
                        "enforce_eager": True,
                        "max_model_len": 64,
                        "seed": 0,
                    },
                    "prompts": PROMPTS,
                    "max_tokens": GREEDY_TOKENS,
                    "logprobs": TOP_LOGPROBS,
                    "output": str(root / f"{arch}-{kind.lower()}.jsonl"),
                    "loaded_layers": True,
                }
            )
    # the same W8A8_DYNAMIC llama with C8 KV-cache tensors: vLLM-GCU's int8 KV cache reads them;
    # here they must load (not KeyError) and leave the weights' results unchanged
    c8 = write_modelslim(
        models[("llama", "float")], root / "llama-c8", "W8A8_DYNAMIC", kv_cache=True
    )
    models[("llama", "C8")] = c8
    jobs.append(
        {
            **jobs[0],
            "llm": {**jobs[0]["llm"], "model": str(c8)},
            "output": str(root / "llama-c8.jsonl"),
        }
    )
    # compressed-tensors W8A8 (dynamic per-token activations): upstream vLLM's own loader and
    # int8 kernels, no plugin and no --quantization
    ct = write_modelslim(
        models[("llama", "float")], root / "llama-ct-w8a8", "W8A8_DYNAMIC", fmt="compressed-tensors"
    )
    models[("llama", "compressed-tensors")] = ct
    ct_llm = {key: value for key, value in jobs[0]["llm"].items() if key != "quantization"}
    ct_llm["dtype"] = "bfloat16"  # vLLM's CPU int8 GEMM takes bf16/fp16 activations only
    jobs.append(
        {**jobs[0], "llm": {**ct_llm, "model": str(ct)}, "output": str(root / "llama-ct.jsonl")}
    )
    # the plugin's types again in bf16, where vLLM's int8 and weight-only kernels take them
    for kind in KERNELS:
        models[("llama", f"{kind}-bf16")] = models[("llama", kind)]
        job = next(j for j in jobs if j["output"].endswith(f"llama-{kind.lower()}.jsonl"))
        llm = {**job["llm"], "dtype": "bfloat16"}
        output = str(root / f"llama-{kind.lower()}-bf16.jsonl")
        jobs.append({**job, "llm": llm, "output": output})
    # DeepSeek-V2 (MLA + MoE): every linear quantized (fused_qkv_a_proj = q_a_proj +
    # kv_a_proj_with_mqa, kv_b_proj absorbed by MLA, shared experts, routed experts stacked
    # into vLLM's fused-MoE tensors), router FLOAT. W4A16 also covers group scales + int4 packing
    deepseek_float = deepseek_source(root)
    models[("deepseek_v2", "float")] = deepseek_float
    for kind in DEEPSEEK_KINDS:
        deepseek = deepseek_modelslim(deepseek_float, root / f"deepseek-{kind.lower()}", kind)
        models[("deepseek_v2", kind)] = deepseek
        llm = {**jobs[0]["llm"], "model": str(deepseek), "dtype": "bfloat16"}  # CPU MLA: bf16
        output = str(root / f"deepseek-{kind.lower()}.jsonl")
        jobs.append({**jobs[0], "llm": llm, "output": output, "loaded_layers": True})
    # W4A16 again with integer weights kept in memory and dequantized at every call
    w4a16 = next(job for job in jobs if job["output"].endswith("llama-w4a16.jsonl"))
    models[("llama", "W4A16-low-memory")] = models[("llama", "W4A16")]
    jobs.append(
        {
            **w4a16,
            "env": {LOW_MEMORY_ENV: "1"},
            "output": str(root / "llama-w4a16-low-memory.jsonl"),
        }
    )
    env = {**os.environ, **platform_env(Platform.CPU, root, kv_cache_space_gib=1)}
    run_offline_spec(
        offline_spec(jobs, root / "summary.json"), root, env, root / "vllm.log", timeout_s=600
    )
    quantized = [key for key in models if key[1] != "float"]
    outputs = {
        key: [json.loads(line) for line in Path(job["output"]).read_text().splitlines()]
        for key, job in zip(quantized, jobs, strict=True)
    }
    return models, outputs


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", list(SPECS))
def test_vllm_matches_reference_runtime(served, arch: str, kind: str) -> None:  # type: ignore[no-untyped-def]
    models, outputs = served
    rows = outputs[(arch, kind)]
    assert worst_logprob_gap(rows, runtime_logprobs(models[(arch, kind)], rows)) <= LOGPROB_ATOL
    # the check is sensitive: the float model's log-probs are outside the tolerance
    assert worst_logprob_gap(rows, runtime_logprobs(models[(arch, "float")], rows)) > LOGPROB_ATOL


def test_c8_kv_cache_tensors_load_and_leave_weights_alone(served) -> None:  # type: ignore[no-untyped-def]
    models, outputs = served
    description = json.loads((models[("llama", "C8")] / "quant_model_description.json").read_text())
    assert description["kv_cache_type"] == "C8"
    assert description["model.layers.0.self_attn.k_proj.kv_cache_scale"] == "C8"
    assert_same_decoding(outputs[("llama", "C8")], outputs[("llama", "W8A8_DYNAMIC")], 1e-6)


@pytest.mark.skipif(_no_kernels() is not None, reason=str(_no_kernels()))
def test_compressed_tensors_w8a8_loads_without_the_plugin(served) -> None:  # type: ignore[no-untyped-def]
    models, outputs = served
    model_dir = models[("llama", "compressed-tensors")]
    config = json.loads((model_dir / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    rows = outputs[("llama", "compressed-tensors")]
    assert worst_logprob_gap(rows, runtime_logprobs(model_dir, rows)) <= BF16_LOGPROB_ATOL
    # sensitive at this tolerance: scales one output channel out of step are far outside it
    witness = runtime_logprobs(model_dir, rows, rolled_scales)
    assert worst_logprob_gap(rows, witness) > 2 * BF16_LOGPROB_ATOL


@pytest.mark.skipif(_no_kernels() is not None, reason=str(_no_kernels()))
@pytest.mark.parametrize("kind", list(KERNELS))
def test_bf16_layers_run_on_vllms_kernels_and_match_reference_runtime(served, kind: str) -> None:  # type: ignore[no-untyped-def]
    models, outputs = served
    model_dir = models[("llama", f"{kind}-bf16")]
    loaded = json.loads((model_dir.parent / f"llama-{kind.lower()}-bf16.layers.json").read_text())
    for layer in ("model.layers.0.self_attn.qkv_proj", "model.layers.1.mlp.down_proj"):
        assert loaded[layer]["kernel"] == KERNELS[kind], (layer, loaded[layer])
    rows = outputs[("llama", f"{kind}-bf16")]
    assert worst_logprob_gap(rows, runtime_logprobs(model_dir, rows)) <= BF16_LOGPROB_ATOL
    witness = runtime_logprobs(model_dir, rows, rolled_scales)
    assert worst_logprob_gap(rows, witness) > 2 * BF16_LOGPROB_ATOL


def zeroed_experts(linears: dict) -> dict:
    """Every routed expert's output zeroed (scales 0): what dropped experts would give."""
    import dataclasses

    return {
        prefix: dataclasses.replace(layer, weight_scale=layer.weight_scale * 0)
        if ".mlp.experts." in prefix
        else layer
        for prefix, layer in linears.items()
    }


@pytest.mark.parametrize("kind", DEEPSEEK_KINDS)
def test_deepseek_v2_quantized_experts_match_reference_runtime(served, kind: str) -> None:  # type: ignore[no-untyped-def]
    """Quantized routed and shared experts load into vLLM's fused MoE through the plugin and
    give the reference runtime's first-token logprobs within bf16 rounding."""
    models, outputs = served
    model_dir = models[("deepseek_v2", kind)]
    description = json.loads((model_dir / "quant_model_description.json").read_text())
    for tensor in (
        "self_attn.q_a_proj",
        "self_attn.kv_a_proj_with_mqa",
        "mlp.experts.0.up_proj",
        "mlp.experts.3.down_proj",
        "mlp.shared_experts.gate_proj",
    ):
        layer = 0 if tensor.startswith("self_attn") else 1
        assert description[f"model.layers.{layer}.{tensor}.weight"] == kind
    assert description["model.layers.1.mlp.gate.weight"] == "FLOAT"
    rows = outputs[("deepseek_v2", kind)]
    assert [len(row["token_ids"]) for row in rows] == [GREEDY_TOKENS] * len(PROMPTS)
    assert worst_logprob_gap(rows, runtime_logprobs(model_dir, rows)) <= DEEPSEEK_LOGPROB_ATOL
    # the check sees the experts: without them vLLM's logprobs would be far outside tolerance
    witness = runtime_logprobs(model_dir, rows, zeroed_experts)
    assert worst_logprob_gap(rows, witness) > 3 * DEEPSEEK_LOGPROB_ATOL
    # and vLLM holds the experts as the integers of the files, not dequantized to float
    loaded = json.loads((model_dir.parent / f"deepseek-{kind.lower()}.layers.json").read_text())
    experts = {n: layer for n, layer in loaded.items() if n.endswith("mlp.experts.routed_experts")}
    assert experts, sorted(loaded)
    for name, layer in experts.items():
        assert layer["method"] == "GcuFusedMoEMethod", name
        for stem in ("w13", "w2"):
            assert layer["params"][f"{stem}_weight"][0] == "int8", (name, layer["params"])


def test_low_memory_weight_only_mode_gives_the_same_results(served) -> None:  # type: ignore[no-untyped-def]
    """Integer weights dequantized per call (F.linear) vs once at load (vLLM's float GEMM):
    log-probs equal up to the two GEMMs' float rounding."""
    _, outputs = served
    low, default = outputs[("llama", "W4A16-low-memory")], outputs[("llama", "W4A16")]
    assert_same_decoding(low, default, LOGPROB_ATOL)


def test_what_vllm_loaded_is_what_the_description_says(served) -> None:  # type: ignore[no-untyped-def]
    """Read off the engine itself (LLM.apply_model after loading): each fused layer got the
    plugin's method for the description's type with integer weights, and lm_head stayed
    float, as the description file says."""
    models, _ = served
    model_dir = models[("llama", "W4A16")]
    description = json.loads((model_dir / "quant_model_description.json").read_text())
    assert description["model.layers.0.self_attn.q_proj.weight"] == "W4A16"
    assert description["lm_head.weight"] == "FLOAT"
    loaded = json.loads((model_dir.parent / "llama-w4a16.layers.json").read_text())
    for layer in (
        "model.layers.0.self_attn.qkv_proj",
        "model.layers.1.mlp.gate_up_proj",
        "model.layers.1.mlp.down_proj",
    ):
        assert loaded[layer]["method"] == "GcuWeightOnlyLinearMethod", layer
        assert loaded[layer]["kernel"] is None  # fp32: no weight-only kernel, dequantized
    assert loaded["lm_head"]["method"] == "UnquantizedEmbeddingMethod"
    static = json.loads((model_dir.parent / "llama-w8a8.layers.json").read_text())
    qkv = static["model.layers.0.self_attn.qkv_proj"]
    assert qkv["method"] == "GcuW8A8StaticLinearMethod"
    if _no_kernels() is not None:  # the same integer math in torch, int8 weights kept
        assert qkv["kernel"] is None and qkv["params"]["weight"][0] == "int8"
        return
    assert qkv["kernel"] == "CPUInt8ScaledMMLinearKernel"  # oneDNN holds the int8 weights
    assert {name: dtype for name, (dtype, _) in qkv["params"].items()} == {
        "weight": "int8",  # an empty placeholder
        "weight_scale": "float32",
        "input_scale": "float32",
        "input_zero_point": "int32",
        "azp_adj": "float32",  # oneDNN's zero-point correction, column sums x weight scale
        "gcu_bias": "float32",
    }
