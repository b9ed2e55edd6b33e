"""ModelScope source: the real `modelscope.snapshot_download`, its cache, and its errors."""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from gcupipe.checksums import sha256_file
from gcupipe.errors import require
from gcupipe.hub.common import (
    HubFetch,
    HubPublish,
    Log,
    NotFound,
    ProgressSink,
    Published,
    refuse_unsafe_paths,
    unchanged,
)

NAME = "modelscope"
DEFAULT_REVISION = "master"
TOKEN_ENV = "MODELSCOPE_API_TOKEN"
CACHE_ENV = "MODELSCOPE_CACHE"
PUBLIC_ENDPOINT = "https://modelscope.cn"
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")


def endpoint(configured: str | None) -> str | None:
    """The endpoint to pass to the client: the config's, else MODELSCOPE_ENDPOINT, else the
    client's own choice (which also honours the older MODELSCOPE_DOMAIN)."""
    return configured or os.environ.get("MODELSCOPE_ENDPOINT") or None


def describe_endpoint(configured: str | None) -> str:
    """The endpoint for messages (the client may pick the international site by region)."""
    domain = os.environ.get("MODELSCOPE_DOMAIN")
    return endpoint(configured) or (f"https://{domain}" if domain else PUBLIC_ENDPOINT)


def env_cache_dir() -> Path | None:
    return Path(os.environ[CACHE_ENV]).expanduser() if os.environ.get(CACHE_ENV) else None


def snapshot_dir(cache_dir: Path, repo_id: str, revision: str, repo_type: str = "model") -> Path:
    """Where the client keeps a snapshot: named by branch or tag, not by commit."""
    return cache_dir / f"{repo_type}s" / repo_id.replace("/", "--") / "snapshots" / revision


def cached_snapshot(
    cache_dir: Path, repo_id: str, revision: str, repo_type: str = "model"
) -> Path | None:
    """The snapshot directory when it already holds files; reads the disk only."""
    path = snapshot_dir(cache_dir, repo_id, revision, repo_type)
    return path if path.is_dir() and any(path.iterdir()) else None


def fetch(request: HubFetch, sink: ProgressSink | None) -> tuple[Path, bool]:
    """Fetch the snapshot; return its directory and whether the hub's hashes were checked.

    Online, the client checks every file (new or already cached) against the listing's
    Sha256, writing to a temp name first, so a corrupt or cut download never appears under
    its final name. Offline there is no listing to check against."""
    modelscope = require("modelscope", "hub")
    callbacks = [_callback_class(sink)] if sink is not None else None
    if not request.offline and _COMMIT_RE.fullmatch(request.revision):
        cached = cached_snapshot(
            request.cache_dir, request.repo_id, request.revision, request.repo_type
        )
        if cached is not None:
            try:  # a commit never changes: a cached one needs no network at all
                return fetch(replace(request, offline=True), sink)
            except Exception:  # incomplete for these patterns: fetch online below
                pass
    if not request.offline:  # the client writes listed names as given, `..` and absolute too
        where = (
            f"modelscope {request.repo_type} '{request.repo_id}' (revision '{request.revision}')"
        )
        try:
            names = list_files(request)
        except Exception as exc:
            if _status(exc) == 404:
                raise _which_missing(request, modelscope) from exc
            raise
        refuse_unsafe_paths(names, where)
    try:
        with _quiet_bars(sink is not None):
            path = modelscope.snapshot_download(
                model_id=request.repo_id,
                repo_type=request.repo_type,
                revision=request.revision,
                cache_dir=str(request.cache_dir),
                allow_patterns=request.allow_patterns,
                ignore_patterns=request.ignore_patterns,
                local_files_only=request.offline,
                token=request.token,
                endpoint=request.endpoint,
                max_workers=request.max_workers,
                progress_callbacks=callbacks,
            )
    except Exception as exc:
        if _status(exc) == 404 and not request.offline:
            raise _which_missing(request, modelscope) from exc
        raise
    return Path(path), not request.offline


@contextmanager
def _quiet_bars(quiet: bool) -> Iterator[None]:
    """Silence the client's own tqdm bars while our progress bar shows the bytes.

    The client draws them unconditionally from a module global; swapping that global is the
    only switch it offers. Restored afterwards."""
    if not quiet:
        yield
        return
    import modelscope_hub._download as client_download
    from tqdm.auto import tqdm

    original = getattr(client_download, "tqdm", None)

    class _Silent(tqdm):  # type: ignore[misc]
        def __init__(self, *args: object, **kwargs: object):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    setattr(client_download, "tqdm", _Silent)  # noqa: B010 - not an exported name
    try:
        yield
    finally:
        setattr(client_download, "tqdm", original)  # noqa: B010


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _which_missing(request: HubFetch, modelscope: object) -> NotFound:
    """A 404 on the listing means a missing repository or a missing revision; ask once more
    for the default branch to tell which (only on this error path)."""
    if request.revision == DEFAULT_REVISION:
        return NotFound(request.repo_type, request.repo_id)
    try:
        if request.repo_type == "model":
            api = modelscope.HubApi(  # type: ignore[attr-defined]
                endpoint=request.endpoint, token=request.token, max_retries=1
            )
            api.get_model_files(request.repo_id, revision=DEFAULT_REVISION, recursive=False)
        else:
            list_files(replace(request, revision=DEFAULT_REVISION))
    except Exception:
        return NotFound(request.repo_type, request.repo_id)
    return NotFound("revision", request.revision)


def list_files(request: HubFetch) -> list[str]:
    """The repository's file paths at the request's revision, from the hub's listing (one
    paged listing call, nothing downloaded)."""
    require("modelscope", "hub")
    from modelscope_hub import HubApi

    api = HubApi(token=request.token, endpoint=request.endpoint)
    entries = api.list_repo_files(request.repo_id, request.repo_type, revision=request.revision)
    return sorted(entry.path for entry in entries if entry.type != "tree")


def _callback_class(sink: ProgressSink) -> type:
    """A modelscope ProgressCallback subclass bound to our sink (the client wants a class)."""
    from modelscope.hub.callback import ProgressCallback

    class _ToGcupipe(ProgressCallback):  # type: ignore[misc]
        def __init__(self, filename: str, file_size: int):
            super().__init__(filename, file_size)
            sink.add_total(file_size)

        def update(self, size: int) -> None:
            sink.advance(size)

    return _ToGcupipe


def repo_url(request: HubPublish) -> str:
    return f"{request.endpoint or PUBLIC_ENDPOINT}/models/{request.repo_id}"


def publish(request: HubPublish, folder: Path, files: list[str], log: Log) -> Published:
    """Commit `files` of `folder` over the client's HTTP upload path (created when missing,
    private as asked). When the revision already holds every file with the same sha256,
    nothing is uploaded and no commit is made (the client itself would commit again)."""
    modelscope = require("modelscope", "hub")
    remote = _remote_sha256(request)
    if remote is not None and unchanged({n: sha256_file(folder / n) for n in files}, remote):
        return Published(repo_url(request), None, committed=False)  # the listing names none
    api = modelscope.HubApi(endpoint=request.endpoint, token=request.token)
    api.create_repo(
        request.repo_id, visibility="private" if request.private else "public", exist_ok=True
    )
    log(f"uploading to {repo_url(request)}")
    printed = io.StringIO()  # the client prints an upload report; stdout may be --json events
    with _quiet_bars(True), contextlib.redirect_stdout(printed):
        result = api.upload_folder(
            repo_id=request.repo_id,
            folder_path=str(folder),
            revision=request.revision,
            commit_message=request.commit_message,
            allow_patterns=files,
            use_cache=False,  # else the client writes its tracker into the bundle
            disable_tqdm=True,
        )
    for line in printed.getvalue().splitlines():
        if line.strip():
            log(line.rstrip())
    return Published(repo_url(request), _commit_id(result), committed=True)


def _remote_sha256(request: HubPublish) -> dict[str, str] | None:
    """path -> sha256 of the revision's files; None when the repository does not exist yet."""
    from modelscope_hub import HubApi

    api = HubApi(token=request.token, endpoint=request.endpoint)
    try:
        entries = api.list_repo_files(request.repo_id, "model", revision=request.revision)
    except Exception as exc:
        if _status(exc) == 404 or type(exc).__name__ == "NotExistError":
            return None
        raise
    return {entry.path: str(entry.sha256) for entry in entries if not entry.is_dir}


def _commit_id(result: object) -> str | None:
    """The commit of the last batch from upload_folder's reply (a dict per batch)."""
    last = result[-1] if isinstance(result, list) and result else result
    if isinstance(last, dict):
        for key in ("CommitId", "commit_id", "Id", "id"):
            if isinstance(last.get(key), str):
                return str(last[key])
    return None
