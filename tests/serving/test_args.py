"""vLLM arguments derived from the artifact's own files, per target."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from gcupipe.errors import StageError
from gcupipe.platform import Platform
from gcupipe.serving.args import (
    VllmArgs,
    derive_quantization,
    extra_args_as_kwargs,
    inspect_artifact,
    server_command,
)
from gcupipe.serving.platform import (
    child_tmp,
    claim_tmp,
    detect_platform,
    platform_env,
    release_tmp,
)
from gcupipe.targets.registry import TARGETS


def _model(tmp_path: Path, quant_config: dict | None = None, *files: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    config: dict = {"model_type": "llama"}
    if quant_config is not None:
        config["quantization_config"] = quant_config
    (tmp_path / "config.json").write_text(json.dumps(config))
    for name in files:
        (tmp_path / name).write_text("{}")
    return tmp_path


def test_modelslim_is_served_with_the_gcu_plugin_and_ascend_with_its_own(tmp_path: Path) -> None:
    artifact = inspect_artifact(_model(tmp_path, None, "quant_model_description.json"))
    assert artifact.format == "modelslim"
    for name in ("gcu", "cuda", "cpu"):
        assert derive_quantization(artifact, TARGETS.get(name)) == "gcu"
    assert derive_quantization(artifact, TARGETS.get("ascend")) == "ascend"


@pytest.mark.parametrize("method", ["gptq", "awq", "w8a8"])
def test_gcu_format_gets_the_vllm_gcu_loader_name_on_gcu(tmp_path: Path, method: str) -> None:
    artifact = inspect_artifact(_model(tmp_path, {"quant_method": method}))
    assert artifact.format == "gcu"
    assert derive_quantization(artifact, TARGETS.get("gcu")) == method


def test_moe_gptq_and_awq_on_gcu_need_moe_wna16_gcu(tmp_path: Path) -> None:
    for method in ("gptq", "awq"):
        model = _model(tmp_path / method, {"quant_method": method})
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "n_routed_experts": 4}))
        assert derive_quantization(inspect_artifact(model), TARGETS.get("gcu")) == "moe_wna16_gcu"
        assert derive_quantization(inspect_artifact(model), TARGETS.get("cpu")) is None


def test_gcu_w8a8_layout_is_refused_off_gcu(tmp_path: Path) -> None:
    artifact = inspect_artifact(_model(tmp_path, {"quant_method": "w8a8"}))
    with pytest.raises(StageError, match="vLLM-GCU's own method: vLLM on cpu has none"):
        derive_quantization(artifact, TARGETS.get("cpu"))


def test_compressed_tensors_and_float_need_no_flag(tmp_path: Path) -> None:
    ct = inspect_artifact(_model(tmp_path / "ct", {"quant_method": "compressed-tensors"}))
    assert ct.format == "compressed-tensors"
    assert derive_quantization(ct, TARGETS.get("gcu")) is None
    plain = inspect_artifact(_model(tmp_path / "f"))
    assert plain.format == "float" and derive_quantization(plain, TARGETS.get("cpu")) is None


def test_int8_kv_cache_and_chat_template_are_detected(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    model = _model(tmp_path, {"quant_method": "w8a8"})
    assert not inspect_artifact(model).int8_kv_cache
    scale = {"model.layers.0.self_attn.k_scale": torch.tensor(0.01)}
    save_file(scale, str(model / "model.safetensors"))
    (model / "chat_template.jinja").write_text("{{ messages }}")
    artifact = inspect_artifact(model)
    assert artifact.int8_kv_cache
    assert artifact.chat_template


def test_not_a_model_dir(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="no config.json"):
        inspect_artifact(tmp_path)


def test_cli_and_llm_keywords_agree() -> None:
    args = VllmArgs(
        model="/m",
        quantization="gcu",
        served_model_name="tiny",
        max_model_len=2048,
        tensor_parallel_size=2,
        trust_remote_code=True,
        enforce_eager=True,
        kv_cache_dtype="int8",
        extra_args=["--gpu-memory-utilization", "0.5", "--disable-log-stats"],
    )
    assert args.cli() == [
        "--model",
        "/m",
        "--quantization",
        "gcu",
        "--served-model-name",
        "tiny",
        "--max-model-len",
        "2048",
        "--tensor-parallel-size",
        "2",
        "--trust-remote-code",
        "--enforce-eager",
        "--kv-cache-dtype",
        "int8",
        "--gpu-memory-utilization",
        "0.5",
        "--disable-log-stats",
    ]
    kwargs = args.llm_kwargs()
    assert kwargs["quantization"] == "gcu" and kwargs["max_model_len"] == 2048
    assert kwargs["gpu_memory_utilization"] == 0.5 and kwargs["disable_log_stats"] is True
    assert "--trust-remote-code" not in VllmArgs(model="/m").cli()


def test_server_command_uses_the_api_server_module() -> None:
    command = server_command(VllmArgs(model="/m"), "127.0.0.1", 8123)
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert command[-4:] == ["--host", "127.0.0.1", "--port", "8123"]


def test_extra_args_forms() -> None:
    assert extra_args_as_kwargs(["--seed=3", "--enable-prefix-caching"]) == {
        "seed": 3,
        "enable_prefix_caching": True,
    }
    with pytest.raises(StageError, match="expected a --flag"):
        extra_args_as_kwargs(["oops"])


def test_platform_override_and_cpu_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GCUPIPE_PLATFORM", "gcu")
    assert detect_platform() is Platform.GCU
    env = platform_env(Platform.CPU, tmp_path, kv_cache_space_gib=2)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert Path(env["VLLM_CACHE_ROOT"]).is_relative_to(tmp_path)
    assert Path(env["TMPDIR"]).is_dir()
    assert "VLLM_CPU_KVCACHE_SPACE" not in platform_env(Platform.CUDA, tmp_path, 1)


def test_long_run_dirs_keep_sockets_short(tmp_path: Path) -> None:
    system_tmp = Path(tempfile.gettempdir())
    before = set(system_tmp.glob("gcupipe-vllm-*"))
    deep = tmp_path / ("x" * 80)
    env = platform_env(Platform.CPU, deep, kv_cache_space_gib=1)
    # nothing is made outside the run until a child starts (a stage failing before would leak)
    assert Path(env["TMPDIR"]) == deep / "tmp" and set(system_tmp.glob("gcupipe-vllm-*")) == before
    # only sockets go to the short one: torch's compile cache (~150 MB a run) stays in the run
    assert Path(env["TORCHINDUCTOR_CACHE_DIR"]).is_relative_to(deep)
    first, second = child_tmp(env), child_tmp(env)
    assert len(first["TMPDIR"]) <= 60 + len("/gcupipe-vllm-") and Path(first["TMPDIR"]).is_dir()
    assert first["TMPDIR"] != second["TMPDIR"]  # each child its own, removed once it is gone
    release_tmp(first)
    assert not Path(first["TMPDIR"]).exists() and Path(second["TMPDIR"]).is_dir()
    release_tmp(second)
    short = Path(tempfile.mkdtemp(prefix="run-"))  # a run directory short enough for sockets
    try:
        inside = child_tmp(platform_env(Platform.CPU, short, kv_cache_space_gib=1))
        release_tmp(inside)  # a TMPDIR inside the run directory is the run's, and stays
        assert Path(inside["TMPDIR"]) == short / "tmp" and (short / "tmp").is_dir()
    finally:
        shutil.rmtree(short)


def test_a_short_tmpdir_left_by_a_killed_gcupipe_is_swept_by_the_next_child(
    tmp_path: Path,
) -> None:
    dead = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a pid that has ended
    system_tmp = Path(tempfile.gettempdir())
    left = Path(tempfile.mkdtemp(prefix=f"gcupipe-vllm-{dead_pid}-"))
    (left / "precompiled.h").write_bytes(b"x" * 1024)
    kept_alive = Path(tempfile.mkdtemp(prefix=f"gcupipe-vllm-{dead_pid}-"))
    claim_tmp({"TMPDIR": str(kept_alive)}, os.getpid())  # a keep_alive server still uses it
    try:
        made = child_tmp(platform_env(Platform.CPU, tmp_path / ("x" * 80), kv_cache_space_gib=1))
        assert not left.exists()
        assert kept_alive.is_dir()
        assert Path(made["TMPDIR"]).parent == system_tmp
        release_tmp(made)
    finally:
        shutil.rmtree(left, ignore_errors=True)
        shutil.rmtree(kept_alive, ignore_errors=True)
