"""Task accuracy with lm-eval-harness (its Python API, `lm_eval.simple_evaluate`).

Models are scored by gcupipe's reference runtime through a small lm-eval model adapter
(`ReferenceLM`: log-likelihoods from the same integer math validate uses), so the float model
and the quantized one run the same tasks the same way. Tasks are lm-eval task names or local
task directories (lm-eval's YAML task format); `botchan_last_word` is built here from data on
PyPI (`build_botchan_last_word`), since no dataset hub is reachable from CI.

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
    """An lm-eval model on gcupipe's reference runtime (float or any quantized format)."""
    api = require("lm_eval.api.model", "eval")
    torch = require("torch", "quant")
    from gcupipe.formats.tokenizer import load_tokenizer
    from gcupipe.runtime.load import load_model
    from gcupipe.runtime.perplexity import logits_of

    class ReferenceLM(api.LM):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.model = load_model(model_dir).model
            self.tokenizer = load_tokenizer(model_dir)

        def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
            answers = []
            for request in requests:
                context, continuation = request.args
                ids = self.tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
                head = self.tokenizer(context, add_special_tokens=False)["input_ids"]
                # the continuation's tokens: what follows the context's (one more when the
                # last context token merged into the continuation)
                shared = len(head) if ids[: len(head)] == head else len(head) - 1
                count = max(1, len(ids) - shared)
                ids = ids[-max_length:]
                with torch.no_grad():
                    logits = logits_of(self.model, torch.tensor([ids]))[0].float()
                logprobs = torch.log_softmax(logits[-count - 1 : -1], dim=-1)
                targets = torch.tensor(ids[-count:])
                picked = logprobs.gather(1, targets[:, None])[:, 0]
                greedy = bool((logprobs.argmax(-1) == targets).all())
                answers.append((float(picked.sum()), greedy))
            return answers

        def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
            raise StageError("evaluate: the reference engine scores loglikelihood tasks only")

        def generate_until(self, requests: list[Any]) -> list[str]:
            raise StageError("evaluate: generation tasks need a served model (engine: endpoint)")

    return ReferenceLM()


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
