"""Each structural rule: a good directory passes; broken in exactly one way, that rule fails
with a message naming the problem."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from safetensors.torch import load_file, save_file  # noqa: E402

from gcupipe.formats.modeldir import ModelDir  # noqa: E402
from gcupipe.formats.results import CheckOptions  # noqa: E402
from gcupipe.validation.rules import check_quantization_flag, check_structure  # noqa: E402

from .conftest import write_gptq  # noqa: E402

DESCRIPTION = "quant_model_description.json"


def results(path: Path, **options) -> dict:
    return {r.rule: r for r in check_structure(ModelDir(path), CheckOptions(**options))}


def failed(path: Path, **options) -> dict:
    return {name: r for name, r in results(path, **options).items() if r.failed}


def rewrite_modelslim(path: Path, change: Callable[[dict, dict], None]) -> None:
    """Apply `change(tensors, description)` and write shards, index and description back
    consistently, so only what `change` breaks is broken."""
    shards = sorted(path.glob("quant_model_weight*.safetensors"))
    assert len(shards) == 1
    tensors = load_file(str(shards[0]))
    description = json.loads((path / DESCRIPTION).read_text())
    change(tensors, description)
    save_file(tensors, str(shards[0]), metadata={"format": "pt"})
    (path / DESCRIPTION).write_text(json.dumps(description))
    index = next(path.glob("quant_model_weight*.index.json"))
    data = json.loads(index.read_text())
    data["weight_map"] = {name: shards[0].name for name in tensors}
    index.write_text(json.dumps(data))


def test_good_directories_pass_every_rule(good_w8a8_kv, good_deepseek, good_gptq, tiny_llama):
    assert failed(good_w8a8_kv, reference_dir=tiny_llama) == {}
    assert failed(good_deepseek) == {}
    assert failed(good_gptq) == {}
    ran = {n for n, r in results(good_w8a8_kv).items() if r.status == "pass"}
    assert {
        "description-matches-tensors",
        "kv-cache-scales",
        "tensor-dtypes-shapes",
        "weights-complete",
        "fused-modules-share-type",
        "scales-finite",
    } <= ran
    assert results(good_deepseek)["experts-quantized"].status == "pass"
    assert results(good_gptq)["gcu-g-idx-contiguous"].status == "pass"
    assert results(good_gptq)["loader-numerics"].status == "pass"


def test_required_files_missing_index(good_w8a8_kv, broken):
    path = broken(good_w8a8_kv)
    next(path.glob("*.index.json")).unlink()
    assert set(failed(path)) == {"required-files"}
    assert "index.json" in failed(path)["required-files"].message


def test_bundle_complete_names_what_the_source_has_and_the_bundle_lost(
    good_w8a8_kv, broken, tiny_llama
):
    source = broken(tiny_llama)
    (source / "tokenizer.json").write_text("{}")
    (source / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    (source / "LICENSE").write_text("Apache-2.0")
    assert failed(good_w8a8_kv) == {}  # without the source nothing says they exist
    bad = failed(good_w8a8_kv, reference_dir=source)
    assert set(bad) == {"bundle-complete"}
    assert bad["bundle-complete"].message.startswith("tokenizer.json is missing")
    from gcupipe.formats.bundle import missing_files
    from gcupipe.formats.modeldir import ModelDir

    names = [name for name, _ in missing_files(ModelDir(good_w8a8_kv), source)]
    assert names == ["tokenizer.json", "tokenizer_config.json", "chat_template", "LICENSE"]


def test_bundle_complete_needs_the_remote_code_auto_map_names(good_w8a8_kv, broken):
    path = broken(good_w8a8_kv)
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_tiny.TinyConfig",
        "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM",
        "AutoTokenizer": ["other/repo--tokenization_x.X", None],
    }
    (path / "config.json").write_text(json.dumps(config))
    (path / "configuration_tiny.py").write_text("")
    bad = failed(path)
    assert set(bad) == {"bundle-complete"}
    assert bad["bundle-complete"].message.startswith("modeling_tiny.py is missing: auto_map")


def test_truncated_shard_is_detected(good_w8a8_kv, broken):
    path = broken(good_w8a8_kv)
    shard = next(path.glob("quant_model_weight*.safetensors"))
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    bad = failed(path)
    assert "safetensors-integrity" in bad
    assert "truncated" in bad["safetensors-integrity"].message
    assert "100 missing" in bad["safetensors-integrity"].message


def test_modelslim_config_with_quantization_config(good_w8a8_kv, broken):
    path = broken(good_w8a8_kv)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (path / "config.json").write_text(json.dumps(config))
    bad = failed(path)
    assert set(bad) == {"no-quantization-config"}
    assert "delete quantization_config" in bad["no-quantization-config"].message


def test_description_misses_a_saved_tensor(good_w8a8_kv, broken):
    path = broken(good_w8a8_kv)
    description = json.loads((path / DESCRIPTION).read_text())
    del description["model.layers.0.mlp.up_proj.weight_scale"]
    (path / DESCRIPTION).write_text(json.dumps(description))
    bad = failed(path)
    assert set(bad) == {"description-matches-tensors"}
    assert "model.layers.0.mlp.up_proj.weight_scale" in bad["description-matches-tensors"].message


def test_missing_layer_is_the_serving_keyerror(good_w8a8_kv, broken):
    path = broken(good_w8a8_kv)

    def drop(tensors: dict, description: dict) -> None:
        for name in [n for n in tensors if n.startswith("model.layers.1.mlp.down_proj.")]:
            del tensors[name]
            del description[name]

    rewrite_modelslim(path, drop)
    bad = failed(path)
    assert set(bad) == {"weights-complete"}
    assert "KeyError: 'model.layers.1.mlp.down_proj.weight'" in bad["weights-complete"].message


def test_wrong_scale_dtype(good_w8a8_kv, broken):
    path = broken(good_w8a8_kv)

    def to_half(tensors: dict, description: dict) -> None:
        name = "model.layers.0.self_attn.o_proj.weight_scale"
        tensors[name] = tensors[name].half()

    rewrite_modelslim(path, to_half)
    bad = failed(path)  # the layout, the loader's parameter, and its deq_scale vs the scale
    assert set(bad) == {"tensor-dtypes-shapes", "loader-parameters", "loader-numerics"}
    assert "o_proj.weight_scale is F16" in bad["tensor-dtypes-shapes"].message
    assert "creates it as F32" in bad["loader-parameters"].message


@pytest.mark.parametrize(
    ("leaf", "value", "what"),
    [
        ("weight_scale", float("nan"), "NaN or infinite"),
        ("weight_scale", 0.0, "zero"),
        ("input_scale", float("inf"), "NaN or infinite"),
    ],
)
def test_a_nan_inf_or_zero_scale_fails_without_a_reference(good_w8a8_kv, broken, leaf, value, what):
    path = broken(good_w8a8_kv)
    name = f"model.layers.1.mlp.down_proj.{leaf}"

    def poison(tensors: dict, description: dict) -> None:
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = value

    rewrite_modelslim(path, poison)
    bad = failed(path)
    assert "scales-finite" in bad
    assert f"{name} holds a {what} scale" in bad["scales-finite"].message


def test_fused_qkv_with_mixed_types(good_deepseek, broken):
    path = broken(good_deepseek)
    description = json.loads((path / DESCRIPTION).read_text())
    for name in [n for n in description if n.startswith("model.layers.0.self_attn.kv_a_proj")]:
        description[name] = "W8A16"  # same tensors as W8A8_DYNAMIC, different type
    (path / DESCRIPTION).write_text(json.dumps(description))
    bad = failed(path)
    assert set(bad) == {"fused-modules-share-type"}
    message = bad["fused-modules-share-type"].message
    assert "model.layers.0.self_attn" in message and "kv_a_proj_with_mqa" in message


def test_expert_left_in_float(good_deepseek, broken):
    path = broken(good_deepseek)
    prefix = "model.layers.1.mlp.experts.2.down_proj"

    def to_float(tensors: dict, description: dict) -> None:
        weight = tensors[f"{prefix}.weight"].float() * tensors[f"{prefix}.weight_scale"]
        for leaf in ("weight", "weight_scale", "weight_offset"):
            del tensors[f"{prefix}.{leaf}"]
            del description[f"{prefix}.{leaf}"]
        tensors[f"{prefix}.weight"] = weight
        description[f"{prefix}.weight"] = "FLOAT"

    rewrite_modelslim(path, to_float)
    bad = failed(path)
    assert "experts-quantized" in bad
    assert prefix in bad["experts-quantized"].message
    assert set(bad) <= {"experts-quantized", "fused-modules-share-type"}


def test_missing_kv_cache_scales(good_w8a8_kv, broken):
    path = broken(good_w8a8_kv)

    def drop(tensors: dict, description: dict) -> None:
        for name in [n for n in tensors if n.startswith("model.layers.1.self_attn.v_proj.kv")]:
            del tensors[name]
            del description[name]

    rewrite_modelslim(path, drop)
    bad = failed(path)
    assert set(bad) == {"kv-cache-scales"}
    assert "model.layers.1.self_attn.v_proj.kv_cache_scale" in bad["kv-cache-scales"].message


def test_kv_cache_expected_but_absent(good_deepseek):
    bad = failed(good_deepseek, kv_cache_int8=True)
    assert set(bad) == {"kv-cache-scales"}


def test_gptq_group_size_not_a_multiple_of_64(tiny_llama, tmp_path):
    path = write_gptq(tiny_llama, tmp_path / "g32", bits=4, group_size=32)
    bad = failed(path)
    assert set(bad) == {"gcu-group-size"}  # the GCU kernels'; upstream vLLM takes groups of 32
    assert "not 64 or a multiple of 64" in bad["gcu-group-size"].message
    assert failed(path, target="cpu") == {}


def test_gptq_group_size_not_dividing_k(tiny_llama, tmp_path):
    path = write_gptq(tiny_llama, tmp_path / "g128", bits=4, group_size=128)
    # intermediate 256 and hidden 128 are divisible; make one layer's k odd by config
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["group_size"] = 192
    (path / "config.json").write_text(json.dumps(config))
    assert "group-size" in failed(path)
    assert "does not divide" in failed(path)["group-size"].message


def test_awq_group_size_must_be_64(tiny_llama, tmp_path):
    path = write_gptq(tiny_llama, tmp_path / "awq", bits=4, group_size=128, method="awq")
    bad = failed(path)
    assert set(bad) == {"gcu-group-size"}
    assert "AWQGCULinearMethod" in bad["gcu-group-size"].message
    assert "exactly 64" in bad["gcu-group-size"].message
    good = write_gptq(tiny_llama, tmp_path / "awq64", bits=4, group_size=64, method="awq")
    assert failed(good) == {}


def test_shuffled_g_idx(good_gptq, broken):
    path = broken(good_gptq)
    shard = path / "model.safetensors"
    tensors = load_file(str(shard))
    name = "model.layers.0.mlp.down_proj.g_idx"
    tensors[name] = tensors[name].flip(0).contiguous()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    bad = failed(path)  # and the GPTQ kernel, which groups rows by g_idx, reads it differently
    assert set(bad) == {"gcu-g-idx-contiguous", "loader-numerics"}
    assert name in bad["gcu-g-idx-contiguous"].message


def test_gptq_int8_must_be_symmetric(tiny_llama, tmp_path):
    path = write_gptq(tiny_llama, tmp_path / "w8", bits=8, group_size=-1)
    assert failed(path) == {}
    shard = path / "model.safetensors"
    tensors = load_file(str(shard))
    name = "model.layers.0.self_attn.q_proj.qzeros"
    tensors[name] = tensors[name] - 1
    save_file(tensors, str(shard), metadata={"format": "pt"})
    bad = failed(path)
    assert set(bad) == {"gcu-gptq-int8-symmetric"}
    assert name in bad["gcu-gptq-int8-symmetric"].message


def test_seed_guide_flag_mistake_names_the_right_value(good_w8a8_kv):
    """The seed guide serves a W8A8 model with quantization="w4a16"."""
    result = check_quantization_flag(good_w8a8_kv, "w4a16")
    assert result.failed
    assert "quantization='w4a16' does not match the files" in result.message
    assert "W8A8" in result.message and "'gcu'" in result.message
    assert not check_quantization_flag(good_w8a8_kv, "gcu").failed
    assert check_quantization_flag(good_w8a8_kv, None).failed
    bad = failed(good_w8a8_kv, quantization="w4a16", check_quantization=True)
    assert set(bad) == {"quantization-flag"}


def test_flag_for_other_layouts(good_gptq, tiny_llama):
    assert not check_quantization_flag(good_gptq, "gptq").failed
    assert "'gptq'" in check_quantization_flag(good_gptq, "gcu").message
    assert not check_quantization_flag(tiny_llama, None).failed
    assert "leave quantization unset" in check_quantization_flag(tiny_llama, "gcu").message


@pytest.fixture(scope="module")
def good_gcu_w8a8_kv(tmp_path_factory, tiny_llama):
    from .conftest import calibration, quantize

    tmp = tmp_path_factory.mktemp("gcu-kv")
    return quantize(
        tiny_llama,
        tmp / "model",
        method="w8a8",
        format="gcu",
        kv_cache={"dtype": "int8"},
        calibration=calibration(tmp),
    )


def test_gcu_kv_cache_misses_a_zero_point(good_gcu_w8a8_kv, broken):
    assert failed(good_gcu_w8a8_kv) == {}
    assert results(good_gcu_w8a8_kv)["kv-cache-scales"].status == "pass"
    path = broken(good_gcu_w8a8_kv)
    shard = path / "model.safetensors"
    tensors = load_file(str(shard))
    del tensors["model.layers.1.self_attn.attn.v_zero"]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    bad = failed(path)
    assert set(bad) == {"kv-cache-scales", "loader-parameters"}
    assert "model.layers.1.self_attn.attn.v_zero" in bad["kv-cache-scales"].message
    assert "GCUBaseKVCacheMethod" in bad["loader-parameters"].message


def test_gcu_flag_is_the_loader_name(good_gcu_w8a8_kv):
    assert not check_quantization_flag(good_gcu_w8a8_kv, "w8a8").failed
    assert "the right value is 'w8a8'" in check_quantization_flag(good_gcu_w8a8_kv, "gcu").message


def test_index_points_at_a_missing_shard(good_w8a8_kv, broken):
    path = broken(good_w8a8_kv)
    index = next(path.glob("*.index.json"))
    data = json.loads(index.read_text())
    name = next(iter(data["weight_map"]))
    data["weight_map"][name] = "quant_model_weight_w8a8-00002-of-00002.safetensors"
    index.write_text(json.dumps(data))
    bad = failed(path)
    assert set(bad) == {"safetensors-integrity"}
    assert "00002-of-00002.safetensors, which is missing" in bad["safetensors-integrity"].message


def test_modelslim_group_size_disagrees_with_scales(tiny_llama, tmp_path):
    from .conftest import quantize

    path = quantize(tiny_llama, tmp_path / "w4", method="w4a16", group_size=64, format="modelslim")
    assert failed(path) == {}
    assert results(path)["group-size"].status == "pass"
    description = json.loads((path / DESCRIPTION).read_text())
    description["group_size"] = 32
    (path / DESCRIPTION).write_text(json.dumps(description))
    bad = failed(path)  # the plugin then creates 4 groups per row where the files have 2
    assert set(bad) == {"group-size", "loader-parameters"}
    assert "not group_size 32" in bad["group-size"].message


def test_compressed_tensors_packed_weight_without_its_scale(tiny_llama, tmp_path):
    from .conftest import quantize

    path = quantize(
        tiny_llama, tmp_path / "ct", method="w4a16", group_size=64, format="compressed-tensors"
    )
    assert failed(path) == {}
    assert results(path)["compressed-tensors-scales"].status == "pass"
    shard = next(path.glob("*.safetensors"))
    tensors = load_file(str(shard))
    del tensors["model.layers.0.mlp.up_proj.weight_scale"]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    for index in path.glob("*.index.json"):
        data = json.loads(index.read_text())
        data["weight_map"].pop("model.layers.0.mlp.up_proj.weight_scale", None)
        index.write_text(json.dumps(data))
    bad = failed(path)  # and vLLM's CompressedTensorsWNA16 creates the parameter it lacks
    assert set(bad) == {"compressed-tensors-scales", "loader-parameters", "loader-numerics"}
    assert "model.layers.0.mlp.up_proj.weight_scale" in bad["compressed-tensors-scales"].message
    assert "CompressedTensorsWNA16" in bad["loader-parameters"].message
