"""Hub datasets: one split's texts, fetched by the same ModelScope / Hugging Face sources as models.

Only the split's data files are downloaded (a glob on the split name), with the same client,
cache, endpoint/token variables, retries, hash checks and one-line errors as the download
stage; then `.jsonl`, `.json`, `.txt` (and `.parquet` when pyarrow is installed) are read.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from gcupipe.errors import RecipeError, StageError
from gcupipe.hub import huggingface
from gcupipe.hub.common import HashMismatch, HubFetch, ProgressSink
from gcupipe.hub.dataset_files import TEXT_SUFFIXES, read_texts
from gcupipe.hub.errors import hub_stage_error
from gcupipe.hub.retry import retry_call
from gcupipe.hub.sources import hub_cache_dir, hub_module, hub_offline

PREFIXES = {"modelscope": "modelscope", "hf": "huggingface", "huggingface": "huggingface"}
_ID_RE = re.compile(r"[\w.-]+/[\w.-]+")
_CLIENT_CACHE = {"modelscope": "~/.cache/modelscope", "huggingface": "~/.cache/huggingface/hub"}
"""Where each client caches when neither gcupipe nor the environment says (their defaults)."""
_SHOWN_FILES = 12


@dataclass(frozen=True)
class DatasetSpec:
    """`modelscope:owner/name` or `hf:owner/name`, split into the hub source and the id."""

    source: str
    repo_id: str

    def __str__(self) -> str:
        return f"{'hf' if self.source == 'huggingface' else self.source}:{self.repo_id}"


def parse_dataset_spec(spec: str) -> DatasetSpec:
    """The hub and id of a spec. A bare id is refused: the same name can exist on both hubs
    with different contents, so the recipe has to say which one it means."""
    prefix, sep, repo_id = spec.partition(":")
    if not sep or prefix not in PREFIXES:
        raise RecipeError(
            f"dataset '{spec}' does not name its hub: write 'modelscope:owner/name' or "
            "'hf:owner/name' (also 'huggingface:owner/name')"
        )
    if not _ID_RE.fullmatch(repo_id):
        raise RecipeError(f"dataset '{spec}': the id after '{prefix}:' must look like owner/name")
    return DatasetSpec(PREFIXES[prefix], repo_id)


def fetch_dataset_texts(
    spec: str,
    *,
    split: str,
    text_field: str,
    cache_dir: Path | None,
    offline: bool = False,
    revision: str | None = None,
    retries: int = 3,
    retry_backoff_s: float = 2.0,
    log: Callable[[str], None] | None = None,
) -> list[str]:
    """The texts of one split of a hub dataset, in file order then row order.

    `cache_dir` is gcupipe's cache: the hub files go to <cache_dir>/hub/<source>, shared with
    the download stage, unless $MODELSCOPE_CACHE / $HF_HUB_CACHE / $HF_HOME say otherwise."""
    parsed = parse_dataset_spec(spec)
    hub = hub_module(parsed.source)
    suffixes = readable_suffixes()
    request = HubFetch(
        repo_id=parsed.repo_id,
        revision=revision or hub.DEFAULT_REVISION,
        cache_dir=(
            hub_cache_dir(parsed.source, cache_dir)
            if cache_dir is not None
            else hub.env_cache_dir() or Path(_CLIENT_CACHE[parsed.source]).expanduser()
        ),
        endpoint=hub.endpoint(None),
        token=os.environ.get(hub.TOKEN_ENV) or None,
        allow_patterns=[f"*{split}*{suffix}" for suffix in suffixes],
        ignore_patterns=None,
        offline=hub_offline(parsed.source, offline),
        repo_type="dataset",
    )
    snapshot = _fetch(hub, request, parsed, retries, retry_backoff_s, log or (lambda _: None))
    local = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
    selected = [path for path in local if path.endswith(suffixes) and in_split(path, split)]
    if not selected:
        raise _no_split_error(hub, request, parsed, split, snapshot)
    texts: list[str] = []
    for rel in selected:
        texts += read_texts(snapshot / rel, f"dataset {parsed} {rel}", text_field)
    if not texts:
        raise StageError(f"dataset {parsed}: split '{split}' has no rows ({', '.join(selected)})")
    return texts


def in_split(path: str, split: str) -> bool:
    """The split name as a word of the path: `data/train-0000-of-0001.jsonl`, `train.jsonl`,
    `train/part1.txt` are in 'train'; `constraints.jsonl` and `validation.jsonl` are not
    in 'train' and 'val'."""
    return re.search(rf"(?<![A-Za-z]){re.escape(split)}(?![A-Za-z])", path) is not None


def readable_suffixes() -> tuple[str, ...]:
    """Parquet only when pyarrow is already installed: it is too heavy to pull in for this."""
    parquet = importlib.util.find_spec("pyarrow") is not None
    return (*TEXT_SUFFIXES, ".parquet") if parquet else TEXT_SUFFIXES


def _fetch(
    hub: ModuleType,
    request: HubFetch,
    parsed: DatasetSpec,
    retries: int,
    retry_backoff_s: float,
    log: Callable[[str], None],
) -> Path:
    attempts = [0]

    def fetch_once() -> tuple[Path, bool]:
        attempts[0] += 1
        fetched: tuple[Path, bool] = hub.fetch(request, ProgressSink(_NoBar()))  # quiet bars
        return fetched

    def error(exc: BaseException) -> StageError:
        return hub_stage_error(
            exc,
            hub=parsed.source,
            repo_id=request.repo_id,
            revision=request.revision,
            endpoint=hub.describe_endpoint(None),
            token_env=hub.TOKEN_ENV,
            offline=request.offline,
            cache_dir=str(request.cache_dir),
            attempts=attempts[0],
            kind="dataset",
        )

    try:
        snapshot, _ = retry_call(
            fetch_once,
            retries=0 if request.offline else retries,
            backoff_s=retry_backoff_s,
            log=log,
            what=f"{parsed.source} dataset {request.repo_id}",
        )
    except Exception as exc:
        raise error(exc) from exc
    if hub is huggingface and snapshot.is_dir():
        files = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
        try:
            huggingface.verify(snapshot, files)
        except HashMismatch as exc:
            raise error(exc) from exc
    return snapshot


def _no_split_error(
    hub: ModuleType, request: HubFetch, parsed: DatasetSpec, split: str, snapshot: Path
) -> StageError:
    """Say which files the dataset has, so the right split name is one look away."""
    if request.offline:
        found = sorted(
            p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()
        )
        where = "in the cache"
    else:
        try:
            found = hub.list_files(request)
        except Exception:  # the listing is only for the message
            found = []
        where = "on the hub"
    data = [path for path in found if path.endswith((*TEXT_SUFFIXES, ".parquet"))]
    unread = [path for path in data if in_split(path, split) and path.endswith(".parquet")]
    if unread and ".parquet" not in readable_suffixes():
        return StageError(
            f"dataset {parsed}: split '{split}' is stored as parquet ({_listing(unread)}): "
            "`pip install pyarrow` to read it"
        )
    if not data:
        return StageError(
            f"dataset {parsed} has no .jsonl/.json/.txt/.parquet data files {where} "
            f"({_listing(found) or 'no files'})"
        )
    return StageError(
        f"dataset {parsed}: no data file of split '{split}' {where}; its data files: "
        f"{_listing(data)}: set calibration.split to a name in these paths"
    )


def _listing(paths: list[str]) -> str:
    shown = ", ".join(paths[:_SHOWN_FILES])
    more = len(paths) - _SHOWN_FILES
    return shown + (f" and {more} more" if more > 0 else "")


class _NoBar:
    """No progress bar: calibration is a small part of quantize, which has its own."""

    def advance(self, amount: float = 1.0) -> None:
        return None

    def set_total(self, total: float) -> None:
        return None
