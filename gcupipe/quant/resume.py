"""Resume a killed quantization where it stopped: the layers it finished are not redone.

After a decoder layer, once the writer has flushed everything it holds into part files (so every
finished layer is on disk), the streaming quantizer saves a checkpoint in the stage's scratch
directory (kept across a killed run for the same cache key, engine/store.py):

    state.json           layers done, the quantize report so far, the writer's state
    hidden-<n>.safetensors   calibrated methods: the activations entering layer n (and the
                             float model's, for methods with float targets)
    parts/               the writer's finished shards (FormatWriter.parts_dir)

`state.json` is replaced atomically and written last, so a kill at any moment leaves either the
previous checkpoint or the new one; parts written after it are dropped on resume. A resumed run
redoes only the layers after the checkpoint, on the same inputs, so its output is byte-identical
to an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

STATE_VERSION = 1


@dataclass
class Checkpoint:
    layers_done: int
    report: dict[str, Any]
    writer: dict[str, Any]
    hidden: torch.Tensor | None
    float_hidden: torch.Tensor | None = None


class LayerCheckpoints:
    """The checkpoints of one quantize run, in `directory`."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.parts_dir = directory / "parts"
        self.state_file = directory / "state.json"

    def load(self) -> Checkpoint | None:
        """The last checkpoint of an interrupted run, or None."""
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None
        if state.get("version") != STATE_VERSION:
            return None
        streams: dict[str, torch.Tensor] = {}
        if state["hidden"] is not None:
            from safetensors.torch import load_file

            streams = load_file(str(self.directory / state["hidden"]))
        return Checkpoint(
            state["layers_done"],
            state["report"],
            state["writer"],
            streams.get("hidden"),
            streams.get("float_hidden"),
        )

    def save(
        self,
        layers_done: int,
        report: Any,
        writer_state: dict[str, Any],
        hidden: torch.Tensor | None,
        float_hidden: torch.Tensor | None = None,
    ) -> None:
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        hidden_name = None
        if hidden is not None:
            hidden_name = f"hidden-{layers_done}.safetensors"
            temp = self.directory / f".{hidden_name}.partial"
            streams = {"hidden": hidden, "float_hidden": float_hidden}
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in streams.items() if v is not None},
                str(temp),
            )
            os.replace(temp, self.directory / hidden_name)
        state = {
            "version": STATE_VERSION,
            "layers_done": layers_done,
            "report": dataclasses.asdict(report),
            "writer": writer_state,
            "hidden": hidden_name,
        }
        temp = self.directory / ".state.json.partial"
        temp.write_text(json.dumps(state))
        os.replace(temp, self.state_file)
        for old in self.directory.glob("hidden-*.safetensors"):
            if old.name != hidden_name:
                old.unlink()

    def clear(self) -> None:
        """Forget the checkpoints (the run finished)."""
        import shutil

        shutil.rmtree(self.directory, ignore_errors=True)
