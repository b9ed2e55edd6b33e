"""A digest recorded by the writer is used only while the file is the one it hashed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from gcupipe.checksums import remember_sha256, sha256_file

torch = pytest.importorskip("torch")


def _plain_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_written_shard_carries_its_digest_and_an_edit_voids_it(tmp_path: Path) -> None:
    from gcupipe.formats.base import write_safetensors

    path = tmp_path / "part.safetensors"
    write_safetensors(path, {"w": torch.arange(1000, dtype=torch.int8), "s": torch.ones(3)})
    try:
        recorded = os.getxattr(path, "user.gcupipe.sha256").decode()
    except OSError:
        pytest.skip("this file system keeps no user extended attributes")
    assert recorded.endswith(_plain_sha256(path))
    assert sha256_file(path) == _plain_sha256(path)

    with path.open("r+b") as handle:  # same size, new bytes: the record no longer applies
        handle.seek(200)
        handle.write(b"\x7f")
    os.utime(path, ns=(1, 1))
    assert sha256_file(path) == _plain_sha256(path) != recorded.rsplit(":", 1)[1]


def test_a_wrong_record_for_the_current_file_is_not_checked_but_a_stale_one_is_ignored(
    tmp_path: Path,
) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    remember_sha256(path, "0" * 64)
    try:
        os.getxattr(path, "user.gcupipe.sha256")
    except OSError:
        pytest.skip("this file system keeps no user extended attributes")
    assert sha256_file(path) == "0" * 64  # the writer's word is taken for its own file
    path.write_bytes(b"abcd")
    assert sha256_file(path) == _plain_sha256(path)
