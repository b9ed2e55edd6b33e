"""`uses: command`: run a shell command as a stage (glue steps, custom checks, CI hooks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pydantic import Field

from gcupipe.errors import StageError
from gcupipe.stages.base import Stage, StageConfig, StageContext, StageOutputs


class CommandConfig(StageConfig):
    run: str = Field(
        description="Shell command, run with bash in the stage's output directory; `python` "
        "there is the interpreter gcupipe runs on."
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment variables for the command."
    )
    timeout_s: float | None = Field(
        default=None, gt=0, description="Kill the command after this many seconds."
    )


class CommandOutputs(StageOutputs):
    output_dir: Path = Field(description="Directory the command ran in; its files are the output.")
    stdout_file: Path = Field(description="Everything the command printed (stdout and stderr).")


class CommandStage(Stage[CommandConfig, CommandOutputs]):
    """Runs a shell command; `$GCUPIPE_OUTPUT_DIR` is where it should leave its files."""

    Config = CommandConfig
    Outputs = CommandOutputs
    version = "1"

    def describe(self, config: CommandConfig, cache_dir: Path) -> str | None:
        limit = f" (killed after {config.timeout_s:g} s)" if config.timeout_s else ""
        return f"runs: {' '.join(config.run.split())}{limit}"

    def run(self, config: CommandConfig, ctx: StageContext) -> CommandOutputs:
        log_path = ctx.output_dir / "command.log"
        env = {**os.environ, **config.env, "GCUPIPE_OUTPUT_DIR": str(ctx.output_dir)}
        # `python` in the command is gcupipe's own interpreter, venv or not
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        with log_path.open("wb") as log:
            try:
                completed = subprocess.run(
                    ["bash", "-c", config.run],
                    cwd=ctx.output_dir,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=config.timeout_s,
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                raise StageError(f"command timed out after {config.timeout_s} s") from exc
        if completed.returncode != 0:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise StageError(
                f"command exited with code {completed.returncode}"
                + (": " + " | ".join(tail) if tail else "")
            )
        return CommandOutputs(output_dir=ctx.output_dir, stdout_file=log_path)
