"""Hugging Face source: the real `huggingface_hub.snapshot_download`, its cache and errors."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

from gcupipe.checksums import sha256_file
from gcupipe.errors import require
from gcupipe.hub.common import (
    HashMismatch,
    HubFetch,
    HubPublish,
    Log,
    ProgressSink,
    Published,
    unchanged,
)
from gcupipe.hub.manifest import git_blob_sha1_file

NAME = "huggingface"
DEFAULT_REVISION = "main"
TOKEN_ENV = "HF_TOKEN"
PUBLIC_ENDPOINT = "https://huggingface.co"
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_TRUE = {"1", "true", "yes", "on"}


def endpoint(configured: str | None) -> str | None:
    """The config's endpoint, else HF_ENDPOINT read now (the client reads it only at import)."""
    return configured or os.environ.get("HF_ENDPOINT") or None


def describe_endpoint(configured: str | None) -> str:
    return endpoint(configured) or PUBLIC_ENDPOINT


def env_cache_dir() -> Path | None:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return None


def env_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def cached_snapshot(
    cache_dir: Path, repo_id: str, revision: str, repo_type: str = "model"
) -> Path | None:
    """The cached snapshot for a branch (through refs/) or a commit; reads the disk only."""
    repo_dir = cache_dir / (f"{repo_type}s--" + repo_id.replace("/", "--"))
    commit = revision
    ref = repo_dir / "refs" / revision
    if ref.is_file():
        commit = ref.read_text().strip()
    path = repo_dir / "snapshots" / commit
    return path if path.is_dir() and any(path.iterdir()) else None


def fetch(request: HubFetch, sink: ProgressSink | None) -> tuple[Path, bool]:
    """Fetch the snapshot and check each selected file against the hash the hub published
    (the blob name in the cache: sha256 for LFS files, the git blob id for the others).

    The client itself only checks sizes, so this check is what catches corrupted bytes; a bad
    blob is deleted from the cache so the next run fetches it again."""
    hf = require("huggingface_hub", "hub")
    kwargs = dict(
        repo_id=request.repo_id,
        repo_type=request.repo_type,
        revision=request.revision,
        cache_dir=str(request.cache_dir),
        allow_patterns=request.allow_patterns,
        ignore_patterns=request.ignore_patterns,
        endpoint=request.endpoint,
        token=request.token or False,
        max_workers=request.max_workers,
        tqdm_class=_tqdm_class(sink) if sink is not None else None,
    )
    pinned = _COMMIT_RE.fullmatch(request.revision) is not None
    if request.offline or (
        pinned
        and cached_snapshot(request.cache_dir, request.repo_id, request.revision, request.repo_type)
    ):
        try:  # a commit never changes: a cached one needs no network at all
            path = hf.snapshot_download(**kwargs, local_files_only=True)
        except Exception:
            if request.offline:
                raise
            path = hf.snapshot_download(**kwargs)
    else:
        path = hf.snapshot_download(**kwargs)
    return Path(path), True


def list_files(request: HubFetch) -> list[str]:
    """The repository's file paths at the request's revision, from the hub's tree listing
    (nothing downloaded)."""
    hf = require("huggingface_hub", "hub")
    api = hf.HfApi(endpoint=request.endpoint, token=request.token or False)
    return sorted(
        api.list_repo_files(request.repo_id, revision=request.revision, repo_type=request.repo_type)
    )


def verify(model_dir: Path, files: list[str]) -> tuple[int, dict[str, str]]:
    """Check files against their blob names; returns how many were checked, and the sha256
    of those checked by sha256 (so the manifest need not hash them twice)."""
    checked = 0
    sha256: dict[str, str] = {}
    for rel in files:
        link = model_dir / rel
        if not link.is_symlink():
            continue
        blob = link.resolve()
        expected = blob.name
        if len(expected) == 64:
            actual = sha256[rel] = sha256_file(blob)
        elif len(expected) == 40:
            actual = git_blob_sha1_file(blob)
        else:
            continue
        if actual != expected:
            blob.unlink(missing_ok=True)
            link.unlink(missing_ok=True)
            raise HashMismatch(rel, expected, actual)
        checked += 1
    return checked, sha256


def _tqdm_class(sink: ProgressSink) -> type:
    """A tqdm subclass that prints nothing and feeds byte counts into our progress bar.

    The client creates bars for files fetched ("it") and for bytes ("B"); only the bytes
    bar that receives updates is routed (the one that tracks data written to disk)."""
    from tqdm.auto import tqdm

    class _ToGcupipe(tqdm):  # type: ignore[misc]
        def __init__(self, *args: object, **kwargs: object):
            kwargs["file"] = io.StringIO()
            kwargs["disable"] = False
            super().__init__(*args, **kwargs)
            self._bytes = self.unit == "B" and "Downloading bytes" not in str(self.desc)

        def update(self, n: float | None = 1) -> bool | None:
            if self._bytes and n:
                sink.set_total(int(self.total or 0))
                sink.advance(n)
            updated: bool | None = super().update(n)
            return updated

    return _ToGcupipe


def repo_url(request: HubPublish) -> str:
    base = f"{request.endpoint or PUBLIC_ENDPOINT}/{request.repo_id}"
    return base if request.revision == DEFAULT_REVISION else f"{base}/tree/{request.revision}"


def publish(request: HubPublish, folder: Path, files: list[str], log: Log) -> Published:
    """Commit `files` of `folder` to the repository (created when missing, private as asked;
    a branch other than main is created from main). When the revision already holds every
    file with the same hash, nothing is uploaded and no commit is made."""
    hf = require("huggingface_hub", "hub")
    api = hf.HfApi(endpoint=request.endpoint, token=request.token or False)
    remote = _remote_hashes(api, request)
    if remote is not None:
        local = {
            name: sha256_file(folder / name)
            if remote.get(name, ("", ""))[0] == "sha256"
            else git_blob_sha1_file(folder / name)
            for name in files
        }
        if unchanged(local, {name: digest for name, (_, digest) in remote.items()}):
            info = api.model_info(request.repo_id, revision=request.revision)
            return Published(repo_url(request), info.sha, committed=False)
    api.create_repo(request.repo_id, private=request.private, exist_ok=True)
    if request.revision != DEFAULT_REVISION:
        api.create_branch(request.repo_id, branch=request.revision, exist_ok=True)
    log(f"uploading to {repo_url(request)}")
    info = api.upload_folder(
        repo_id=request.repo_id,
        folder_path=str(folder),
        revision=request.revision,
        commit_message=request.commit_message,
        allow_patterns=files,
    )
    return Published(repo_url(request), info.oid, committed=True)


def _remote_hashes(api: object, request: HubPublish) -> dict[str, tuple[str, str]] | None:
    """path -> ("sha256", hex) for LFS files, ("sha1", git blob id) for the others; None when
    the repository or the revision does not exist yet."""
    hf_errors = require("huggingface_hub", "hub").errors
    try:
        entries = list(
            api.list_repo_tree(request.repo_id, revision=request.revision, recursive=True)  # type: ignore[attr-defined]
        )
    except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError):
        return None
    hashes: dict[str, tuple[str, str]] = {}
    for entry in entries:
        lfs = getattr(entry, "lfs", None)
        if lfs is not None:
            hashes[entry.path] = ("sha256", lfs.sha256)
        elif getattr(entry, "blob_id", None):
            hashes[entry.path] = ("sha1", entry.blob_id)
    return hashes
