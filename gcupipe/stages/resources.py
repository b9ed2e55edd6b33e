"""What a stage asks of the machine that runs it (`resources:`), in Ray's terms.

A stage type has defaults (`Stage.resources`: one CPU; serve asks for the accelerators its
tensor_parallel_size needs); the recipe's `resources:` replaces them key by key. Locally they
are informational; on Ray each stage is a task with exactly these resources, and a request no
node of the cluster can meet fails at submit (Ray itself would wait for such a node forever).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

GIB = 1 << 30


class Resources(BaseModel):
    """`resources:` of a stage: cpus, memory_gb, gpus, and custom resources by name (GCU: 1)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    cpus: float = Field(default=1, ge=0, description="CPU cores (Ray `num_cpus`).")
    memory_gb: float | None = Field(
        default=None, ge=0, description="Memory reserved for the stage, GiB (Ray `memory`)."
    )
    gpus: float = Field(default=0, ge=0, description="CUDA GPUs (Ray `num_gpus`).")

    @model_validator(mode="after")
    def _custom_amounts(self) -> Resources:
        for name, amount in self.custom.items():
            if isinstance(amount, bool) or not isinstance(amount, int | float) or amount < 0:
                raise ValueError(f"custom resource {name!r} needs a number >= 0, not {amount!r}")
        return self

    @property
    def custom(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @classmethod
    def devices(cls, resource: str | None, count: int) -> Resources:
        """One CPU and `count` accelerators named as Ray names them (GPU, NPU, a custom GCU)."""
        if resource is None:
            return cls()
        if resource == "GPU":
            return cls(gpus=count)
        return cls.model_validate({resource: count})

    def merged(self, override: Resources | None) -> Resources:
        """These defaults with the keys the recipe set replaced."""
        if override is None:
            return self
        return Resources.model_validate(
            {**self.model_dump(), **override.model_dump(exclude_unset=True)}
        )

    def ray_request(self) -> dict[str, float]:
        """The request in Ray's resource names (CPU, GPU, memory in bytes, custom as named)."""
        request: dict[str, float] = {"CPU": self.cpus}
        if self.gpus:
            request["GPU"] = self.gpus
        if self.memory_gb:
            request["memory"] = self.memory_gb * GIB
        request.update(self._custom_request())
        return request

    def ray_options(self) -> dict[str, Any]:
        """Keyword arguments of `ray.remote(...).options` for this request."""
        options: dict[str, Any] = {"num_cpus": self.cpus, "num_gpus": self.gpus}
        if self.memory_gb:
            options["memory"] = int(self.memory_gb * GIB)
        custom = self._custom_request()
        if custom:
            options["resources"] = custom
        return options

    def _custom_request(self) -> dict[str, float]:
        return {name: float(amount) for name, amount in self.custom.items() if amount}


def describe_request(request: dict[str, float]) -> str:
    return ", ".join(f"{name}={_amount(name, value)}" for name, value in request.items())


def _amount(name: str, value: float) -> str:
    if name in ("memory", "object_store_memory"):
        return f"{value / GIB:.1f}GiB"
    return f"{value:g}"


def unmet(request: dict[str, float], nodes: list[dict[str, float]]) -> str | None:
    """None if some node has every requested amount, else what the closest node has."""
    if any(all(node.get(k, 0.0) >= v for k, v in request.items()) for node in nodes):
        return None
    if not nodes:
        return "the cluster has no live node"

    def closeness(node: dict[str, float]) -> tuple[int, float]:
        met = sum(node.get(k, 0.0) >= v for k, v in request.items())
        return met, sum(min(node.get(k, 0.0), v) / v for k, v in request.items() if v)

    largest = max(nodes, key=closeness)
    shown = {k: largest.get(k, 0.0) for k in request}
    return f"the cluster's largest node has {describe_request(shown)}"
