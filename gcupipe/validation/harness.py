"""Task accuracy with lm-eval-harness (its Python API, `lm_eval.simple_evaluate`).

Models are scored by one of two engines: gcupipe's reference runtime through a small lm-eval
model adapter (`ReferenceLM`: log-likelihoods from the same integer math validate uses), or a
vLLM OpenAI server through lm-eval's own `local-completions` model. Both are lm-eval
`TemplateLM`s, so the same documents become the same tokens on either. Tasks are lm-eval task
names or local task directories (lm-eval's YAML task format); `botchan_last_word` is built here
from data on PyPI (`build_botchan_last_word`), since no dataset hub is reachable from CI.

Construction of botchan_last_word: the evaluation part of Botchan (Project Gutenberg #8868,
public domain, read from the sentencepiece source distribution: the 70% of body lines that
calibration never sees) is split into sentences; every sentence of at least 12 words whose
last word is alphabetic becomes one document: the context is the two sentences before it and
the sentence up to its last word, the target is " " + that last word (LAMBADA-style cloze;
metric: acc = the target is the model's greedy continuation)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gcupipe.errors import StageError, require

BOTCHAN_TASK = "botchan_last_word"
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"^[A-Za-z]+$")


@dataclass(frozen=True)
class TaskScore:
    """One task's headline metric for one model, with the standard error lm-eval reports."""

    task: str
    metric: str
    value: float
    stderr: float | None
    samples: int


def build_botchan_last_word(folder: Path, limit: int | None = None) -> Path:
    """Write the botchan_last_word task (data + lm-eval YAML) into `folder`; returns it."""
    from gcupipe.testing.real_data import botchan_text

    _, evaluation = botchan_text()
    sentences = [s.strip() for s in _SENTENCE.split(" ".join(evaluation.split())) if s.strip()]
    docs = []
    for index, sentence in enumerate(sentences):
        words = sentence.split()
        last = words[-1].rstrip(".!?\"'”’,;:") if words else ""
        if len(words) < 12 or not _WORD.match(last):
            continue
        prefix = sentence[: sentence.rfind(last)].rstrip()
        context = " ".join([*sentences[max(0, index - 2) : index], prefix])
        docs.append({"context": context, "target": " " + last})
        if limit is not None and len(docs) >= limit:
            break
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{BOTCHAN_TASK}.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (folder / f"{BOTCHAN_TASK}.yaml").write_text(
        f"task: {BOTCHAN_TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {json.dumps(str(data))}}}}}\n"
        "test_split: test\n"
        "output_type: loglikelihood\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_target: "{{target}}"\n'
        "metric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
    )
    return folder


def reference_lm(model_dir: Path, max_length: int = 2048) -> Any:
    """An lm-eval model on gcupipe's reference runtime (float or any quantized format).

    It is a `TemplateLM`, so lm-eval splits context and continuation into tokens exactly as it
    does for the served engine; only the log-probabilities come from elsewhere."""
    api = require("lm_eval.api.model", "eval")
    torch = require("torch", "quant")
    from gcupipe.formats.tokenizer import load_tokenizer
    from gcupipe.runtime.load import load_model
    from gcupipe.runtime.perplexity import logits_of

    class ReferenceLM(api.TemplateLM):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.model = load_model(model_dir).model
            self.tokenizer = load_tokenizer(model_dir)

        @property
        def eot_token_id(self) -> int:
            return int(self.tokenizer.eos_token_id)

        def tok_encode(self, string: str, **kwargs: Any) -> list[int]:
            return list(self.tokenizer(string, add_special_tokens=False)["input_ids"])

        def _loglikelihood_tokens(
            self, requests: list[Any], disable_tqdm: bool = False
        ) -> list[tuple[float, bool]]:
            answers = []
            for _, context, continuation in requests:
                ids = (context + continuation)[-max_length - 1 :]
                with torch.no_grad():
                    logits = logits_of(self.model, torch.tensor([ids[:-1]]))[0].float()
                logprobs = torch.log_softmax(logits[-len(continuation) :], dim=-1)
                targets = torch.tensor(continuation)
                picked = logprobs.gather(1, targets[:, None])[:, 0]
                greedy = bool((logprobs.argmax(-1) == targets).all())
                answers.append((float(picked.sum()), greedy))
            return answers

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> Any:
            raise StageError("evaluate: the reference engine scores loglikelihood tasks only")

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> Any:
            raise StageError("evaluate: generation tasks need a served model (engine: served)")

    return ReferenceLM()


def served_lm(base_url: str, model_dir: Path, concurrency: int, max_length: int = 2048) -> Any:
    """lm-eval's own `local-completions` model on an OpenAI-compatible server (vLLM's), which
    is asked for the name it serves; tokens are counted with the model's own tokenizer."""
    completions = require("lm_eval.models.openai_completions", "eval")
    name = served_model_name(base_url)
    return completions.LocalCompletionsAPI(
        model=name,
        base_url=base_url.rstrip("/") + "/v1/completions",
        tokenizer=str(model_dir),
        tokenizer_backend="huggingface",
        num_concurrent=concurrency,
        max_length=max_length,
        max_retries=3,
    )


def served_model_name(base_url: str, timeout_s: float = 10.0) -> str:
    """The model id an OpenAI-compatible server answers to; StageError when it does not answer."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/v1/models", timeout=timeout_s) as r:
            models = json.loads(r.read()).get("data") or []
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise StageError(f"evaluate: no OpenAI server answers at {base_url} ({exc})") from exc
    if not models:
        raise StageError(f"evaluate: the server at {base_url} serves no model")
    return str(models[0]["id"])


def run_tasks(lm: Any, tasks: list[str], include: list[Path], limit: int | None) -> list[TaskScore]:
    """lm-eval's own evaluation of `tasks` (names; `include` holds local task directories)."""
    lm_eval = require("lm_eval", "eval")
    tasks_module = require("lm_eval.tasks", "eval")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local data files; no dataset hub
    manager = tasks_module.TaskManager(include_path=[str(p) for p in include] or None)
    unknown = [name for name in tasks if name not in manager.all_tasks]
    if unknown:
        raise StageError(
            f"evaluate: unknown lm-eval task {', '.join(map(repr, unknown))}: give an lm-eval "
            f"task name, a local task directory, or {BOTCHAN_TASK!r}"
        )
    output = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=0
    )
    scores = []
    for task in tasks:
        result = output["results"][task]
        metric = next(key for key in result if key.endswith(",none") and "_stderr" not in key)
        stderr = result.get(metric.replace(",", "_stderr,", 1))
        scores.append(
            TaskScore(
                task,
                metric.split(",")[0],
                float(result[metric]),
                float(stderr) if isinstance(stderr, int | float) else None,
                int(output.get("n-samples", {}).get(task, {}).get("effective", 0)),
            )
        )
    return scores
