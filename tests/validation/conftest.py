"""Good model directories (each test copies one and breaks it in exactly one way)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from gcupipe.testing.tiny_models import tiny_model  # noqa: E402
from tests.helpers import calibration, quantize  # noqa: E402, F401 (test_rules imports them)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return tiny_model("llama", tmp_path_factory.mktemp("src") / "llama")


@pytest.fixture(scope="session")
def good_w8a8_kv(tmp_path_factory, tiny_llama) -> Path:
    """Static W8A8 + C8 KV cache in the modelslim layout, for vllm-ascend (the one loader of
    C8): the richest tensor set."""
    tmp = tmp_path_factory.mktemp("w8a8kv")
    return quantize(
        tiny_llama,
        tmp / "model",
        method="w8a8",
        format="modelslim",
        target="ascend",
        kv_cache={"dtype": "int8"},
        calibration=calibration(tmp),
    )


@pytest.fixture(scope="session")
def good_deepseek(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("deepseek")
    source = tiny_model("deepseek_v2", tmp / "src")
    return quantize(source, tmp / "model", method="w8a8_dynamic", format="modelslim")


@pytest.fixture(scope="session")
def good_gptq(tmp_path_factory, tiny_llama) -> Path:
    """A GPTQ (gcu layout) directory packed with the shared packing code."""
    return write_gptq(tiny_llama, tmp_path_factory.mktemp("gptq") / "model", bits=4, group_size=64)


def write_gptq(source: Path, out: Path, bits: int, group_size: int, method: str = "gptq") -> Path:
    from safetensors.torch import load_file, save_file

    from gcupipe.quant.methods import LayerSpec
    from gcupipe.quant.packing import pack_awq, pack_gptq
    from gcupipe.quant.rtn import rtn_linear

    out.mkdir(parents=True)
    state = load_file(str(source / "model.safetensors"))
    tensors = {}
    for name, tensor in state.items():
        if name.endswith("_proj.weight"):
            prefix = name.removesuffix(".weight")
            layer = rtn_linear(
                tensor,
                None,
                LayerSpec(bits=bits, group_size=max(group_size, 0), symmetric=bits == 8),
            )
            if method == "gptq":
                packed = pack_gptq(
                    layer.weight,
                    layer.weight_offset,
                    layer.weight_scale,
                    bits=bits,
                    group_size=max(group_size, 0),
                )
            else:
                packed = pack_awq(layer.weight, layer.weight_offset, layer.weight_scale)
            tensors.update({f"{prefix}.{k}": v for k, v in packed.items()})
        else:
            tensors[name] = tensor
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    settings = {
        "quant_method": method,
        "bits": bits,
        "group_size": group_size,
        "desc_act": False,
        "sym": bits == 8,
    }
    if method == "awq":
        settings = {
            "quant_method": "awq",
            "bits": bits,
            "group_size": group_size,
            "version": "gemm",
            "zero_point": True,
        }
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = settings
    (out / "config.json").write_text(json.dumps(config))
    (out / "quantize_config.json").write_text(json.dumps(settings))
    return out


@pytest.fixture
def broken(tmp_path):
    """Copy a good directory to break it."""

    def copy(good: Path) -> Path:
        target = tmp_path / good.name
        shutil.copytree(good, target)
        return target

    return copy
