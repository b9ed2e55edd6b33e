"""The accelerators gcupipe builds for, as vLLM platforms: which machine will load the files
(each has a target profile of the same name, targets/)."""

from __future__ import annotations

import enum


class Platform(enum.StrEnum):
    GCU = "gcu"  # Enflame GCU: vLLM-GCU
    ASCEND = "ascend"  # Huawei Ascend: vllm-ascend
    CUDA = "cuda"
    CPU = "cpu"
