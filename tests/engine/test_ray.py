"""Stages as Ray tasks on a real Ray cluster on loopback: a head and two workers, each worker
with a custom resource of its own (`ray.cluster_utils.Cluster`, ../shared/RAY.md)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gcupipe.engine.events import Event
from gcupipe.engine.executors import InlineExecutor, RayExecutor

from .test_executors import MATRIX, Recorder, overlap, run, write_recipe

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

ONE_STAGE = """\
version: 1
name: placed
stages:
  probe:
    uses: command
    resources: {resources}
    with:
      run: "echo started >> {log}; echo placed > where.txt"
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, Any]]:
    previous = {name: os.environ.get(name) for name in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",)}
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every node on 127.0.0.1
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    gcu = cluster.add_node(num_cpus=1, resources={"GCU": 1})
    npu = cluster.add_node(num_cpus=1, resources={"NPU": 1})
    cluster.wait_for_nodes()
    try:
        yield {"address": cluster.address, "gcu": gcu.node_id, "npu": npu.node_id}
    finally:
        cluster.shutdown()
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def test_a_matrix_runs_its_combinations_on_different_nodes_at_once(cluster, tmp_path: Path):
    recipe = write_recipe(tmp_path, MATRIX, sleep=3)
    result = run(recipe, tmp_path / "run", RayExecutor(cluster["address"]))
    assert result.outcome == "ok", result.error
    stages = {stage.id: stage for stage in result.stages}
    first, second = stages["work[n=1]"], stages["work[n=2]"]
    assert {first.node, second.node} == {cluster["gcu"], cluster["npu"]}
    assert overlap(first, second)
    # a rerun on Ray finds every stage cached and runs nothing
    again = run(recipe, tmp_path / "run", RayExecutor(cluster["address"]))
    assert [stage.outcome for stage in again.stages] == ["cached"] * 4


@pytest.mark.parametrize("resource", ["GCU", "NPU"])
def test_a_stage_needing_a_resource_runs_on_the_node_that_has_it(cluster, tmp_path, resource):
    recipe = write_recipe(tmp_path, ONE_STAGE, resources=f"{{{resource}: 1}}")
    result = run(recipe, tmp_path / "run", RayExecutor(cluster["address"]))
    assert result.outcome == "ok", result.error
    assert result.stages[0].node == cluster[resource.lower()]


def test_an_impossible_request_fails_at_submit_naming_the_largest_node(cluster, tmp_path):
    recipe = write_recipe(tmp_path, ONE_STAGE, resources="{GCU: 2, memory_gb: 1}")
    result = run(recipe, tmp_path / "run", RayExecutor(cluster["address"]))
    assert result.outcome == "failed"
    message = str(result.error)
    assert message.startswith("stage 'probe' asks for CPU=1, memory=1.0GiB, GCU=2")
    assert "largest node has CPU=1" in message and "GCU=1" in message
    assert "\n" not in message
    assert not (tmp_path / "attempts.log").exists()  # nothing ran
    assert not list((tmp_path / "run" / ".tmp").glob("*"))


def test_a_killed_ray_worker_is_retried_and_the_run_succeeds(cluster, tmp_path):
    killed: list[str] = []

    def kill_first_attempt(event: Event) -> None:
        if event.kind == "stage_running" and event.stage == "work[n=1]" and not killed:
            killed.append(event.data["node"])
            os.kill(event.data["pid"], signal.SIGKILL)

    sink = Recorder(kill_first_attempt)
    recipe = write_recipe(tmp_path, MATRIX, sleep=1)
    result = run(recipe, tmp_path / "run", RayExecutor(cluster["address"]), sink)
    assert result.outcome == "ok", result.error
    assert killed
    stages = {stage.id: stage for stage in result.stages}
    assert stages["work[n=1]"].attempt == 2 and stages["work[n=2]"].attempt == 1
    assert stages["work[n=1]"].node not in (None, killed[0])  # retried on the other node
    retry = next(e for e in sink.events if e.kind == "stage_retry")
    assert "Ray worker was lost" in retry.data["message"]
    assert (Path(stages["work[n=1]"].outputs["output_dir"]) / "n.txt").read_text() == "1\n"
    assert not list((tmp_path / "run" / ".tmp").glob("*"))


def test_a_ray_run_fills_the_remote_cache_and_a_local_run_restores_it(cluster, s3_bucket, tmp_path):
    """The driver pushes what the Ray workers made; a run directory elsewhere reuses it."""
    from .conftest import BUCKET

    text = MATRIX.replace("stages:", f"cache: {{{{url: s3://{BUCKET}/ray}}}}\nstages:", 1)
    recipe = write_recipe(tmp_path, text, sleep=0)
    first = run(recipe, tmp_path / "on-ray", RayExecutor(cluster["address"]))
    assert first.outcome == "ok", first.error
    assert {stage.node for stage in first.stages} == {cluster["gcu"], cluster["npu"]}
    second = run(recipe, tmp_path / "elsewhere", InlineExecutor())
    assert [stage.outcome for stage in second.stages] == ["cached"] * 4
    assert all("remote cache" in stage.reason for stage in second.stages)
    for n in (1, 2):
        gathered = Path(second.outputs(f"gather[n={n}]")["output_dir"]) / "gathered.txt"
        assert gathered.read_text().strip() == str(n)
