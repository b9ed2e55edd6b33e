"""Turn whatever a hub client raised into one StageError line: what failed and what to do."""

from __future__ import annotations

import re

from gcupipe.errors import StageError
from gcupipe.hub.common import HashMismatch, NotFound
from gcupipe.hub.retry import is_transient, status_code, unresolvable

_HASH_RE = re.compile(r"Hash mismatch for (\S+?):")


def hub_stage_error(
    exc: BaseException,
    *,
    hub: str,
    repo_id: str,
    revision: str,
    endpoint: str,
    token_env: str,
    offline: bool,
    cache_dir: str,
    attempts: int,
    kind: str = "model",
    action: str = "download",
) -> StageError:
    """One line naming the model (or dataset: `kind`), the endpoint and the fix, for a
    download or a publish (`action`). Never includes the token."""
    where = f"{hub} {kind} '{repo_id}' (revision '{revision}')"
    names = {type(link).__name__ for link in _chain(exc)}
    text = " ".join(str(link) for link in _chain(exc))

    mismatch = next((link for link in _chain(exc) if isinstance(link, HashMismatch)), None)
    bad_file = mismatch.path if mismatch else (m.group(1) if (m := _HASH_RE.search(text)) else None)
    if bad_file is not None:
        return StageError(
            f"{where}: file '{bad_file}' failed its sha256 check against the hash {endpoint} "
            "published; the bad copy was discarded. Retry later, or report the file to the hub."
        )
    if offline and names & {"LocalEntryNotFoundError", "CacheNotFound", "OfflineModeIsEnabled"}:
        return StageError(
            f"{where} is not in the cache at {cache_dir} and offline is on: "
            "run once with network access (offline: false) to fill the cache."
        )
    code = status_code(exc)
    if code in (401, 403):
        return StageError(
            f"{where}: {endpoint} refused access (HTTP {code}): set ${token_env} to a token "
            f"that can {'write' if action == 'publish' else 'read'} this {kind} (or check the "
            f"{kind} id)."
        )
    not_found = next((link for link in _chain(exc) if isinstance(link, NotFound)), None)
    if not_found is not None:
        names.add(
            {
                "model": "RepositoryNotFoundError",
                "dataset": "RepositoryNotFoundError",
                "revision": "RevisionNotFoundError",
                "file": "EntryNotFoundError",
            }.get(not_found.what, "NotFound")
        )
    if (
        code == 404
        or not_found
        or names
        & {
            "RepositoryNotFoundError",
            "RevisionNotFoundError",
            "EntryNotFoundError",
            "NotExistError",
        }
    ):
        return StageError(_not_found(where, repo_id, revision, endpoint, names, kind))
    if unresolvable(exc):
        return StageError(
            f"{where}: the host of {endpoint} does not resolve (DNS): check the network, the "
            "endpoint setting, or use offline: true with a filled cache."
        )
    if is_transient(exc):
        fix = (
            "check the network or the endpoint setting, then publish again (files only land "
            "with a commit)"
            if action == "publish"
            else "check the network, the endpoint setting, or use offline: true with a filled cache"
        )
        return StageError(
            f"{where}: cannot reach {endpoint} ({_cause_name(exc)}) after {attempts} "
            f"attempt(s): {fix}."
        )
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    failed = getattr(exc, "failed_files", None)  # ModelScope's FileDownloadError names them
    if isinstance(failed, dict) and failed:
        name, why = next(iter(failed.items()))
        why_line = str(why).strip().splitlines()[0] if str(why).strip() else type(why).__name__
        first_line += f"; first: '{name}': {why_line}"
    return StageError(f"{where}: {action} on {endpoint} failed: {first_line}")


def _not_found(
    where: str, repo_id: str, revision: str, endpoint: str, names: set[str], kind: str
) -> str:
    if "RevisionNotFoundError" in names:
        return (
            f"{where}: revision '{revision}' does not exist on {endpoint}: "
            "check the branch, tag or commit name."
        )
    if "EntryNotFoundError" in names and "RepositoryNotFoundError" not in names:
        return f"{where}: a file listed by {endpoint} could not be fetched (404): retry later."
    if "RepositoryNotFoundError" not in names:
        return (
            f"{where} was not found on {endpoint} (HTTP 404): check the {kind} id (org/name) "
            "and the revision."
        )
    return (
        f"{where}: {kind} '{repo_id}' was not found on {endpoint}: check the id (org/name), "
        "or set a token if it is private."
    )


def _cause_name(exc: BaseException) -> str:
    chain = _chain(exc)
    return type(chain[-1]).__name__ if chain else type(exc).__name__


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and link not in seen:
        seen.append(link)
        link = link.__cause__ or link.__context__
    return seen
