"""A small model hub on 127.0.0.1 speaking the few ModelScope and Hugging Face endpoints.

The real `modelscope` and `huggingface_hub` clients are pointed at it, so tests exercise the
clients we ship against, not a mock of them. It serves model repositories and dataset
repositories (a separate namespace on both hubs, as on the real ones). Every request is
recorded, and knobs make the hub misbehave the ways real hubs do: a corrupted file, a missing
model or revision, a bad token, a connection dropped in the middle of a file. The endpoints
are those listed in shared/HUBS.md.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

BLOB_UPLOAD = "blob-upload"
"""The path the blob hrefs of both hubs' batch answers point at: PUT /blob-upload/<sha256>."""
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
    """A repository: its default branch's files and commit, the names that branch answers to,
    other branches, and the commits that uploads made."""

    repo_id: str
    files: dict[str, bytes]
    branches: tuple[str, ...] = ("master", "main")
    commit: str = ""
    private: bool = False
    refs: dict[str, tuple[str, dict[str, bytes]]] = field(default_factory=dict)
    """Other branches: name -> (commit, files)."""
    commits: list[str] = field(default_factory=list)
    """Commits made through the upload endpoints, oldest first."""

    def __post_init__(self) -> None:
        if not self.commit:
            self.commit = _commit_id("", self.files, "")

    def resolves(self, revision: str) -> bool:
        return self.snapshot(revision) is not None

    def snapshot(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        """(commit, files) at a branch name or commit id; None when it has neither."""
        if revision in self.branches or revision == self.commit:
            return self.commit, self.files
        for commit, files in self.refs.values():
            if revision == commit:
                return commit, files
        return self.refs.get(revision)

    def apply(self, revision: str, changes: dict[str, bytes | None], message: str) -> str:
        """Commit `changes` (path -> bytes, None deletes) on a branch; returns the commit."""
        base = self.snapshot(revision)
        assert base is not None
        files = {**base[1]}
        for path, data in changes.items():
            if data is None:
                files.pop(path, None)
            else:
                files[path] = data
        commit = _commit_id(base[0], files, message)
        if revision in self.branches:
            self.commit, self.files = commit, files
        else:
            self.refs[revision] = (commit, files)
        self.commits.append(commit)
        return commit


def _commit_id(parent: str, files: dict[str, bytes], message: str) -> str:
    digest = hashlib.sha1(f"{parent}\0{message}\0".encode())
    for path in sorted(files):
        digest.update(path.encode() + b"\0" + files[path])
    return digest.hexdigest()


@dataclass
class LoopbackHub:
    """A threaded HTTP hub. Use as a context manager; `url` is its endpoint."""

    repos: dict[str, Repo] = field(default_factory=dict)
    datasets: dict[str, Repo] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    corrupt: set[str] = field(default_factory=set)
    """Paths served with one flipped byte (the listing still has the true hash)."""
    oversize: set[str] = field(default_factory=set)
    """Paths served with 64 KB more than the listing announces (size and hash of the true file)."""
    drop_once: set[str] = field(default_factory=set)
    """Paths whose next GET sends half the bytes, then closes the connection."""
    slow: dict[str, float] = field(default_factory=dict)
    """Paths whose bytes take this many seconds to send (so that downloads overlap)."""
    fail_once: dict[str, int] = field(default_factory=dict)
    """Paths whose next GET is answered with this status instead (503, 429: a busy hub), with
    `Retry-After: 0`."""
    token: str | None = None
    """When set, every request must carry `Authorization: Bearer <token>`, else 401."""
    drop_upload_once: set[str] = field(default_factory=set)
    """Upload steps ("commit", "blob") whose next request is read, then the connection closed
    without an answer."""
    blobs: dict[str, bytes] = field(default_factory=dict)
    """Uploaded large files by sha256 (both hubs' LFS-style blob stores)."""

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

    def _take_drop_upload(self, step: str) -> bool:
        with self._lock:
            if step in self.drop_upload_once:
                self.drop_upload_once.discard(step)
                return True
            return False

    def _take_failure(self, path: str) -> int | None:
        with self._lock:
            return self.fail_once.pop(path, None)

    def _take_drop(self, path: str) -> bool:
        with self._lock:
            if path in self.drop_once:
                self.drop_once.discard(path)
                return True
            return False

    def content(self, files: dict[str, bytes], path: str) -> bytes:
        data = files[path]
        if path in self.corrupt and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        if path in self.oversize:
            data = data + bytes(64 << 10)
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

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    # -- routing --------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        query = parse_qs(parts.query)
        self.hub._record(Request(method, path, query, self.headers.get("Authorization")))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        segments = path.strip("/").split("/")
        presigned = segments[0] == BLOB_UPLOAD  # the HF client sends no token with the bytes
        if self.hub.token is not None and not presigned:
            if self.headers.get("Authorization") != f"Bearer {self.hub.token}":
                self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
                return
        if method in ("POST", "PUT"):
            self._upload(method, segments, body)
            return
        if segments[:3] in (["api", "v1", "models"], ["api", "v1", "datasets"]) and (
            len(segments) >= 6
        ):
            self._modelscope(segments, query)
        elif segments[:2] in (["api", "models"], ["api", "datasets"]) and len(segments) >= 5:
            self._hf_api(segments, query)
        elif segments[:2] == ["api", "models"] and len(segments) == 4:  # model info, no revision
            self._hf_api([*segments, "revision", "main"], query)
        elif "resolve" in segments:
            self._hf_resolve(method, segments)
        else:
            self._error(404, "EntryNotFound", f"no route {path}")

    def _repo(
        self, repo_id: str, revision: str, kind: str, repo_type: str = "model"
    ) -> tuple[Repo, str, dict[str, bytes]] | None:
        """The repository and its (commit, files) at `revision`, else a 404 sent."""
        repos = self.hub.datasets if repo_type == "dataset" else self.hub.repos
        repo = repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found", kind)
            return None
        snapshot = repo.snapshot(revision)
        if snapshot is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", kind)
            return None
        return repo, *snapshot

    # -- ModelScope -----------------------------------------------------------------------
    def _modelscope(self, segments: list[str], query: dict[str, list[str]]) -> None:
        # /api/v1/models/{org}/{name}/repo[/files]  |  /api/v1/datasets/{org}/{name}/repo[/tree]
        repo_type = "dataset" if segments[2] == "datasets" else "model"
        repo_id = f"{segments[3]}/{segments[4]}"
        revision = query.get("Revision", ["master"])[0]
        found = self._repo(repo_id, revision, "modelscope", repo_type)
        if found is None:
            return
        _, commit, files_at = found
        listing = ["repo", "tree"] if repo_type == "dataset" else ["repo", "files"]
        if segments[5:] == listing:
            files = [
                {
                    "Path": path,
                    "Name": path.rsplit("/", 1)[-1],
                    "Type": "blob",
                    "Size": len(data),
                    "Sha256": hashlib.sha256(data).hexdigest(),
                    "Revision": commit,
                }
                for path, data in sorted(files_at.items())
            ]
            if "PageSize" in query:  # the dataset tree pages: PageNumber from 1
                size = int(query["PageSize"][0])
                start = (int(query.get("PageNumber", ["1"])[0]) - 1) * size
                files = files[start : start + size]
            self._json({"Code": 200, "Success": True, "Data": {"Files": files}})
        elif segments[5:] == ["repo"] and "FilePath" in query:
            file_path = query["FilePath"][0]
            if file_path not in files_at:
                self._error(404, "EntryNotFound", f"file {file_path} not found", "modelscope")
                return
            self._bytes(file_path, self.hub.content(files_at, file_path), {})
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
        found = self._repo(repo_id, revision, "hf", repo_type)
        if found is None:
            return
        repo, commit, files_at = found
        if action == "revision":
            siblings = [{"rfilename": path} for path in sorted(files_at)]
            self._json(
                {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": commit,
                    "siblings": siblings,
                    "private": repo.private,
                }
            )
        elif action == "tree":
            entries = []
            for path, data in sorted(files_at.items()):
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
        found = self._repo(repo_id, revision, "hf", repo_type)
        if found is None:
            return
        _, commit, files_at = found
        if file_path not in files_at:
            self._error(404, "EntryNotFound", f"{file_path} does not exist", "hf")
            return
        true_data = files_at[file_path]
        lfs = file_path.endswith(LFS_SUFFIXES)
        etag = hashlib.sha256(true_data).hexdigest() if lfs else git_blob_sha1(true_data)
        headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"'}
        if lfs:
            headers["X-Linked-Etag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(len(true_data))
        data = self.hub.content(files_at, file_path)
        if method == "HEAD":
            self.send_response(200)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return
        self._bytes(file_path, data, headers)

    # -- uploads: both hubs' create, blob and commit endpoints (shared/HUBS.md) ---------------
    def _upload(self, method: str, segments: list[str], body: bytes) -> None:
        if method == "PUT" and segments[0] == BLOB_UPLOAD and len(segments) == 2:
            self._blob_put(segments[1], body)
        elif segments == ["api", "repos", "create"]:
            self._hf_create(json.loads(body))
        elif segments == ["api", "validate-yaml"]:
            self._json({})
        elif segments[:2] == ["api", "models"] and len(segments) >= 6:
            repo_id, action, revision = "/".join(segments[2:4]), segments[4], "/".join(segments[5:])
            if action == "preupload":
                self._hf_preupload(repo_id, revision, json.loads(body))
            elif action == "commit":
                self._hf_commit(repo_id, revision, body)
            elif action == "branch":
                self._hf_branch(repo_id, revision)
            else:
                self._error(404, "EntryNotFound", f"no route {action}")
        elif (
            len(segments) == 6
            and segments[1].endswith(".git")
            and segments[2:]
            == [
                "info",
                "lfs",
                "objects",
                "batch",
            ]
        ):
            repo_id = f"{segments[0]}/{segments[1].removesuffix('.git')}"
            if self._known(repo_id, "hf"):
                self._json({"objects": self._blob_actions(json.loads(body)["objects"])})
        elif segments == ["api", "v1", "models"]:
            self._ms_create(json.loads(body))
        elif segments[:4] == ["api", "v1", "repos", "models"] and len(segments) >= 7:
            repo_id, rest = "/".join(segments[4:6]), segments[6:]
            if not self._known(repo_id, "modelscope"):
                return
            if rest == ["info", "lfs", "objects", "batch"]:
                objects = self._blob_actions(json.loads(body)["objects"])
                self._json({"Code": 200, "Success": True, "Data": {"objects": objects}})
            elif rest[0] == "commit" and len(rest) >= 2:
                self._ms_commit(repo_id, "/".join(rest[1:]), json.loads(body))
            else:
                self._error(404, "EntryNotFound", "no such endpoint", "modelscope")
        else:
            self._error(404, "EntryNotFound", f"no route {'/'.join(segments)}")

    def _known(self, repo_id: str, kind: str) -> bool:
        if repo_id in self.hub.repos:
            return True
        self._error(404, "RepoNotFound", f"Repository {repo_id} not found", kind)
        return False

    def _drop(self, step: str) -> bool:
        """Close the connection without an answer, once, for an upload step a test names."""
        if not self.hub._take_drop_upload(step):
            return False
        self.close_connection = True
        self.connection.shutdown(2)
        return True

    def _blob_actions(self, objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each blob the store lacks gets an upload href; a stored one gets no `actions`."""
        answer = []
        for item in objects:
            entry: dict[str, Any] = {"oid": item["oid"], "size": item["size"]}
            if item["oid"] not in self.hub.blobs:
                href = f"{self.hub.url}/{BLOB_UPLOAD}/{item['oid']}"
                entry["actions"] = {"upload": {"href": href}}
            answer.append(entry)
        return answer

    def _blob_put(self, oid: str, body: bytes) -> None:
        if self._drop("blob"):
            return
        if hashlib.sha256(body).hexdigest() != oid:
            self._error(400, "BadRequest", f"the bytes do not hash to {oid}")
            return
        with self.hub._lock:
            self.hub.blobs[oid] = body
        self._json({})

    def _new_repo(self, repo_id: str, private: bool, files: dict[str, bytes]) -> bool:
        with self.hub._lock:
            if repo_id in self.hub.repos:
                return False
            self.hub.repos[repo_id] = Repo(repo_id, files, private=private)
            return True

    # Hugging Face
    def _hf_create(self, request: dict[str, Any]) -> None:
        repo_id = f"{request.get('organization')}/{request['name']}"
        url = f"{self.hub.url}/{repo_id}"
        attributes = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
        if not self._new_repo(repo_id, request.get("visibility") == "private", attributes):
            self._json({"error": "You already created this model repo", "url": url}, 409)
            return
        self._json({"url": url})

    def _hf_preupload(self, repo_id: str, revision: str, request: dict[str, Any]) -> None:
        found = self._repo(repo_id, revision, "hf")
        if found is None:
            return
        _, _, files_at = found
        answer = []
        for item in request["files"]:
            path = item["path"]
            lfs = path.endswith(LFS_SUFFIXES) or item["size"] > 10_000_000
            entry: dict[str, Any] = {
                "path": path,
                "uploadMode": "lfs" if lfs else "regular",
                "shouldIgnore": False,
            }
            if path in files_at:
                data = files_at[path]
                entry["oid"] = hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data)
            answer.append(entry)
        self._json({"files": answer})

    def _hf_commit(self, repo_id: str, revision: str, body: bytes) -> None:
        if self._drop("commit"):
            return
        found = self._repo(repo_id, revision, "hf")
        if found is None:
            return
        repo = found[0]
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        message = ""
        changes: dict[str, bytes | None] = {}
        for line in lines:
            value = line["value"]
            if line["key"] == "header":
                message = value.get("summary", "")
            elif line["key"] == "file":
                changes[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.hub.blobs:
                    self._error(400, "BadRequest", f"LFS object {value['oid']} was never uploaded")
                    return
                changes[value["path"]] = self.hub.blobs[value["oid"]]
            elif line["key"] in ("deletedFile", "deletedFolder"):
                changes[value["path"]] = None
        with self.hub._lock:
            commit = repo.apply(revision, changes, message)
        self._json(
            {
                "commitUrl": f"{self.hub.url}/{repo_id}/commit/{commit}",
                "commitOid": commit,
                "pullRequestUrl": None,
            }
        )

    def _hf_branch(self, repo_id: str, branch: str) -> None:
        if not self._known(repo_id, "hf"):
            return
        repo = self.hub.repos[repo_id]
        with self.hub._lock:
            if repo.snapshot(branch) is not None:
                self._error(409, "Conflict", f"branch {branch} exists")
                return
            repo.refs[branch] = (repo.commit, dict(repo.files))
        self._json({})

    # ModelScope
    def _ms_create(self, request: dict[str, Any]) -> None:
        repo_id = f"{request['Path']}/{request['Name']}"
        private = str(request.get("Visibility")) in ("1", "private")
        if not self._new_repo(repo_id, private, {}):
            self._json({"Code": 10010101001, "Success": False, "Message": "model exists"}, 409)
            return
        self._json({"Code": 200, "Success": True, "Data": {"Path": request["Path"]}})

    def _ms_commit(self, repo_id: str, revision: str, request: dict[str, Any]) -> None:
        if self._drop("commit"):
            return
        repo = self.hub.repos[repo_id]
        if repo.snapshot(revision) is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", "modelscope")
            return
        changes: dict[str, bytes | None] = {}
        for action in request["actions"]:
            if action["action"] == "delete":
                changes[action["path"]] = None
            elif action["type"] == "lfs":
                if action["sha256"] not in self.hub.blobs:
                    self._error(400, "BadRequest", "blob was never uploaded", "modelscope")
                    return
                changes[action["path"]] = self.hub.blobs[action["sha256"]]
            else:
                changes[action["path"]] = base64.b64decode(action["content"])
        with self.hub._lock:
            commit = repo.apply(revision, changes, request.get("commit_message", ""))
        self._json({"Code": 200, "Success": True, "Data": {"CommitId": commit}})

    # -- responses ------------------------------------------------------------------------
    def _bytes(self, path: str, data: bytes, headers: dict[str, str]) -> None:
        status = self.hub._take_failure(path)
        if status is not None:
            body = b'{"error": "the hub is busy, try again"}'
            self.send_response(status)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
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
        seconds = self.hub.slow.get(path)
        if seconds:
            step = max(1, len(data) // 20)
            for start in range(0, len(data), step):
                self.wfile.write(data[start : start + step])
                self.wfile.flush()
                time.sleep(seconds / 20)
            return
        self.wfile.write(data)

    def _json(self, payload: Any, status: int = 200) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
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
