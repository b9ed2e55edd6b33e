"""How much do quantized SmolLM2 results move under a float-only change? The noise floor that every
numeric threshold in the tests must sit outside of.

Two engines (or two CPUs) share the integer math of a quantized model but not their float kernels
(norms, attention, summation order). Per-token int8 activations round every activation of every
layer, so a rounding-sized float change moves some of them across a rounding boundary, and on
SmolLM2 that changes perplexity by about a percent and flips greedy choices. This script takes
one quantized model and measures it in several "float draws":

- the reference runtime in float32 (the baseline),
- the same runtime in float64,
- float32 with every decoder layer's input-norm output scaled by (1 + 1e-6 N(0, 1)), three seeds
  (the size of a different summation order).

A. On the eval text the tests use (2,048 Botchan tokens): the perplexity increase over float and
   the validate stage's token agreement (top-1 at positions where float leads by >= 1 logit),
   per draw: their spread is the noise of those gates.
B. On the serve test's positions (8 prompts x 16 greedy tokens of the float32 runtime): the mean
   |delta log-prob| of those tokens between the baseline and each draw: the noise of any
   engine-vs-runtime log-prob comparison. Each row also compares a model that is really
   different (float, another method), which a tolerance must still tell apart.

Writes benchmarks/results/greedy_stability.{md,json}.

    python benchmarks/greedy_stability.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_results  # noqa: E402

EVAL_TOKENS = 2048
NEW_TOKENS = 16
NOISE = 1e-6
SEEDS = (0, 1, 2)
AGREEMENT_MARGIN = 1.0
METHODS = {
    "w8a16": {"method": "w8a16"},
    "w8a8_dynamic": {"method": "w8a8_dynamic"},
    "w4a16_g64": {"method": "w4a16", "group_size": 64},
}


def perturbed(model: Any, seed: int) -> Any:
    """`model` with each decoder layer's input-norm output scaled by (1 + NOISE N(0,1))."""
    import torch

    generator = torch.Generator().manual_seed(seed)

    def hook(_module: Any, _args: Any, out: Any) -> Any:
        return out * (1 + NOISE * torch.randn(out.shape, generator=generator, dtype=out.dtype))

    for name, module in model.named_modules():
        if name.endswith("input_layernorm"):
            module.register_forward_hook(hook)
    return model


def draws(model_dir: Path) -> dict[str, Any]:
    from gcupipe.runtime.load import load_model

    models = {
        "float32": load_model(model_dir).model,
        "float64": load_model(model_dir, dtype="float64").model,
    }
    for seed in SEEDS:
        models[f"noise seed {seed}"] = perturbed(load_model(model_dir).model, seed)
    return models


def token_logprobs(model: Any, sequences: list[tuple[list[int], list[int]]]) -> Any:
    """Teacher-forced log-prob of each continuation token: one tensor [prompts x tokens]."""
    import torch

    from gcupipe.runtime.perplexity import logits_of

    rows = []
    with torch.inference_mode():
        for prompt, new in sequences:
            logits = logits_of(model, torch.tensor([prompt + new]))[0, len(prompt) - 1 : -1]
            log_probs = torch.log_softmax(logits.double(), dim=-1)
            rows.append(log_probs.gather(1, torch.tensor(new).unsqueeze(1))[:, 0])
    return torch.stack(rows)


def main() -> None:
    from gcupipe.formats.tokenizer import load_tokenizer, text_token_ids, tokenizer_dir
    from gcupipe.runtime.load import load_model
    from gcupipe.runtime.perplexity import greedy_generate, perplexity
    from gcupipe.stages.base import StageContext
    from gcupipe.stages.quantize import QuantizeConfig, QuantizeStage
    from gcupipe.testing.real_data import GREEDY_PROMPTS, botchan_text, smollm2_checkpoint
    from gcupipe.validation.numeric import compare_scores

    source = smollm2_checkpoint()
    ids = text_token_ids(botchan_text()[1], tokenizer_dir(source), 49152, EVAL_TOKENS)
    float_scores = perplexity(load_model(source).model, ids)
    tokenizer = load_tokenizer(source)
    prompts = [tokenizer(prompt)["input_ids"] for prompt in GREEDY_PROMPTS]
    eval_rows: list[dict[str, Any]] = []
    position_rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        dirs = {}
        for name, config in METHODS.items():
            dirs[name] = out = work / name
            out.mkdir()
            QuantizeStage().run(
                QuantizeConfig(model=source, format="modelslim", **config),
                StageContext("q", out, work, work, work, log=lambda message: None),
            )
        for name in ("w8a16", "w8a8_dynamic"):
            models = draws(dirs[name])
            for draw, model in models.items():
                metrics = compare_scores(float_scores, perplexity(model, ids), AGREEMENT_MARGIN)
                eval_rows.append(
                    {
                        "method": name,
                        "draw": draw,
                        "ppl_increase": metrics.ppl_increase,
                        "token_agreement": metrics.token_agreement,
                        "confident_positions": metrics.confident_positions,
                    }
                )
                print(eval_rows[-1], flush=True)
            baseline = models.pop("float32")
            sequences = [(p, greedy_generate(baseline, p, NEW_TOKENS)) for p in prompts]
            want = token_logprobs(baseline, sequences)
            others = {**models, "float model (not quantized)": load_model(source).model}
            if name == "w8a8_dynamic":
                others["w4a16 g64 (another method)"] = load_model(dirs["w4a16_g64"]).model
            for draw, model in others.items():
                delta = (token_logprobs(model, sequences) - want).abs()
                position_rows.append(
                    {
                        "method": name,
                        "against": draw,
                        "mean_abs_logprob_delta": float(delta.mean()),
                        "max_abs_logprob_delta": float(delta.max()),
                    }
                )
                print(position_rows[-1], flush=True)
    markdown = render(eval_rows, position_rows, float_scores.ppl)
    figures = {
        "eval_tokens": EVAL_TOKENS,
        "noise": NOISE,
        "agreement_margin": AGREEMENT_MARGIN,
        "float_ppl": float_scores.ppl,
        "eval": eval_rows,
        "positions": position_rows,
    }
    print(write_results("greedy_stability", figures, markdown))


def small(value: float) -> str:
    return f"{value:.4f}" if value >= 1e-3 else f"{value:.1e}"


def spread(rows: list[dict[str, Any]], key: str) -> tuple[float, float]:
    values = [r[key] for r in rows if r[key] is not None]
    return min(values), max(values)


def render(
    eval_rows: list[dict[str, Any]], position_rows: list[dict[str, Any]], float_ppl: float
) -> str:
    lines = [
        "# Float-rounding noise of quantized SmolLM2-135M",
        "",
        f"Draws: the reference runtime in float32 (baseline), in float64, and in float32 with "
        f"each decoder layer's input-norm output scaled by (1 + {NOISE:g} N(0,1)) for "
        f"{len(SEEDS)} seeds. Same integer math in every draw: only float rounding differs.",
        "",
        f"## A. Validate gates on {EVAL_TOKENS} eval tokens (float perplexity {float_ppl:.3f})",
        "",
        f"| method | draw | ppl increase | top-1 agreement (float leads >= {AGREEMENT_MARGIN:g}) "
        "| confident positions |",
        "|---|---|---|---|---|",
    ]
    for r in eval_rows:
        agreement = "-" if r["token_agreement"] is None else f"{r['token_agreement']:.2%}"
        lines.append(
            f"| {r['method']} | {r['draw']} | {r['ppl_increase']:+.2%} | {agreement} "
            f"| {r['confident_positions']} |"
        )
    lines += ["", "Spread over the draws (the noise a gate threshold must stay outside of):", ""]
    for method in dict.fromkeys(r["method"] for r in eval_rows):
        rows = [r for r in eval_rows if r["method"] == method]
        low, high = spread(rows, "ppl_increase")
        a_low, a_high = spread(rows, "token_agreement")
        lines.append(
            f"- {method}: ppl increase {low:+.2%} .. {high:+.2%}; "
            f"agreement {a_low:.2%} .. {a_high:.2%}"
        )
    lines += [
        "",
        f"## B. Log-prob of {NEW_TOKENS} greedy tokens x 8 prompts, against the float32 baseline",
        "",
        "| method | against | mean abs delta log-prob | max |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['method']} | {r['against']} | {small(r['mean_abs_logprob_delta'])} "
        f"| {small(r['max_abs_logprob_delta'])} |"
        for r in position_rows
    ]
    lines += [
        "",
        "An engine whose float kernels differ from the runtime's (vLLM) lands among the noise "
        "draws; a tolerance for it must sit above them and below the rows that compare a really "
        "different model.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
