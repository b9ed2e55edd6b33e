"""An example external stage plugin: count the words of a text file, fail a gate above a maximum."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field

from gcupipe import GateFailed, Stage, StageConfig, StageContext, StageOutputs


class WordCountConfig(StageConfig):
    text_file: Path = Field(description="The text file to count.")
    max_words: int | None = Field(
        default=None, ge=0, description="Fail the run (exit code 3) above this many words."
    )


class WordCountOutputs(StageOutputs):
    words: int = Field(description="Number of whitespace-separated words.")
    report: Path = Field(description="JSON report with the count.")


class WordCountStage(Stage[WordCountConfig, WordCountOutputs]):
    """Counts the words of a text file (an example of a third-party stage)."""

    Config = WordCountConfig
    Outputs = WordCountOutputs
    version = "1"

    def run(self, config: WordCountConfig, ctx: StageContext) -> WordCountOutputs:
        words = len(config.text_file.read_text().split())
        report = ctx.output_dir / "wordcount.json"
        report.write_text(json.dumps({"file": str(config.text_file), "words": words}))
        ctx.log(f"{config.text_file.name}: {words} words")
        if config.max_words is not None and words > config.max_words:
            raise GateFailed(f"{words} words > max_words {config.max_words} (report: {report})")
        return WordCountOutputs(words=words, report=report)
