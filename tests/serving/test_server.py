"""Server lifecycle on a fake OpenAI server: health wait, checks, failures, no orphans."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import psutil
import pytest

from gcupipe.errors import StageError
from gcupipe.serving.checks import raise_on_failed, run_checks
from gcupipe.serving.server import ServerProcess, diagnose, ensure_port_free, free_port
from gcupipe.testing.serving import write_fake_server


@pytest.fixture
def fake(tmp_path: Path):  # type: ignore[no-untyped-def]
    script = write_fake_server(tmp_path / "fake_server.py")
    started: list[ServerProcess] = []

    def start(behaviour: str = "ok") -> tuple[ServerProcess, str, list[int]]:
        port = free_port("127.0.0.1")
        server = ServerProcess(
            [sys.executable, str(script), "--port", str(port)],
            env={"PATH": "/usr/bin:/bin", "FAKE_SERVER_BEHAVIOUR": behaviour},
            log_path=tmp_path / "server.log",
            cwd=tmp_path,
        )
        started.append(server)
        return server, f"http://127.0.0.1:{port}", [server.pid]

    yield start
    for server in started:
        server.stop(grace_s=1)


def test_healthy_server_checks_and_clean_stop(fake) -> None:  # type: ignore[no-untyped-def]
    server, url, _ = fake("ok")
    server.wait_healthy(url, timeout_s=30, poll_s=0.1)
    children = psutil.Process(server.pid).children(recursive=True)
    assert children, "the fake server should have a grandchild like vLLM's engine"
    results = run_checks(url, "tiny", "The capital of France is", 4, chat=True, timeout_s=10)
    assert [r.endpoint for r in results] == [
        "/v1/models",
        "/v1/completions",
        "/v1/chat/completions",
    ]
    assert all(r.ok for r in results)
    assert results[1].text == " Paris." and results[1].completion_tokens == 4
    assert results[1].tokens_per_s and results[1].tokens_per_s > 0
    server.stop(grace_s=5)
    assert not psutil.pid_exists(server.pid) or psutil.Process(server.pid).status() == "zombie"
    for child in children:
        assert not child.is_running() or child.status() == "zombie"


def test_sigkill_after_grace_when_sigterm_is_ignored(fake) -> None:  # type: ignore[no-untyped-def]
    server, url, _ = fake("stubborn")
    server.wait_healthy(url, timeout_s=30, poll_s=0.1)
    children = psutil.Process(server.pid).children(recursive=True)
    server.stop(grace_s=0.5)
    assert server.process.returncode == -9
    for child in children:
        assert not child.is_running() or child.status() == "zombie"


def test_exit_during_start_is_one_line_with_the_cause_and_the_log(fake) -> None:  # type: ignore[no-untyped-def]
    server, url, _ = fake("crash")
    with pytest.raises(StageError) as info:
        server.wait_healthy(url, timeout_s=30, poll_s=0.1)
    first, *rest = str(info.value).splitlines()
    assert "exited with code 3 during start" in first
    assert "out of memory" in first
    assert any("CUDA out of memory" in line for line in rest)


def test_start_timeout(fake) -> None:  # type: ignore[no-untyped-def]
    server, url, _ = fake("never")
    with pytest.raises(StageError, match="not healthy after 1 s"):
        server.wait_healthy(url, timeout_s=1, poll_s=0.1)


def test_failed_check_is_reported(fake) -> None:  # type: ignore[no-untyped-def]
    server, url, _ = fake("badchat")
    server.wait_healthy(url, timeout_s=30, poll_s=0.1)
    results = run_checks(url, "tiny", "hi", 2, chat=True, timeout_s=10)
    with pytest.raises(StageError, match="/v1/chat/completions"):
        raise_on_failed(results, "see the log")


def test_busy_port_is_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(StageError, match=f"port {port} on 127.0.0.1 is busy"):
            ensure_port_free("127.0.0.1", port)


@pytest.mark.parametrize(
    ("log", "cause"),
    [
        ("ValueError: Invalid quantization method: gcu2", "unknown quantization"),
        ("OSError: [Errno 98] Address already in use", "port busy"),
        (
            "ValueError: gcu quantization: quant_model_description.json has no entry for "
            "tensor 'x'",
            "gcu quantization: quant_model_description.json has no entry for tensor 'x'",
        ),
        ("all fine", None),
    ],
)
def test_diagnose(log: str, cause: str | None) -> None:
    found = diagnose(log)
    assert (found is None) if cause is None else found.startswith(cause)
