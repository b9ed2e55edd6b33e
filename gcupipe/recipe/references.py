"""What an `extends:`/`include:` entry names: a file beside the recipe, a file shipped in an
installed Python distribution (`pkg:DIST/PATH`), or a file in a git repository at a pinned
commit (`git+URL@REV#PATH`).

A git reference is resolved once: its branch or tag becomes a commit and the file's sha256 is
recorded in `pins.json` of gcupipe's cache, beside the repositories fetched there with the git
command line. A later use reads the cached commit without the network and checks the hash;
when the cache lost the commit it fetches again, and a file whose content differs from the pin
(the tag was force-pushed) is refused until the recipe pins the new commit.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from gcupipe.checksums import sha256_file
from gcupipe.hub.package import PackageFileError, distribution_path

PACKAGE_PREFIX = "pkg:"
GIT_PREFIX = "git+"


class UnresolvedReference(Exception):
    """An entry cannot be resolved; the message is one line, the caller adds the position."""


@dataclass(frozen=True)
class Origin:
    """Where a composed file lives: names below `root` are shown as `prefix` + the path below
    it (`pkg:policy/gates/strict.yaml`), so a fragment's relative references keep its origin."""

    prefix: str = ""
    root: Path | None = None
    version: str | None = None  # the distribution's version or the git commit

    def name_of(self, path: Path) -> str:
        if self.root is not None:
            try:
                return self.prefix + path.relative_to(self.root).as_posix()
            except ValueError:
                pass
        return display_path(path)


LOCAL = Origin()


@dataclass(frozen=True)
class ComposedFile:
    """One file a recipe was composed from, as the lock file records it."""

    name: str  # as messages name it: a path, pkg:DIST/PATH or git+URL@REV#PATH
    version: str | None
    sha256: str

    def as_json(self) -> dict[str, str | None]:
        return {"file": self.name, "version": self.version, "sha256": self.sha256}


def display_path(path: Path) -> str:
    """How a local file is named in messages: relative to the working directory when below it."""
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


def resolve(name: str, beside: Path, origin: Origin) -> tuple[Path, Origin]:
    """The file an entry names (`beside` is the directory of the file that names it)."""
    if name.startswith(PACKAGE_PREFIX):
        return _package_file(name[len(PACKAGE_PREFIX) :])
    if name.startswith(GIT_PREFIX):
        return _git_file(name[len(GIT_PREFIX) :])
    return (beside / name).resolve(), origin


# -- pkg:DIST/PATH -----------------------------------------------------------------------------
def _package_file(spec: str) -> tuple[Path, Origin]:
    distribution, _, relative = spec.partition("/")
    if not distribution or not relative:
        raise UnresolvedReference(
            f"'{PACKAGE_PREFIX}{spec}' names no file: write pkg:DISTRIBUTION/PATH/IN/PACKAGE.yaml"
        )
    try:
        path = distribution_path(distribution, relative)
    except PackageFileError as exc:
        raise UnresolvedReference(str(exc)) from None
    installed = importlib.metadata.distribution(distribution)
    root = Path(str(installed.locate_file(""))).resolve()
    return path, Origin(f"{PACKAGE_PREFIX}{distribution}/", root, installed.version)


# -- git+URL@REV#PATH --------------------------------------------------------------------------
def cache_home() -> Path:
    """gcupipe's per-user cache: $GCUPIPE_CACHE_HOME, else $XDG_CACHE_HOME/gcupipe, else
    ~/.cache/gcupipe."""
    explicit = os.environ.get("GCUPIPE_CACHE_HOME")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gcupipe"


def _git_file(spec: str) -> tuple[Path, Origin]:
    location, _, path = spec.rpartition("#")
    url, _, revision = location.rpartition("@")
    if not location or not path or not revision or not (":" in url or "/" in url):
        raise UnresolvedReference(
            f"'{GIT_PREFIX}{spec}' is not a git reference: write git+URL@REVISION#PATH/FILE.yaml "
            "(REVISION a commit, tag or branch)"
        )
    return _GitCache(cache_home() / "recipes" / "git").file(url, revision, path)


class _GitCache:
    def __init__(self, root: Path):
        self.root = root
        self.pins_file = root / "pins.json"

    def file(self, url: str, revision: str, path: str) -> tuple[Path, Origin]:
        label = f"{GIT_PREFIX}{url}@{revision}#{path}"
        repo = self.root / "repos" / (hashlib.sha256(url.encode()).hexdigest()[:16] + ".git")
        pins = self._pins()
        pin = pins.get(label)
        commit = pin["commit"] if pin and self._has_commit(repo, pin["commit"]) else None
        if commit is None:
            self._fetch(repo, url)
            commit = self._commit_of(repo, url, revision)
        tree = self._tree(repo, commit)
        file = tree / PurePosixPath(path)
        if not file.is_file():
            raise UnresolvedReference(
                f"{url} has no file {path} at {revision} (commit {commit[:12]})"
            )
        sha = sha256_file(file)
        if pin and sha != pin["sha256"]:
            raise UnresolvedReference(
                f"{label} changed since it was pinned: sha256 {pin['sha256'][:12]} at commit "
                f"{pin['commit'][:12]}, now {sha[:12]} at {commit[:12]} (history rewritten or the "
                f"cache altered); review the change, then pin it as @{commit}"
            )
        if pin != {"commit": commit, "sha256": sha}:
            pins[label] = {"commit": commit, "sha256": sha}
            self._write_pins(pins)
        return file, Origin(f"{GIT_PREFIX}{url}@{revision}#", tree, commit)

    def _pins(self) -> dict[str, dict[str, str]]:
        try:
            pins = json.loads(self.pins_file.read_text())
        except (OSError, ValueError):
            return {}
        return pins if isinstance(pins, dict) else {}

    def _write_pins(self, pins: dict[str, dict[str, str]]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        partial = self.pins_file.with_name(f".pins.{os.getpid()}.json")
        partial.write_text(json.dumps(pins, indent=2, sort_keys=True) + "\n")
        os.replace(partial, self.pins_file)

    def _has_commit(self, repo: Path, commit: str) -> bool:
        if not repo.is_dir():
            return False
        return _git(repo, "cat-file", "-e", f"{commit}^{{commit}}", check=False).returncode == 0

    def _fetch(self, repo: Path, url: str) -> None:
        if not repo.is_dir():
            repo.parent.mkdir(parents=True, exist_ok=True)
            partial = Path(tempfile.mkdtemp(prefix=".init-", dir=repo.parent))
            _git(partial, "init", "--quiet", "--bare")
            os.replace(partial, repo)
        refs = ["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"]
        done = _git(repo, "fetch", "--quiet", "--prune", "--force", url, *refs, check=False)
        if done.returncode != 0:
            said = [line for line in done.stderr.splitlines() if line.startswith("fatal: ")]
            reason = said[0].removeprefix("fatal: ") if said else done.stderr.strip()
            raise UnresolvedReference(f"cannot fetch {url}: {reason or 'git fetch failed'}")

    def _commit_of(self, repo: Path, url: str, revision: str) -> str:
        found = _git(
            repo, "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}", check=False
        )
        if found.returncode != 0:
            raise UnresolvedReference(
                f"{url} has no revision {revision} (no such branch, tag or commit; "
                "a commit removed by a force-push is gone too)"
            )
        return str(found.stdout).strip()

    def _tree(self, repo: Path, commit: str) -> Path:
        """The files of `commit`, extracted once (a commit never changes)."""
        tree = self.root / "trees" / commit
        if tree.is_dir():
            return tree
        archive = _git(repo, "archive", "--format=tar", commit, text=False).stdout
        tree.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{commit[:12]}-", dir=tree.parent))
        try:
            with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
                tar.extractall(partial, filter="data")
            os.replace(partial, tree)
        except OSError:
            shutil.rmtree(partial, ignore_errors=True)
            if not tree.is_dir():
                raise
        return tree


def _git(
    repo: Path, *args: str, check: bool = True, text: bool = True
) -> subprocess.CompletedProcess[Any]:
    command = ["git", "--git-dir", str(repo), *args]
    environment = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    try:
        done = subprocess.run(command, capture_output=True, text=text, env=environment)
    except FileNotFoundError:
        raise UnresolvedReference("git references need the git command line: install git") from None
    if check and done.returncode != 0:
        error = done.stderr if text else done.stderr.decode(errors="replace")
        raise UnresolvedReference(f"git {args[0]} failed: {error.strip()}")
    return done
