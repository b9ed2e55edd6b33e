"""Retry policy, file selection, manifests and error lines shared by every hub source."""

from __future__ import annotations

import hashlib
import json

import pytest

from gcupipe.hub.common import HashMismatch, NotFound
from gcupipe.hub.errors import hub_stage_error
from gcupipe.hub.manifest import (
    build_manifest,
    git_blob_sha1_file,
    model_files,
    select,
    write_manifest,
)
from gcupipe.hub.retry import is_transient, retry_call


class _Response:
    def __init__(self, status_code: int):
        self.status_code = status_code


class _HTTPError(Exception):
    def __init__(self, status_code: int):
        super().__init__(f"HTTP {status_code}")
        self.response = _Response(status_code)


class ConnectError(Exception):
    """Named like httpx's, which is how transient errors are recognised."""


def test_transient_errors_are_retried_with_doubling_backoff():
    calls, waits, logs = [], [], []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectError("refused")
        return "ok"

    result = retry_call(
        flaky, retries=3, backoff_s=0.5, log=logs.append, what="hf x", sleep=waits.append
    )
    assert result == "ok" and waits == [0.5, 1.0] and len(logs) == 2


def test_permanent_errors_are_not_retried_and_retries_run_out():
    waits: list[float] = []
    with pytest.raises(_HTTPError):
        retry_call(
            lambda: (_ for _ in ()).throw(_HTTPError(404)),
            retries=3,
            backoff_s=1,
            log=print,
            what="x",
            sleep=waits.append,
        )
    assert waits == []
    with pytest.raises(ConnectError):
        retry_call(
            lambda: (_ for _ in ()).throw(ConnectError()),
            retries=2,
            backoff_s=1,
            log=print,
            what="x",
            sleep=waits.append,
        )
    assert waits == [1, 2]


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (_HTTPError(503), True),
        (_HTTPError(429), True),
        (_HTTPError(401), False),
        (_HTTPError(404), False),
        (ConnectError(), True),
        (ValueError(), False),
    ],
)
def test_is_transient(error, transient):
    assert is_transient(error) is transient


def test_transient_cause_is_found_through_the_chain():
    try:
        try:
            raise ConnectError("refused")
        except ConnectError as inner:
            raise FileNotFoundError("no snapshot") from inner
    except FileNotFoundError as outer:
        assert is_transient(outer)


def test_select_matches_whole_paths_like_the_clients():
    files = ["config.json", "model.safetensors", "sub/a.json", "pytorch_model.bin"]
    assert select(files, ["*.json"], None) == ["config.json", "sub/a.json"]
    assert select(files, None, ["*.bin", "sub/*"]) == ["config.json", "model.safetensors"]
    assert select(files, None, None) == files


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.txt").write_bytes(b"abc")
    (tmp_path / "m" / ".cache").mkdir()
    (tmp_path / "m" / ".cache" / "junk").write_bytes(b"client bookkeeping")
    (tmp_path / "m" / "d").mkdir()
    (tmp_path / "m" / "d" / "b.bin").write_bytes(b"")
    assert model_files(tmp_path / "m") == ["a.txt", "d/b.bin"]
    entries = build_manifest(tmp_path / "m")
    write_manifest(
        tmp_path / "manifest.json",
        entries,
        source="local:x",
        model_dir=tmp_path / "m",
        hub_checked=0,
    )
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["files"][0] == {
        "path": "a.txt",
        "size": 3,
        "sha256": hashlib.sha256(b"abc").hexdigest(),
    }
    assert data["total_bytes"] == 3 and data["source"] == "local:x"
    # what `printf abc | git hash-object --stdin` prints
    assert git_blob_sha1_file(tmp_path / "m" / "a.txt") == (
        "f2ba8f84ab5c1bce84a7b441cb1959cfc7093b7f"
    )


def _line(exc: BaseException, **overrides):  # type: ignore[no-untyped-def]
    fields = dict(
        hub="modelscope",
        repo_id="org/m",
        revision="master",
        endpoint="http://hub",
        token_env="MS_TOKEN",
        offline=False,
        cache_dir="/c",
        attempts=1,
    )
    return str(hub_stage_error(exc, **{**fields, **overrides}))


def test_error_lines_say_what_and_what_to_do():
    assert "'org/m' was not found on http://hub" in _line(NotFound("model"))
    assert "revision 'v2' does not exist" in _line(NotFound("revision"), revision="v2")
    assert "set $MS_TOKEN" in _line(_HTTPError(401))
    assert "'w.bin' failed its sha256 check" in _line(HashMismatch("w.bin", "a" * 64, "b" * 64))
    assert "cannot reach http://hub" in _line(ConnectError(), attempts=4)
    assert "after 4 attempt(s)" in _line(ConnectError(), attempts=4)
    assert "failed: boom" in _line(RuntimeError("boom\nsecond line"))
    for message in (_line(_HTTPError(401)), _line(RuntimeError("a\nb"))):
        assert "\n" not in message


def test_dns_failure_is_not_retried_and_says_so():
    import socket

    try:
        try:
            raise socket.gaierror(-2, "Name or service not known")
        except socket.gaierror as inner:
            raise ConnectError("cannot connect") from inner
    except ConnectError as outer:
        assert not is_transient(outer)
        assert "does not resolve (DNS)" in _line(outer)
