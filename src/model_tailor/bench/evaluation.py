"""TailorBench evaluation of one model: greedy answers and the reference answers' likelihood, per item.

Every item keeps its outcome (``hit``), its greedy ``answer`` and its ``logprob`` (the score of
``bench.likelihood``, computed on the decoding's own prompt pass by ``tasks.generate_and_score``), so
any row can be re-scored or re-analysed from the stored items without running the model again. A probe task
(``Task.probe``: the drift probe of ``bench.probe``) is scored by likelihood alone, its items' ``hit`` and
``answer`` lists empty, and it has no accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from model_tailor.bench.data import PixelCache
from model_tailor.bench.likelihood import answer_logprobs
from model_tailor.bench.tasks import EvalConfig, Task, generate_and_score


@dataclass(frozen=True)
class TaskResult:
    scores: dict[str, float]  # accuracy per task (probe tasks have none)
    samples: dict[str, list[tuple[str, str]]]  # a few (answer, truth) pairs per task, for the report
    items: dict[str, dict[str, list]]  # task -> {"hit": [0/1], "logprob": [float], "answer": [str]}, item order

    def loglik(self) -> dict[str, float]:
        """Mean per-item log-likelihood of the reference answers, per task."""
        return {t: sum(v["logprob"]) / max(1, len(v["logprob"])) for t, v in self.items.items()}


def evaluate(
    model, processor, tasks: Sequence[Task], pixels: PixelCache, cfg: EvalConfig, image_tokens: int, label: str = ""
) -> TaskResult:
    """Score one model on every task: greedy accuracy and teacher-forced likelihood, item by item."""
    scores, samples, items = {}, {}, {}
    for task in tasks:
        common = {"batch_size": cfg.batch_size, "image_tokens": image_tokens}
        if task.probe:
            desc = f"eval {label} {task.name}"
            logprobs = answer_logprobs(
                model, processor, task.examples, pixels, desc=desc, references=task.references, **common
            )
            items[task.name] = {"hit": [], "logprob": logprobs, "answer": []}
            continue
        answers, logprobs = generate_and_score(
            model,
            processor,
            task.examples,
            pixels,
            max_new_tokens=task.max_new_tokens,
            desc=f"eval {label} {task.name}",
            **common,
        )
        hits = [int(task.hit(a, ex.response)) for a, ex in zip(answers, task.examples, strict=True)]
        scores[task.name] = sum(hits) / max(1, len(hits))
        samples[task.name] = [(a, ex.response) for a, ex in zip(answers[:3], task.examples[:3], strict=True)]
        items[task.name] = {"hit": hits, "logprob": logprobs, "answer": answers}
    return TaskResult(scores, samples, items)
