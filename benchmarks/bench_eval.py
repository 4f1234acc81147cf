"""What one TailorBench evaluation costs: greedy decoding plus a separate likelihood pass, against the single pass.

An evaluation is most of the benchmark's wall time (every row is one), so this times both ways of scoring a model
on the bench's test subsets, on a model folder the bench built (e.g. ``$MODEL_TAILOR_CACHE/tailorbench/stage1-*/
pretrained``):

* ``separate``: ``tasks.generate`` then ``likelihood.answer_logprobs`` (two prompt passes per item);
* ``single``: ``tasks.generate_and_score`` (the reference teacher-forced on the decoding's prompt cache).

It checks that the greedy answers are identical and reports the largest log-probability difference, then prints
seconds per task and the totals, and writes them as JSON with ``--out``.

    python benchmarks/bench_eval.py --model DIR [--tasks captioning] [--quick] [--threads 2] [--out eval.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from model_tailor.bench.data import PixelCache
from model_tailor.bench.likelihood import answer_logprobs
from model_tailor.bench.models import load_model
from model_tailor.bench.tasks import EvalConfig, build_tasks, generate, generate_and_score


def time_task(model, processor, task, pixels: PixelCache, cfg: EvalConfig, image_tokens: int) -> dict:
    common = {"batch_size": cfg.batch_size, "image_tokens": image_tokens}
    t0 = time.perf_counter()
    answers = generate(
        model, processor, task.examples, pixels, max_new_tokens=task.max_new_tokens, desc="gen", **common
    )
    t1 = time.perf_counter()
    plain = answer_logprobs(model, processor, task.examples, pixels, desc="loglik", **common)
    t2 = time.perf_counter()
    fused_answers, fused = generate_and_score(
        model, processor, task.examples, pixels, max_new_tokens=task.max_new_tokens, desc="single", **common
    )
    t3 = time.perf_counter()
    return {
        "items": len(task.examples),
        "separate_s": t2 - t0,
        "generate_s": t1 - t0,
        "loglik_s": t2 - t1,
        "single_s": t3 - t2,
        "answers_equal": answers == fused_answers,
        "max_logprob_diff": max(abs(a - b) for a, b in zip(plain, fused, strict=True)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="a bench-built LLaVA folder")
    ap.add_argument("--tasks", nargs="*", default=[], help="only these tasks (default all three)")
    ap.add_argument("--quick", action="store_true", help="the quick subsets")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = EvalConfig.quick() if args.quick else EvalConfig()
    model, processor = load_model(args.model, "cpu")
    pixels = PixelCache(processor.image_processor)
    tasks = [t for t in build_tasks(cfg) if not args.tasks or t.name in args.tasks]
    images = list(dict.fromkeys(ex.image for t in tasks for ex in t.examples if ex.image is not None))
    for i in range(0, len(images), 64):  # decode every image before timing, so neither way pays for it
        pixels.get(images[i : i + 64])
    rows = {t.name: time_task(model, processor, t, pixels, cfg, model.config.image_seq_length) for t in tasks}
    total = {k: sum(r[k] for r in rows.values()) for k in ("separate_s", "single_s")}
    print(f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}")
    head = f"{'task':<12} {'items':>6} {'generate s':>11} {'loglik s':>9} {'single s':>9}"
    print(f"{head} {'same answers':>13} {'max dLL':>9}")
    for name, r in rows.items():
        print(
            f"{name:<12} {r['items']:>6} {r['generate_s']:>11.1f} {r['loglik_s']:>9.1f} {r['single_s']:>9.1f} "
            f"{str(r['answers_equal']):>13} {r['max_logprob_diff']:>9.1e}"
        )
    print(f"total: separate {total['separate_s']:.1f} s, single {total['single_s']:.1f} s "
          f"({total['single_s'] / total['separate_s']:.2f}x)")  # fmt: skip
    if args.out:
        meta = {"machine": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__}
        args.out.write_text(json.dumps({"meta": meta, "tasks": rows, "total": total}, indent=1) + "\n")


if __name__ == "__main__":
    main()
