"""Where stage bodies run: in this process, in local worker processes, or as Ray tasks.

The engine (runner.py) stays on the driver: it decides what runs, makes each attempt's fresh
temp output directory, commits finished outputs and writes the lock. An executor only runs
`Stage.run(config, ctx)` for a `StageJob` and reports back: the stage's log and progress events
while it runs, then its outputs or its error. A worker that dies under a stage (killed, out of
memory, node lost) is reported as `lost`, and the runner retries the stage in a new directory.

- `InlineExecutor` (`--jobs 1`, the default): the stage runs in the driver, one at a time.
- `ProcessExecutor` (`--jobs N`): up to N stages at once, each in a spawned worker process.
- `RayExecutor` (`--executor ray`): every ready stage is a Ray task with the stage's
  resources; Ray places it on a node that has them. The run directory must be on storage
  every node sees (a shared path).
"""

from __future__ import annotations

import os
import pickle
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gcupipe.errors import GcupipeError, StageError, UsageError
from gcupipe.secrets import redact, register_secret
from gcupipe.stages.base import ProgressTask, Provenance, Stage, StageContext, StageOutputs
from gcupipe.stages.resources import Resources, describe_request, unmet

Emit = Callable[..., None]
"""emit(kind, stage_id, **data): an event of a running stage, handed to the driver's Events."""

POLL_S = 0.2


@dataclass
class StageJob:
    """Everything a worker needs to run one attempt of one stage (picklable)."""

    stage_id: str
    stage_class: type[Stage]  # type: ignore[type-arg]
    config: Any
    output_dir: Path
    scratch_dir: Path
    cache_dir: Path
    run_dir: Path
    upstream: dict[str, StageOutputs]
    lineage: list[Provenance] = field(default_factory=list)
    resources: Resources = field(default_factory=Resources)
    attempt: int = 1


@dataclass
class Finished:
    """How one attempt ended: outputs, the stage's own error, or the loss of its worker."""

    stage_id: str
    outputs: StageOutputs | None = None
    error: BaseException | None = None
    lost: str | None = None
    node: str | None = None
    started_at: float | None = None


class Executor(Protocol):
    name: str
    slots: int | None  # stages at once; None: as many as the cluster places

    def submit(self, job: StageJob) -> None: ...

    def wait(self, emit: Emit) -> list[Finished]:
        """Block until at least one submitted attempt ended, forwarding events meanwhile."""
        ...

    def close(self) -> None:
        """Stop what still runs (an interrupted or failed run) and release the workers."""
        ...


def progress_factory(emit: Emit, stage_id: str):  # type: ignore[no-untyped-def]
    """The StageContext progress factory: every update becomes a `progress` event."""

    def factory(description: str, total: float | None, unit: str):  # type: ignore[no-untyped-def]
        state = {"total": total}

        def update(completed: float | None, new_total: float | None) -> None:
            if new_total is not None:
                state["total"] = new_total
            emit(
                "progress",
                stage_id,
                description=description,
                completed=completed,
                total=state["total"],
                unit=unit,
            )

        task = ProgressTask(update)
        update(0.0, None)

        def finish() -> None:
            emit(
                "progress",
                stage_id,
                description=description,
                completed=task.completed,
                total=state["total"],
                unit=unit,
                done=True,
            )

        return task, finish

    return factory


def run_job(job: StageJob, emit: Emit, secrets: Callable[[str], None]) -> StageOutputs:
    """Run the stage body of `job` (in whatever process this is) and check its outputs."""
    ctx = StageContext(
        stage_id=job.stage_id,
        output_dir=job.output_dir,
        scratch_dir=job.scratch_dir,
        cache_dir=job.cache_dir,
        run_dir=job.run_dir,
        upstream=job.upstream,
        lineage=job.lineage,
        log=lambda message: emit("log", job.stage_id, message=str(message)),
        progress_factory=progress_factory(emit, job.stage_id),
        secrets=secrets,
    )
    outputs = job.stage_class().run(job.config, ctx)
    if not isinstance(outputs, job.stage_class.Outputs):
        raise StageError(
            f"stage '{job.stage_id}' returned {type(outputs).__name__}, "
            f"not {job.stage_class.Outputs.__name__}"
        )
    return outputs


def node_name() -> str:
    return socket.gethostname()


class InlineExecutor:
    """One stage at a time, in the driver process: what `gcupipe run` always did."""

    name = "local"
    slots: int | None = 1

    def __init__(self) -> None:
        self._queued: list[StageJob] = []

    def submit(self, job: StageJob) -> None:
        self._queued.append(job)

    def wait(self, emit: Emit) -> list[Finished]:
        job = self._queued.pop(0)
        started = time.time()
        emit("stage_running", job.stage_id, node=node_name(), pid=os.getpid(), attempt=job.attempt)
        try:
            outputs = run_job(job, emit, register_secret)
        except Exception as exc:  # (KeyboardInterrupt goes to the runner as it is)
            return [Finished(job.stage_id, error=exc, node=node_name(), started_at=started)]
        return [Finished(job.stage_id, outputs=outputs, node=node_name(), started_at=started)]

    def close(self) -> None:
        self._queued.clear()


# -- worker processes ------------------------------------------------------------------------
def _portable(exc: BaseException) -> BaseException:
    """The exception itself if it survives pickling, else a StageError saying what it was."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return StageError(f"{type(exc).__name__}: {exc}")


def _worker_events(send: Callable[[tuple[Any, ...]], None]) -> tuple[Emit, Callable[[str], None]]:
    """emit/secrets of a worker: events go to the driver redacted; a secret goes there too, so
    the driver redacts it in what it writes."""

    def emit(kind: str, stage_id: str, **data: Any) -> None:
        send(("event", stage_id, kind, redact(data)))

    def secrets(value: str) -> None:
        register_secret(value)
        send(("secret", value))

    return emit, secrets


def _relay(message: tuple[Any, ...], emit: Emit) -> tuple[Any, ...] | None:
    """Hand a worker's event (or secret) to the driver; what else it sent ("running" with its
    node, "done", "error") goes back to the executor."""
    kind = message[0]
    if kind == "event":
        _, stage_id, event, data = message
        emit(event, stage_id, **data)
        return None
    if kind == "secret":
        register_secret(message[1])
        return None
    if kind == "running":
        _, stage_id, node, pid, _started = message
        emit("stage_running", stage_id, node=node, pid=pid)
    return message


def _work(job: StageJob, send: Callable[[tuple[Any, ...]], None], node: str) -> tuple[str, Any]:
    """A worker's side of one attempt: say where it runs, run the stage, and answer ("done",
    outputs) or ("error", the exception)."""
    emit, secrets = _worker_events(send)
    send(("running", job.stage_id, node, os.getpid(), time.time()))
    try:
        return "done", run_job(job, emit, secrets)
    except BaseException as exc:
        return "error", _portable(exc)


def _process_main(job: StageJob, channel: Any) -> None:
    """Body of a local worker process; `channel` is its own pipe to the driver."""
    kind, value = _work(job, channel.send, node_name())
    channel.send((kind, job.stage_id, value))


@dataclass
class _Worker:
    process: Any
    channel: Any  # the driver's reading end of the worker's pipe
    node: str | None = None
    started_at: float | None = None
    ended: Finished | None = None
    closed: bool = False  # the pipe reached its end: the worker exited


class ProcessExecutor:
    """Up to `jobs` stages at once, each in a fresh spawned process of this interpreter.

    Each worker has a pipe of its own: a worker killed in the middle of a message can only
    cut its own pipe short (the driver then reads its end), never block the others'."""

    name = "local"

    def __init__(self, jobs: int):
        import multiprocessing

        self.slots: int | None = jobs
        self._mp = multiprocessing.get_context("spawn")
        self._workers: dict[str, _Worker] = {}

    def submit(self, job: StageJob) -> None:
        reader, writer = self._mp.Pipe(duplex=False)
        process = self._mp.Process(
            target=_process_main, args=(job, writer), name=f"gcupipe-{job.stage_id}"
        )
        process.start()
        writer.close()  # the worker holds the only writing end: its exit ends the pipe
        self._workers[job.stage_id] = _Worker(process, reader)

    def _receive(self, worker: _Worker, emit: Emit) -> None:
        try:
            message = _relay(worker.channel.recv(), emit)
        except (EOFError, OSError):
            worker.closed = True
            return
        if message is None:
            return
        kind = message[0]
        if kind == "running":
            worker.node, worker.started_at = message[2], message[4]
        else:
            ended = Finished(message[1], node=worker.node, started_at=worker.started_at)
            if kind == "done":
                ended.outputs = message[2]
            else:
                ended.error = message[2]
            worker.ended = ended

    def wait(self, emit: Emit) -> list[Finished]:
        from multiprocessing.connection import wait as readable

        while True:
            by_channel = {id(w.channel): w for w in self._workers.values() if not w.closed}
            for channel in readable([w.channel for w in by_channel.values()], timeout=POLL_S):
                self._receive(by_channel[id(channel)], emit)
            finished = []
            for stage_id, worker in list(self._workers.items()):
                if worker.ended is None and not worker.closed:
                    continue
                worker.process.join()
                worker.channel.close()
                del self._workers[stage_id]
                finished.append(
                    worker.ended
                    or Finished(
                        stage_id,
                        lost=f"its worker process (pid {worker.process.pid}) exited with code "
                        f"{worker.process.exitcode}",
                        node=worker.node or node_name(),
                        started_at=worker.started_at,
                    )
                )
            if finished:
                return finished

    def close(self) -> None:
        for worker in self._workers.values():
            worker.process.terminate()
        for worker in self._workers.values():
            worker.process.join(timeout=10)
            if worker.process.exitcode is None:
                worker.process.kill()
                worker.process.join()
            worker.channel.close()
        self._workers.clear()


# -- Ray -------------------------------------------------------------------------------------
def _ray_main(job: StageJob, queue: Any) -> tuple[str, Any]:
    """Body of a Ray task: the stage, with its events through the driver's queue actor."""
    import ray

    return _work(job, queue.put, ray.get_runtime_context().get_node_id())


class RayExecutor:
    """Every submitted stage becomes a Ray task with its resources (no Ray-side retries: the
    runner retries a lost stage itself, in a fresh output directory, and counts attempts)."""

    name = "ray"
    slots: int | None = None

    def __init__(self, address: str | None):
        try:
            import ray
            from ray.util.queue import Queue
        except ImportError:
            raise UsageError("--executor ray needs Ray: pip install 'gcupipe[ray]'") from None
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        self._ray = ray
        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            ray.init(address=address, include_dashboard=False, log_to_driver=True)
        self._queue = Queue()
        self._task = ray.remote(max_retries=0)(_ray_main)
        self._refs: dict[Any, StageJob] = {}
        self._nodes: dict[str, tuple[str, float]] = {}
        self._lost_on: dict[str, str | None] = {}  # stage id -> the node its worker was lost on

    def submit(self, job: StageJob) -> None:
        request = job.resources.ray_request()
        nodes = {n["NodeID"]: n["Resources"] for n in self._ray.nodes() if n.get("Alive")}  # type: ignore[no-untyped-call]
        missing = unmet(request, list(nodes.values()))
        if missing is not None:
            raise StageError(
                f"stage '{job.stage_id}' asks for {describe_request(request)}, which no node of "
                f"the Ray cluster has: {missing}"
            )
        options = job.resources.ray_options()
        lost_on = self._lost_on.get(job.stage_id)
        others = [
            node for node, has in nodes.items() if node != lost_on and unmet(request, [has]) is None
        ]
        if lost_on is not None and others:  # a retry: rather on another node than the lost one
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(others[0], soft=True)
        ref = self._task.options(**options, name=job.stage_id).remote(job, self._queue)
        self._refs[ref] = job

    def _drain(self, emit: Emit) -> None:
        while not self._queue.empty():
            for message in self._queue.get_nowait_batch(self._queue.qsize() or 1):
                running = _relay(message, emit)
                if running is not None:  # (a Ray task answers with its return value)
                    self._nodes[running[1]] = (running[2], running[4])

    def wait(self, emit: Emit) -> list[Finished]:
        from ray import exceptions

        while True:
            self._drain(emit)
            ready, _ = self._ray.wait(list(self._refs), num_returns=1, timeout=POLL_S)
            if not ready:
                continue
            self._drain(emit)
            finished = []
            for ref in ready:
                job = self._refs.pop(ref)
                node, started = self._nodes.pop(job.stage_id, (None, None))
                ended = Finished(job.stage_id, node=node, started_at=started)
                try:
                    kind, value = self._ray.get(ref)
                except (
                    exceptions.WorkerCrashedError,
                    exceptions.NodeDiedError,
                    exceptions.OutOfMemoryError,
                    exceptions.ObjectLostError,
                    exceptions.TaskCancelledError,
                ) as exc:
                    ended.lost = f"its Ray worker was lost ({type(exc).__name__})"
                    self._lost_on[job.stage_id] = node
                except exceptions.RayError as exc:
                    ended.error = StageError(f"Ray could not run the stage: {exc}")
                else:
                    if kind == "done":
                        ended.outputs = value
                    else:
                        ended.error = value
                finished.append(ended)
            return finished

    def close(self) -> None:
        for ref in self._refs:
            self._ray.cancel(ref, force=True)
        self._refs.clear()
        if self._started_ray:
            self._ray.shutdown()


def make_executor(kind: str, jobs: int, ray_address: str | None) -> Executor:
    if kind == "ray":
        return RayExecutor(ray_address)
    if kind != "local":
        raise UsageError(f"unknown executor {kind!r}: use local or ray")
    if jobs > 1:
        return ProcessExecutor(jobs)
    return InlineExecutor()


__all__ = [
    "Executor",
    "Finished",
    "GcupipeError",
    "InlineExecutor",
    "ProcessExecutor",
    "RayExecutor",
    "StageJob",
    "make_executor",
    "progress_factory",
    "run_job",
]
