"""One break test per finding of the loader read (issue 14): a good artifact for the target
passes; made wrong in exactly the way the finding describes, the rule that guards it fails and
names the loader it would break. Findings about the recipe are refused at lint."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from gcupipe.formats.modeldir import ModelDir  # noqa: E402
from gcupipe.formats.registry import read_quantized  # noqa: E402
from gcupipe.formats.results import CheckOptions  # noqa: E402
from gcupipe.stages.quantize import QuantizeConfig, QuantizeStage  # noqa: E402
from gcupipe.testing.tiny_models import tiny_model  # noqa: E402
from gcupipe.validation.rules import check_structure  # noqa: E402
from tests.helpers import calibration, quantize  # noqa: E402


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("findings")


@pytest.fixture(scope="module")
def models(root: Path) -> dict[str, Path]:
    return {
        "llama": tiny_model("llama", root / "src" / "llama"),
        "llama-fp16": tiny_model("llama", root / "src" / "llama-fp16", dtype="float16"),
        "qwen2": tiny_model("qwen2", root / "src" / "qwen2"),  # tied embeddings
        "deepseek_v2": tiny_model("deepseek_v2", root / "src" / "deepseek_v2"),
    }


def failed(path: Path, target: str, **options: object) -> dict[str, str]:
    opts = CheckOptions(target=target, **options)  # type: ignore[arg-type]
    return {r.rule: r.message for r in check_structure(ModelDir(path), opts) if r.failed}


def problems(**config: object) -> dict[str, str]:
    found = QuantizeStage().check(QuantizeConfig.model_validate(config))
    return {p.key: p.message for p in found}


def copy(good: Path, tmp_path: Path) -> Path:
    shutil.copytree(good, tmp_path / "broken")
    return tmp_path / "broken"


def rewrite_shard(path: Path, change) -> None:  # type: ignore[no-untyped-def]
    """Apply `change(tensors)` to the one weight file and write it back (index untouched)."""
    [shard] = [p for p in path.glob("*.safetensors")]
    tensors = load_file(str(shard))
    change(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})


def rewrite_config(path: Path, change) -> None:  # type: ignore[no-untyped-def]
    for name in ("config.json", "quantize_config.json"):
        data = json.loads((path / name).read_text())
        change(data.get("quantization_config", data) if name == "config.json" else data)
        (path / name).write_text(json.dumps(data))


# 1. MoE GPTQ/AWQ on GCU load only through moe_wna16_gcu, whose AWQ needs the skip list key


@pytest.fixture(scope="module")
def moe_awq(models: dict[str, Path], root: Path) -> Path:
    return quantize(
        models["deepseek_v2"],
        root / "moe-awq",
        method="awq",
        format="gcu",
        target="gcu",
        calibration=calibration(root),
    )


def test_1_moe_awq_on_gcu_is_served_as_moe_wna16_gcu(moe_awq: Path, tmp_path: Path) -> None:
    assert failed(moe_awq, "gcu", quantization="moe_wna16_gcu", check_quantization=True) == {}
    settings = json.loads((moe_awq / "config.json").read_text())["quantization_config"]
    assert "modules_to_not_convert" in settings  # MoeWNA16GCUConfig.from_config requires it
    wrong = failed(moe_awq, "gcu", quantization="awq", check_quantization=True)
    assert set(wrong) == {"quantization-flag"}
    assert "MoeWNA16GCUConfig" in wrong["quantization-flag"]
    assert "'moe_wna16_gcu'" in wrong["quantization-flag"]

    broken = copy(moe_awq, tmp_path)
    rewrite_config(broken, lambda qc: qc.pop("modules_to_not_convert"))
    bad = failed(broken, "gcu")
    assert set(bad) == {"gcu-loader-config"}
    assert "'modules_to_not_convert'" in bad["gcu-loader-config"]
    assert "MoeWNA16GCUConfig.from_config" in bad["gcu-loader-config"]


def test_1_lint_states_moe_wna16_gcu_and_refuses_serving_moe_awq_as_awq(
    moe_awq: Path, models: dict[str, Path], root: Path
) -> None:
    from gcupipe.stages.serve import ServeConfig, ServeStage

    config = QuantizeConfig(
        model=models["deepseek_v2"],
        method="awq",
        format="gcu",
        target="gcu",
        calibration=calibration(root),
    )
    [note] = QuantizeStage().lint_notes(config)
    assert note == "for gcu (vLLM-GCU): serve with --quantization moe_wna16_gcu"
    [problem] = ServeStage().check(ServeConfig(model=moe_awq, quantization="awq", target="gcu"))
    assert problem.key == "quantization" and "moe_wna16_gcu" in problem.message
    assert ServeStage().check(ServeConfig(model=moe_awq, target="gcu")) == []


# 2. A linear kept in float inside a layer: only AWQ's skip list exists on GCU


def test_2_float_linears_are_refused_where_the_gcu_loader_has_no_skip_list(
    models: dict[str, Path], root: Path
) -> None:
    keep = ["lm_head", r".*embed_tokens", r".*\.mlp\.gate", r".*\.layers\.1\.mlp\.down_proj"]
    common = {"model": models["llama"], "format": "gcu", "ignore": keep}
    calib = calibration(root)
    gptq = problems(method="gptq", calibration=calib, **common)
    assert "GPTQGCUConfig.get_quant_method" in gptq["ignore"]
    assert "model.layers.1.mlp.down_proj" in gptq["ignore"]
    w8a8 = problems(method="w8a8", calibration=calib, **common)
    assert "W8A8Config.get_quant_method" in w8a8["ignore"]
    assert problems(method="gptq", calibration=calib, target="cpu", **common) == {}  # "dynamic"
    assert problems(method="awq", calibration=calib, **common) == {}


def test_2_awq_skip_list_is_what_keeps_a_linear_float(
    models: dict[str, Path], root: Path, tmp_path: Path
) -> None:
    keep = ["lm_head", r".*embed_tokens", r".*\.layers\.1\.mlp\.down_proj"]
    good = quantize(
        models["llama"],
        root / "awq-skip",
        method="awq",
        format="gcu",
        calibration=calibration(root),
        ignore=keep,
    )
    settings = json.loads((good / "config.json").read_text())["quantization_config"]
    assert settings["modules_to_not_convert"] == ["model.layers.1.mlp.down_proj"]
    assert failed(good, "gcu") == {}
    broken = copy(good, tmp_path)
    rewrite_config(broken, lambda qc: qc.update(modules_to_not_convert=[]))
    bad = failed(broken, "gcu")
    assert set(bad) == {"loader-parameters"}
    assert "model.layers.1.mlp.down_proj.qweight is missing" in bad["loader-parameters"]
    assert "AWQGCULinearMethod" in bad["loader-parameters"]


# 3. The GCU int8 KV cache: names that land on the parameters GCUBaseKVCacheMethod creates


@pytest.fixture(scope="module")
def gcu_w8a8_kv(models: dict[str, Path], root: Path) -> Path:
    return quantize(
        models["llama"],
        root / "gcu-kv",
        method="w8a8",
        format="gcu",
        kv_cache={"dtype": "int8"},
        calibration=calibration(root),
    )


def test_3_kv_zero_points_are_named_where_the_gcu_kv_method_reads_them(
    gcu_w8a8_kv: Path, tmp_path: Path
) -> None:
    names = set(ModelDir(gcu_w8a8_kv).tensors)
    for leaf in ("k_scale", "v_scale", "attn.k_zero", "attn.v_zero"):
        assert f"model.layers.0.self_attn.{leaf}" in names
    assert failed(gcu_w8a8_kv, "gcu") == {}
    broken = copy(gcu_w8a8_kv, tmp_path)

    def old_names(tensors: dict) -> None:  # what gcupipe wrote before: no remap reaches it
        for index in range(2):
            for kv in "kv":
                prefix = f"model.layers.{index}.self_attn"
                tensors[f"{prefix}.{kv}_zero"] = tensors.pop(f"{prefix}.attn.{kv}_zero")

    rewrite_shard(broken, old_names)
    bad = failed(broken, "gcu")
    assert "loader-parameters" in bad
    assert "self_attn.attn.k_zero is missing" in bad["loader-parameters"]
    assert "GCUBaseKVCacheMethod" in bad["loader-parameters"]


def test_3_gptq_kv_cache_on_gcu_is_symmetric_scales_only(
    models: dict[str, Path], root: Path
) -> None:
    out = quantize(
        models["llama"],
        root / "gptq-kv",
        method="w4a16",
        format="gcu",
        kv_cache={"dtype": "int8"},
        calibration=calibration(root),
    )
    names = set(ModelDir(out).tensors)
    assert "model.layers.0.self_attn.k_scale" in names
    assert not any(n.endswith("_zero") for n in names)  # BaseKVCacheMethod has none
    assert {(s.k_offset, s.v_offset) for s in read_quantized(out).kv_scales} == {(0.0, 0.0)}
    assert failed(out, "gcu") == {}


# 4. compressed-tensors static W8A8 on GCU: symmetric activations only


def test_4_compressed_tensors_static_activations_are_symmetric_for_gcu(
    models: dict[str, Path], root: Path, tmp_path: Path
) -> None:
    def activations(path: Path) -> dict:
        groups = json.loads((path / "config.json").read_text())["quantization_config"]
        return next(iter(groups["config_groups"].values()))["input_activations"]

    common = {"method": "w8a8", "format": "compressed-tensors", "calibration": calibration(root)}
    for_gcu = quantize(models["llama"], root / "ct-gcu", target="gcu", **common)
    for_cpu = quantize(models["llama"], root / "ct-cpu", target="cpu", **common)
    assert activations(for_gcu)["symmetric"] is True
    assert activations(for_cpu)["symmetric"] is False  # upstream's CPU kernel takes a zero point
    assert failed(for_gcu, "gcu") == {} and failed(for_cpu, "cpu") == {}
    bad = failed(for_cpu, "gcu")
    assert set(bad) == {"gcu-ct-symmetric-activations"}
    assert "CompressedTensorMMLinearKernel" in bad["gcu-ct-symmetric-activations"]


# 5. vllm-ascend: no W4A16 linears, no grouped W8A16, no weight-only or static MoE; tied lm_head


def test_5_what_vllm_ascend_has_no_method_for_is_refused_at_lint(
    models: dict[str, Path], root: Path
) -> None:
    ascend = {"format": "modelslim", "target": "ascend"}
    assert "no W4A16 scheme" in problems(model=models["llama"], method="w4a16", **ascend)["method"]
    grouped = problems(model=models["llama"], method="w8a16", group_size=64, **ascend)
    assert "per-channel scales only" in grouped["group_size"]
    moe = problems(model=models["deepseek_v2"], method="w8a16", **ascend)
    assert "no W8A16 or W4A16 MoE scheme" in moe["method"]
    static = problems(
        model=models["deepseek_v2"], method="w8a8", calibration=calibration(root), **ascend
    )
    assert "no static-W8A8 MoE scheme" in static["method"]
    assert problems(model=models["deepseek_v2"], method="w8a8_dynamic", **ascend) == {}


def test_5_tied_models_list_lm_head_for_vllm_ascend(
    models: dict[str, Path], root: Path, tmp_path: Path
) -> None:
    good = quantize(
        models["qwen2"],
        root / "ascend-tied",
        method="w8a8_dynamic",
        format="modelslim",
        target="ascend",
    )
    description = json.loads((good / "quant_model_description.json").read_text())
    assert (
        description["lm_head.weight"] == "FLOAT" and "lm_head.weight" not in ModelDir(good).tensors
    )
    assert failed(good, "ascend") == {}
    broken = copy(good, tmp_path)
    description.pop("lm_head.weight")
    (broken / "quant_model_description.json").write_text(json.dumps(description))
    bad = failed(broken, "ascend")
    assert set(bad) == {"ascend-description-entries"}
    assert "no entry for lm_head.weight" in bad["ascend-description-entries"]
    assert "KeyError" in bad["ascend-description-entries"]


# 6. The int8 KV-cache json: read by no vLLM that vLLM-GCU runs; the tensors are what loads


def test_6_a_kv_cache_kept_only_in_the_json_is_a_failure(gcu_w8a8_kv: Path, tmp_path: Path) -> None:
    assert not (gcu_w8a8_kv / "int8_kv_cache.json").exists()
    broken = copy(gcu_w8a8_kv, tmp_path)
    scales = read_quantized(gcu_w8a8_kv).kv_scales
    kv = re.compile(r"\.self_attn\.(k_scale|v_scale|attn\.[kv]_zero)$")
    rewrite_shard(broken, lambda t: [t.pop(n) for n in [n for n in t if kv.search(n)]])
    factors = {str(s.layer_index): max(s.k_scale, s.v_scale) for s in scales}
    legacy = {
        "model_type": "llama",
        "kv_cache": {"dtype": "int8", "scaling_factor": {"0": factors}},
    }
    (broken / "int8_kv_cache.json").write_text(json.dumps(legacy))
    bad = failed(broken, "gcu")
    assert set(bad) == {"kv-cache-scales"}
    assert "never reads" in bad["kv-cache-scales"]
    assert "--quantization-param-path" in bad["kv-cache-scales"]


# 7. vllm-ascend W8A8: int64 deq_scale for float16 models; C8 decode reads the scale only


@pytest.fixture(scope="module")
def ascend_fp16_w8a8_kv(models: dict[str, Path], root: Path) -> Path:
    return quantize(
        models["llama-fp16"],
        root / "ascend-fp16",
        method="w8a8",
        format="modelslim",
        target="ascend",
        kv_cache={"dtype": "int8"},
        calibration=calibration(root),
    )


def test_7_float16_models_get_the_int64_deq_scale(
    ascend_fp16_w8a8_kv: Path, tmp_path: Path
) -> None:
    name = "model.layers.0.self_attn.o_proj.deq_scale"
    assert ModelDir(ascend_fp16_w8a8_kv).tensors[name].dtype == "I64"
    assert failed(ascend_fp16_w8a8_kv, "ascend") == {}

    as_float = copy(ascend_fp16_w8a8_kv, tmp_path / "a")  # what gcupipe wrote before

    def to_float(tensors: dict) -> None:
        tensors[name] = (tensors[name] & 0xFFFFFFFF).to(torch.int32).view(torch.float32)

    rewrite_shard(as_float, to_float)
    bad = failed(as_float, "ascend")
    assert "loader-parameters" in bad and f"{name} is F32" in bad["loader-parameters"]
    assert "AscendW8A8LinearMethod" in bad["loader-parameters"]

    copied = copy(ascend_fp16_w8a8_kv, tmp_path / "b")  # fp32 copied into the int64 parameter
    rewrite_shard(copied, lambda t: t.update({name: torch.zeros_like(t[name])}))
    bad = failed(copied, "ascend")
    assert set(bad) == {"loader-numerics"}
    assert "model.layers.0.self_attn.o_proj" in bad["loader-numerics"]


def test_7_c8_offsets_are_zero_for_vllm_ascend(ascend_fp16_w8a8_kv: Path, tmp_path: Path) -> None:
    broken = copy(ascend_fp16_w8a8_kv, tmp_path)
    name = "model.layers.1.self_attn.v_proj.kv_cache_offset"
    rewrite_shard(broken, lambda t: t.update({name: t[name] + 3}))
    bad = failed(broken, "ascend")
    assert set(bad) == {"ascend-c8-symmetric"}
    assert name in bad["ascend-c8-symmetric"] and "_forward_c8_decode" in bad["ascend-c8-symmetric"]


# 8. Nothing in vLLM-GCU reads the modelslim C8 tensors


def test_8_a_modelslim_kv_cache_is_for_vllm_ascend_only(
    models: dict[str, Path], root: Path
) -> None:
    common = {
        "model": models["llama"],
        "method": "w8a8",
        "format": "modelslim",
        "kv_cache": {"dtype": "int8"},
        "calibration": calibration(root),
    }
    assert (
        "nothing in vLLM-GCU reads the modelslim C8" in problems(target="gcu", **common)["kv_cache"]
    )
    assert "no int8 KV cache" in problems(target="cpu", **common)["kv_cache"]
    assert problems(target="ascend", **common) == {}


# 9. The compressed-tensors floor is the release that has the compress API the writer calls


def test_9_compressed_tensors_floor_has_the_per_module_compress() -> None:
    import inspect
    import tomllib

    from compressed_tensors.compressors import BaseCompressor

    root = Path(__file__).resolve().parents[2]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    [spec] = [d for deps in extras.values() for d in deps if d.startswith("compressed-tensors")]
    assert spec.split("#")[0].strip() == "compressed-tensors>=0.15"  # 0.15.0 brought it in
    assert list(inspect.signature(BaseCompressor.compress).parameters) == ["state_dict", "scheme"]
