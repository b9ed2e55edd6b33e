"""A small model hub on 127.0.0.1 speaking the few ModelScope and Hugging Face endpoints.

The real `modelscope` and `huggingface_hub` clients are pointed at it, so tests exercise the
clients we ship against, not a mock of them. It serves model repositories and dataset
repositories (a separate namespace on both hubs, as on the real ones). Every request is
recorded, and knobs make the hub misbehave the ways real hubs do: a corrupted file, a missing
model or revision, a bad token, a connection dropped in the middle of a file. The endpoints
are those listed in shared/HUBS.md.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".parquet", ".arrow")
"""Files the fake HF hub reports as LFS (with a sha256), like large weight files on the real one."""


@dataclass(frozen=True)
class Request:
    """One request the hub received."""

    method: str
    path: str
    query: dict[str, list[str]]
    authorization: str | None

    @property
    def is_file(self) -> bool:
        """True when the request asks for a file's bytes (GET of a file, either protocol)."""
        if self.method != "GET":
            return False
        modelscope_file = self.path.endswith("/repo") and "FilePath" in self.query
        return modelscope_file or "/resolve/" in self.path


@dataclass
class Repo:
    """A model repository: files by path, a commit hash, and the branch names it answers to."""

    repo_id: str
    files: dict[str, bytes]
    branches: tuple[str, ...] = ("master", "main")
    commit: str = ""

    def __post_init__(self) -> None:
        if not self.commit:
            digest = hashlib.sha1()
            for path in sorted(self.files):
                digest.update(path.encode() + b"\0" + self.files[path])
            self.commit = digest.hexdigest()

    def resolves(self, revision: str) -> bool:
        return revision in self.branches or revision == self.commit


@dataclass
class LoopbackHub:
    """A threaded HTTP hub. Use as a context manager; `url` is its endpoint."""

    repos: dict[str, Repo] = field(default_factory=dict)
    datasets: dict[str, Repo] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    corrupt: set[str] = field(default_factory=set)
    """Paths served with one flipped byte (the listing still has the true hash)."""
    drop_once: set[str] = field(default_factory=set)
    """Paths whose next GET sends half the bytes, then closes the connection."""
    token: str | None = None
    """When set, every request must carry `Authorization: Bearer <token>`, else 401."""

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- set-up ---------------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: dict[str, bytes] | Path, **kwargs: Any) -> Repo:
        """Serve `files` (a dict, or every file under a directory) as the model `repo_id`."""
        repo = Repo(repo_id, _files(files), **kwargs)
        self.repos[repo_id] = repo
        return repo

    def add_dataset(self, repo_id: str, files: dict[str, bytes] | Path, **kwargs: Any) -> Repo:
        """Serve `files` as the dataset repository `repo_id` (ModelScope /api/v1/datasets/...,
        Hugging Face /api/datasets/... and /datasets/.../resolve/...)."""
        repo = Repo(repo_id, _files(files), **kwargs)
        self.datasets[repo_id] = repo
        return repo

    @property
    def url(self) -> str:
        assert self._server is not None, "start the hub first (use it as a context manager)"
        port = self._server.server_address[1]
        return f"http://127.0.0.1:{port}"

    def __enter__(self) -> LoopbackHub:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    # -- what happened ------------------------------------------------------------------------
    def file_requests(self) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.is_file]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def _take_drop(self, path: str) -> bool:
        with self._lock:
            if path in self.drop_once:
                self.drop_once.discard(path)
                return True
            return False

    def content(self, repo: Repo, path: str) -> bytes:
        data = repo.files[path]
        if path in self.corrupt and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return data


def _files(files: dict[str, bytes] | Path) -> dict[str, bytes]:
    if isinstance(files, dict):
        return dict(files)
    return {
        p.relative_to(files).as_posix(): p.read_bytes()
        for p in sorted(files.rglob("*"))
        if p.is_file()
    }


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file, which HF reports as `oid` for non-LFS files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    hub: LoopbackHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet test output
        return

    def do_HEAD(self) -> None:  # noqa: N802 - http.server naming
        self._dispatch("HEAD")

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    # -- routing --------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        query = parse_qs(parts.query)
        self.hub._record(Request(method, path, query, self.headers.get("Authorization")))
        if self.hub.token is not None:
            if self.headers.get("Authorization") != f"Bearer {self.hub.token}":
                self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
                return
        segments = path.strip("/").split("/")
        if segments[:3] in (["api", "v1", "models"], ["api", "v1", "datasets"]) and (
            len(segments) >= 6
        ):
            self._modelscope(segments, query)
        elif segments[:2] in (["api", "models"], ["api", "datasets"]) and len(segments) >= 5:
            self._hf_api(segments, query)
        elif "resolve" in segments:
            self._hf_resolve(method, segments)
        else:
            self._error(404, "EntryNotFound", f"no route {path}")

    def _repo(
        self, repo_id: str, revision: str, kind: str, repo_type: str = "model"
    ) -> Repo | None:
        repos = self.hub.datasets if repo_type == "dataset" else self.hub.repos
        repo = repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found", kind)
            return None
        if not repo.resolves(revision):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", kind)
            return None
        return repo

    # -- ModelScope -----------------------------------------------------------------------
    def _modelscope(self, segments: list[str], query: dict[str, list[str]]) -> None:
        # /api/v1/models/{org}/{name}/repo[/files]  |  /api/v1/datasets/{org}/{name}/repo[/tree]
        repo_type = "dataset" if segments[2] == "datasets" else "model"
        repo_id = f"{segments[3]}/{segments[4]}"
        revision = query.get("Revision", ["master"])[0]
        repo = self._repo(repo_id, revision, "modelscope", repo_type)
        if repo is None:
            return
        listing = ["repo", "tree"] if repo_type == "dataset" else ["repo", "files"]
        if segments[5:] == listing:
            files = [
                {
                    "Path": path,
                    "Name": path.rsplit("/", 1)[-1],
                    "Type": "blob",
                    "Size": len(data),
                    "Sha256": hashlib.sha256(data).hexdigest(),
                    "Revision": repo.commit,
                }
                for path, data in sorted(repo.files.items())
            ]
            if "PageSize" in query:  # the dataset tree pages: PageNumber from 1
                size = int(query["PageSize"][0])
                start = (int(query.get("PageNumber", ["1"])[0]) - 1) * size
                files = files[start : start + size]
            self._json({"Code": 200, "Success": True, "Data": {"Files": files}})
        elif segments[5:] == ["repo"] and "FilePath" in query:
            file_path = query["FilePath"][0]
            if file_path not in repo.files:
                self._error(404, "EntryNotFound", f"file {file_path} not found", "modelscope")
                return
            self._bytes(file_path, self.hub.content(repo, file_path), {})
        else:
            self._error(404, "EntryNotFound", "no such endpoint", "modelscope")

    # -- Hugging Face ---------------------------------------------------------------------
    def _hf_api(self, segments: list[str], query: dict[str, list[str]]) -> None:
        # /api/{models|datasets}/{org}/{name}/revision/{rev}
        # /api/{models|datasets}/{org}/{name}/tree/{rev}[/path]
        repo_type = "dataset" if segments[1] == "datasets" else "model"
        repo_id = f"{segments[2]}/{segments[3]}"
        action, revision = segments[4], "/".join(segments[5:]) or "main"
        if action == "tree":
            revision = segments[5] if len(segments) > 5 else "main"
        repo = self._repo(repo_id, revision, "hf", repo_type)
        if repo is None:
            return
        if action == "revision":
            siblings = [{"rfilename": path} for path in sorted(repo.files)]
            self._json(
                {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": repo.commit,
                    "siblings": siblings,
                    "private": False,
                }
            )
        elif action == "tree":
            entries = []
            for path, data in sorted(repo.files.items()):
                entry: dict[str, Any] = {
                    "type": "file",
                    "path": path,
                    "size": len(data),
                    "oid": git_blob_sha1(data),
                }
                if path.endswith(LFS_SUFFIXES):
                    entry["lfs"] = {
                        "oid": hashlib.sha256(data).hexdigest(),
                        "size": len(data),
                        "pointerSize": 134,
                    }
                entries.append(entry)
            self._json(entries)
        else:
            self._error(404, "EntryNotFound", "no such endpoint", "hf")

    def _hf_resolve(self, method: str, segments: list[str]) -> None:
        # /{org}/{name}/resolve/{rev}/{path...}  |  /datasets/{org}/{name}/resolve/{rev}/{path...}
        index = segments.index("resolve")
        repo_type = "dataset" if segments[0] == "datasets" and index == 3 else "model"
        repo_id = "/".join(segments[1 if repo_type == "dataset" else 0 : index])
        revision, file_path = segments[index + 1], "/".join(segments[index + 2 :])
        repo = self._repo(repo_id, revision, "hf", repo_type)
        if repo is None:
            return
        if file_path not in repo.files:
            self._error(404, "EntryNotFound", f"{file_path} does not exist", "hf")
            return
        true_data = repo.files[file_path]
        lfs = file_path.endswith(LFS_SUFFIXES)
        etag = hashlib.sha256(true_data).hexdigest() if lfs else git_blob_sha1(true_data)
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{etag}"'}
        if lfs:
            headers["X-Linked-Etag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(len(true_data))
        data = self.hub.content(repo, file_path)
        if method == "HEAD":
            self.send_response(200)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return
        self._bytes(file_path, data, headers)

    # -- responses ------------------------------------------------------------------------
    def _bytes(self, path: str, data: bytes, headers: dict[str, str]) -> None:
        drop = self.hub._take_drop(path)
        self.send_response(200)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if drop:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(data)

    def _json(self, payload: Any) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, kind: str = "hf") -> None:
        if kind == "modelscope":
            payload: Any = {"Code": status, "Success": False, "Message": message}
        else:
            payload = {"error": message}
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def isolate_hub_clients(monkeypatch: Any) -> None:
    """For a test (pytest's monkeypatch): the real clients' own retry waits shortened, and none
    of the user's hub settings (endpoints, caches, tokens, offline) leaking in."""
    import modelscope_hub._download as ms_download
    import modelscope_hub._legacy_api as ms_legacy

    monkeypatch.setattr(ms_download, "DOWNLOAD_INTEGRITY_RETRY_BACKOFF", 0.01, raising=False)
    monkeypatch.setattr(ms_legacy, "REPO_TREE_PAGE_RETRY_MAX_DELAY_SECONDS", 0, raising=False)
    for name in (
        "MODELSCOPE_ENDPOINT",
        "MODELSCOPE_CACHE",
        "MODELSCOPE_API_TOKEN",
        "HF_ENDPOINT",
        "HF_HUB_CACHE",
        "HF_HOME",
        "HF_TOKEN",
        "HF_HUB_OFFLINE",
    ):
        monkeypatch.delenv(name, raising=False)
