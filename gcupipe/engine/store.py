"""The run directory: finished stage outputs with their records, and the temp dirs of new ones.

A stage writes into `.tmp/<id>-<random>/out`; only after `run` returns is its record written
and the whole directory renamed to `stages/<id>`. A crash, an exception, Ctrl-C or SIGKILL
therefore never leaves something under `stages/` that looks complete.

A stage's scratch directory, `scratch/<id>/<cache key>`, is the one thing that outlives a failed
or killed run: a long stage keeps its finished work there (quantize: its finished layers) and the
next run with the same cache key resumes from it. A different key (a changed recipe, a changed
upstream) never sees it: beginning the stage removes the scratch of every other key, and success
removes its own."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from gcupipe.errors import UsageError

RECORD_NAME = "stage.json"
OUTPUT_DIR_NAME = "out"


class StageRecord(BaseModel):
    """What a finished stage left behind; the cache decision reads nothing else."""

    model_config = ConfigDict(extra="ignore")

    id: str
    uses: str
    stage_version: str
    cache_key: str
    config: dict[str, Any]
    upstream: dict[str, str]  # upstream id -> outputs digest
    outputs: dict[str, Any]
    outputs_digest: str
    outputs_fingerprint: str
    started_at: float
    duration_s: float


def safe_name(stage_id: str) -> str:
    """A file-system-safe, readable directory name for a (possibly matrix) stage id."""
    return re.sub(r"[^A-Za-z0-9_.,=\[\]-]", "_", stage_id)


class RunStore:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.stages_dir = run_dir / "stages"
        self.tmp_dir = run_dir / ".tmp"
        self.cache_dir = run_dir / "cache"
        self.scratch_root = run_dir / "scratch"
        self._lock_handle: Any = None

    def stage_dir(self, stage_id: str) -> Path:
        return self.stages_dir / safe_name(stage_id)

    def output_dir(self, stage_id: str) -> Path:
        return self.stage_dir(stage_id) / OUTPUT_DIR_NAME

    def read_record(self, stage_id: str) -> StageRecord | None:
        path = self.stage_dir(stage_id) / RECORD_NAME
        try:
            return StageRecord.model_validate_json(path.read_bytes())
        except (OSError, ValueError):
            return None

    def open(self, wait_s: float = 0.0, log: Callable[[str], None] | None = None) -> None:
        """Lock the run directory for this process and remove what crashed runs left behind.
        A run holding it already: wait up to `wait_s` for it to end (`log` hears so once), then
        refuse. The lock is the kernel's (flock): a killed holder releases it at once."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        handle = (self.run_dir / ".lock").open("w")
        deadline = time.monotonic() + wait_s
        told = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    handle.close()
                    waited = f" after waiting {wait_s:g} s" if wait_s else ""
                    raise UsageError(
                        f"another gcupipe run is using {self.run_dir}{waited}; wait for it "
                        "(--wait SECONDS) or use another --workdir"
                    ) from None
                if log is not None and not told:
                    log(f"waiting up to {wait_s:g} s for the gcupipe run using {self.run_dir}")
                    told = True
                time.sleep(0.2)
        self._lock_handle = handle
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        for folder in (self.stages_dir, self.tmp_dir, self.cache_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        if self._lock_handle is not None:
            self._lock_handle.close()
            self._lock_handle = None

    def stage_scratch(self, stage_id: str) -> Path:
        """The scratch of a stage, for every cache key it has run with."""
        return self.scratch_root / safe_name(stage_id)

    def scratch_dir(self, stage_id: str, key: str) -> Path:
        return self.stage_scratch(stage_id) / key

    def begin(self, stage_id: str, key: str) -> tuple[Path, Path]:
        """A fresh temp stage directory with `out/` inside, and the stage's scratch directory
        for this cache key (kept from an interrupted run of the same key, else empty)."""
        folder = self.new_folder(stage_id)
        (folder / OUTPUT_DIR_NAME).mkdir()
        scratch = self.scratch_dir(stage_id, key)
        if scratch.parent.is_dir():
            for other in scratch.parent.iterdir():
                if other != scratch:
                    shutil.rmtree(other, ignore_errors=True)
        scratch.mkdir(parents=True, exist_ok=True)
        return folder, scratch

    def new_folder(self, stage_id: str) -> Path:
        """An empty temp stage directory, to be committed or discarded."""
        folder = Path(tempfile.mkdtemp(prefix=f"{safe_name(stage_id)}-", dir=self.tmp_dir))
        folder.chmod(0o755)
        return folder

    def commit(self, stage_id: str, folder: Path, record: StageRecord) -> None:
        """Write the record and move the finished stage into place, replacing an older result."""
        shutil.rmtree(self.stage_scratch(stage_id), ignore_errors=True)
        (folder / RECORD_NAME).write_text(record.model_dump_json(indent=2))
        final = self.stage_dir(stage_id)
        if final.exists():
            trash = self.tmp_dir / f"old-{safe_name(stage_id)}-{time.monotonic_ns()}"
            os.replace(final, trash)
            os.replace(folder, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(folder, final)

    def discard(self, folder: Path) -> None:
        """Drop a failed stage's temp directory (its scratch stays, for a resume)."""
        shutil.rmtree(folder, ignore_errors=True)


def write_json_atomic(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(value, stream, indent=2, default=str)
            stream.write("\n")
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:  # a full disk, say: no half-written file is left beside the old one
        Path(temp).unlink(missing_ok=True)
        raise
