"""What several test packages share: running the quantize stage on a tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CALIBRATION_TEXT = " ".join(f"word{i % 97} and the {i} thing" for i in range(600))


def calibration(tmp: Path, samples: int = 4, seq_len: int = 32) -> dict[str, Any]:
    """A calibration block over a small text written into `tmp`."""
    text = tmp / "calib.txt"
    if not text.exists():
        text.write_text(CALIBRATION_TEXT)
    return {"text_file": str(text), "samples": samples, "seq_len": seq_len}


def quantize(source: Path, out: Path, **config: Any) -> Path:
    """Run the quantize stage (its lint-time check first) from `source` into `out`."""
    from gcupipe.stages.base import StageContext
    from gcupipe.stages.quantize import QuantizeConfig, QuantizeStage

    out.mkdir(parents=True)
    scratch = out.parent / f"{out.name}-scratch"
    scratch.mkdir()
    ctx = StageContext(
        stage_id="quantize",
        output_dir=out,
        scratch_dir=scratch,
        cache_dir=scratch,
        run_dir=scratch,
        log=lambda message: None,
    )
    QuantizeStage().run(QuantizeConfig(model=source, **config), ctx)
    return out
