"""How long the reference runtime takes to score 8k tokens of SmolLM2-135M (target: < 60 s).

Float through the runtime, the same model layer by layer (the path for models larger than RAM)
and a W8A8-dynamic modelslim copy through the runtime's int8 kernels, on the first 8192 tokens
of the Botchan eval text (window 512, stride 512). Prints the figures, and the load average,
since other processes on this 2-core machine slow everything down, and writes
benchmarks/results/runtime_eval.{json,md}.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_results  # noqa: E402

from gcupipe.formats.tokenizer import text_token_ids, tokenizer_dir  # noqa: E402
from gcupipe.runtime.layered import layered_perplexity  # noqa: E402
from gcupipe.runtime.load import load_model  # noqa: E402
from gcupipe.runtime.perplexity import perplexity  # noqa: E402
from gcupipe.stages.base import StageContext  # noqa: E402
from gcupipe.stages.quantize import QuantizeConfig, QuantizeStage  # noqa: E402
from gcupipe.testing.real_data import botchan_text, smollm2_checkpoint  # noqa: E402

TOKENS = 8192
TARGET_S = 60.0


def main() -> None:
    import argparse

    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's choice; 1 is faster when other "
        "processes keep the cores busy)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    source = smollm2_checkpoint()
    ids = text_token_ids(botchan_text()[1], tokenizer_dir(source), 49152, TOKENS)
    rows: list[tuple[str, float, float, int]] = []
    load_before = os.getloadavg()[0]

    started = time.perf_counter()
    model = load_model(source).model
    load_s = time.perf_counter() - started
    result = perplexity(model, ids)
    rows.append(("float, whole model", result.ppl, result.seconds, result.scored_tokens))
    print(
        f"float:   ppl {result.ppl:.4f} on {result.scored_tokens} tokens in "
        f"{result.seconds:.1f} s (+{load_s:.1f} s load)"
    )
    del model

    result = layered_perplexity(source, ids)
    rows.append(("float, layer by layer", result.ppl, result.seconds, result.scored_tokens))
    print(f"layered: ppl {result.ppl:.4f} in {result.seconds:.1f} s")

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "w8a8_dynamic"
        out.mkdir()
        ctx = StageContext(
            stage_id="q",
            output_dir=out,
            scratch_dir=Path(folder),
            cache_dir=Path(folder),
            run_dir=Path(folder),
            log=lambda m: None,
        )
        QuantizeStage().run(
            QuantizeConfig(model=source, method="w8a8_dynamic", format="modelslim"), ctx
        )
        result = perplexity(load_model(out).model, ids)
    rows.append(
        ("w8a8_dynamic modelslim, int8 kernels", result.ppl, result.seconds, result.scored_tokens)
    )
    print(f"w8a8d:   ppl {result.ppl:.4f} in {result.seconds:.1f} s")

    load_after = os.getloadavg()[0]
    float_s = rows[0][2]
    verdict = "meets" if float_s < TARGET_S else "misses"
    print(
        f"8k-token float eval: {float_s:.1f} s ({verdict} the {TARGET_S:.0f} s target); "
        f"load average {load_before:.1f} -> {load_after:.1f} on {os.cpu_count()} cores, "
        f"{threads} torch threads"
    )
    figures = {
        "tokens": TOKENS,
        "target_s": TARGET_S,
        "float_eval_s": float_s,
        "load_average": [load_before, load_after],
        "torch_threads": threads,
        "rows": [{"model": m, "ppl": p, "seconds": s, "scored_tokens": n} for m, p, s, n in rows],
    }
    table = ["| model | ppl | seconds |", "|---|---|---|"]
    table += [f"| {m} | {p:.4f} | {s:.1f} |" for m, p, s, _ in rows]
    markdown = (
        f"# Reference runtime: SmolLM2-135M, {rows[0][3]} scored tokens "
        f"(first {TOKENS} of the Botchan eval text)\n\n"
        + "\n".join(table)
        + f"\n\nTarget: float eval under {TARGET_S:.0f} s. Load average during the run: "
        f"{load_before:.1f} -> {load_after:.1f} on {os.cpu_count()} cores; "
        f"{threads} torch threads.\n"
    )
    print(write_results("runtime_eval", figures, markdown))


if __name__ == "__main__":
    main()
