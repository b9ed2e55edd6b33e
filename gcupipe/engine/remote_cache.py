"""A content-addressed stage cache on storage CI runners share (`cache: {url: s3://...}`).

Any fsspec URL works (s3://, gs://, file://); the key is the stage's cache key, which holds
its type, version, resolved config and the content digests of its upstream outputs, never a
path of one run directory. Under the URL:

    <key[:2]>/<key>.json           the entry: the stage record (outputs relative to <out>),
                                   the archive's name, sha256 and size; written last
    <key[:2]>/<key>-<random>.tar   the stage's out/ directory, links followed

An entry is read only through its .json, so an upload that died half-way is never seen; two
runners pushing the same key at once each write their own archive and the last .json wins.
A restored archive is checked against the entry's sha256 before it becomes a result."""

from __future__ import annotations

import hashlib
import json
import socket
import tarfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from gcupipe.errors import StageError, UsageError
from gcupipe.versions import package_versions

ARCHIVE_ROOT = "out"
Say = Callable[[str], None]


@dataclass(frozen=True)
class Entry:
    """What the remote cache holds for one key."""

    record: dict[str, Any]  # a StageRecord's fields, outputs relative to <out>
    archive: str
    sha256: str
    size: int
    pushed_by: str


class RemoteCache:
    def __init__(self, url: str, options: dict[str, Any] | None = None, push: bool = True):
        try:
            import fsspec
        except ImportError:  # pragma: no cover - fsspec comes with the quant extra
            raise UsageError("a remote cache needs fsspec: pip install 'gcupipe[s3]'") from None
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **(options or {}))
        except (ImportError, ValueError) as exc:
            raise UsageError(
                f"cache.url {url!r}: {exc} (s3:// needs `pip install 'gcupipe[s3]'`)"
            ) from None
        self.url = url
        self.root = root.rstrip("/")
        self.push_enabled = push

    def _path(self, name: str) -> str:
        return f"{self.root}/{name[:2]}/{name}"

    def has(self, key: str) -> bool:
        path = self._path(f"{key}.json")
        self.fs.invalidate_cache(path)  # another runner may have pushed it since we listed
        return bool(self.fs.exists(path))

    def entry(self, key: str) -> Entry | None:
        try:
            with self.fs.open(self._path(f"{key}.json"), "rb") as stream:
                data = json.loads(stream.read())
        except FileNotFoundError:
            return None
        return Entry(
            data["record"], data["archive"], data["sha256"], data["size"], data["pushed_by"]
        )

    def fetch(self, key: str, out_dir: Path, say: Say) -> Entry | None:
        """Unpack the entry of `key` into `out_dir` (which must not exist yet): the entry, or
        None when the cache has none or its archive does not match (said through `say`)."""
        entry = self.entry(key)
        if entry is None:
            return None
        say(f"restoring {entry.size / 1e6:.1f} MB from {self.url} (pushed by {entry.pushed_by})")
        with self.fs.open(self._path(entry.archive), "rb") as remote:
            reader = _Hashing(remote)
            with tarfile.open(fileobj=reader, mode="r|") as archive:  # type: ignore[call-overload]
                archive.extractall(out_dir.parent, filter=_archive_filter)
            reader.drain()
        if reader.hexdigest() != entry.sha256 or reader.size != entry.size:
            say(
                f"remote entry {key[:12]} does not match its sha256 ({reader.size} bytes read, "
                f"{entry.size} announced); running the stage instead"
            )
            return None
        if not out_dir.is_dir():
            raise StageError(f"remote entry {key[:12]} holds no {ARCHIVE_ROOT}/ directory")
        return entry

    def push(self, key: str, record: dict[str, Any], out_dir: Path, say: Say) -> None:
        """Upload one finished stage (a no-op when the cache already has its key)."""
        if not self.push_enabled or self.has(key):
            return
        archive = f"{key}-{uuid.uuid4().hex[:8]}.tar"
        started = time.monotonic()
        self.fs.makedirs(self._path(archive).rsplit("/", 1)[0], exist_ok=True)  # file://
        with self.fs.open(self._path(archive), "wb") as remote:
            writer = _Hashing(remote)
            with tarfile.open(fileobj=writer, mode="w|", dereference=True) as tar:  # type: ignore[call-overload]
                tar.add(out_dir, arcname=ARCHIVE_ROOT)
        entry = {
            "record": record,
            "archive": archive,
            "sha256": writer.hexdigest(),
            "size": writer.size,
            "pushed_by": f"gcupipe {package_versions()['gcupipe']} on {socket.gethostname()}",
        }
        with self.fs.open(self._path(f"{key}.json"), "wb") as stream:
            stream.write(json.dumps(entry, indent=2).encode())
        say(
            f"pushed {writer.size / 1e6:.1f} MB to {self.url} in {time.monotonic() - started:.1f} s"
        )


def _archive_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tarfile's `data` filter (no absolute paths, no `..`, no links out, no devices), and
    nothing outside the archive's one top directory."""
    member = tarfile.data_filter(member, dest)
    if member.name != ARCHIVE_ROOT and not member.name.startswith(ARCHIVE_ROOT + "/"):
        raise tarfile.OutsideDestinationError(member, dest)
    return member


class _Hashing:
    """A file object that hashes and counts every byte read from or written to `inner`."""

    def __init__(self, inner: IO[bytes]):
        self.inner = inner
        self._sha = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read(size)
        self._sha.update(data)
        self.size += len(data)
        return data

    def write(self, data: bytes) -> int:
        self._sha.update(data)
        self.size += len(data)
        self.inner.write(data)
        return len(data)

    def drain(self) -> None:
        """Read what the tar reader left (its end-of-archive padding) so the hash covers all."""
        while self.read(1 << 20):
            pass

    def hexdigest(self) -> str:
        return self._sha.hexdigest()
