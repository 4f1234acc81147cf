"""The drift probe: its prompts (held out, off the test topics), its cached references and its scores."""

from __future__ import annotations

import json
import re

import pytest
import torch

from model_tailor.bench import assets, probe
from model_tailor.bench.data import Example, PixelCache
from model_tailor.bench.likelihood import answer_logprobs
from model_tailor.bench.tasks import EvalConfig, generate, greedy_tokens
from model_tailor.calibration.selfgen import load_instructions


def test_probe_prompts_are_held_out_from_self_preserve_and_off_the_test_topics():
    pool = probe.instructions()
    assert len(pool) == len(set(pool)) >= EvalConfig().n_probe  # the full variant's draw fits the pool
    assert not set(pool) & set(load_instructions())  # --preserve self trains on those
    words = set(assets.COLORS) | set(assets.SHAPES) | {"capital", "country"}
    for prompt in pool:
        assert not re.search(r"\d", prompt), prompt  # no arithmetic
        assert not set(re.findall(r"[a-z]+", prompt.lower())) & words, prompt


def test_probe_draw_is_seeded_and_sized_by_the_eval_config():
    cfg = EvalConfig.quick()
    got = probe.probe_instructions(cfg)
    assert got == probe.probe_instructions(cfg) and len(got) == cfg.n_probe == len(set(got))
    assert set(got) <= set(probe.instructions())
    assert probe.probe_instructions(EvalConfig(seed=7, n_probe=cfg.n_probe)) != got
    assert len(probe.probe_instructions(EvalConfig(n_probe=10_000))) == len(probe.instructions())


def _load(pico):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    pair = pico("llava")
    model = LlavaForConditionalGeneration.from_pretrained(pair.finetuned).eval()
    processor = AutoProcessor.from_pretrained(pair.finetuned)
    vision = model.config.vision_config
    return model, processor, (vision.image_size // vision.patch_size) ** 2


def test_greedy_tokens_are_the_decoded_answers_cut_after_the_first_eos(pico):
    model, processor, image_tokens = _load(pico)
    examples = [Example(p) for p in probe.instructions()[:5]]
    pixels = PixelCache(processor.image_processor)
    common = {"max_new_tokens": 6, "batch_size": 2, "image_tokens": image_tokens}
    tokens = greedy_tokens(model, processor, examples, pixels, desc="t", **common)
    eos = processor.tokenizer.eos_token_id
    assert all(1 <= len(t) <= 6 for t in tokens)
    assert all(eos not in t[:-1] and (t[-1] == eos or len(t) == 6) for t in tokens)
    decoded = processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)
    assert decoded == generate(model, processor, examples, pixels, desc="t", **common)


def test_drift_task_scores_exactly_the_base_answers_and_caches_them(pico, tmp_path, monkeypatch):
    model, processor, image_tokens = _load(pico)
    cfg = EvalConfig.tiny()
    task = probe.drift_task(model, processor, cfg, tmp_path, image_tokens, "cpu")
    assert task.probe and task.name == "drift" and len(task.examples) == cfg.n_probe == len(task.references)
    assert [ex.prompt for ex in task.examples] == probe.probe_instructions(cfg)
    (cached,) = (tmp_path / "probe").glob("*.json")
    assert json.loads(cached.read_text())["tokens"] == task.references
    # each reference token is the base's argmax given the tokens before it: changing only the last token of every
    # reference can only lower its score (the earlier positions are scored on identical contexts)
    pixels = PixelCache(processor.image_processor)
    common = {"batch_size": 2, "image_tokens": image_tokens}
    scores = answer_logprobs(model, processor, task.examples, pixels, references=task.references, **common)
    vocab = model.config.text_config.vocab_size
    other = [ref[:-1] + [(ref[-1] + 1) % vocab] for ref in task.references]
    worse = answer_logprobs(model, processor, task.examples, pixels, references=other, **common)
    assert all(s >= w - 1e-5 for s, w in zip(scores, worse, strict=True))
    # a second call reads the cache (no decoding), with the same references
    monkeypatch.setattr(probe, "greedy_tokens", lambda *a, **k: pytest.fail("decoded again"))
    again = probe.drift_task(model, processor, cfg, tmp_path, image_tokens, "cpu")
    assert again.references == task.references and again.examples == task.examples
    with pytest.raises(ValueError, match="probe_tokens"):
        probe.drift_task(model, processor, EvalConfig(probe_tokens=0), tmp_path, image_tokens, "cpu")


def test_drift_of_the_pretrained_model_is_exactly_zero_and_a_perturbed_one_moves(pico, tmp_path):
    from model_tailor.bench.evaluation import evaluate

    model, processor, image_tokens = _load(pico)
    cfg = EvalConfig.tiny()
    task = probe.drift_task(model, processor, cfg, tmp_path, image_tokens, "cpu")
    pixels = PixelCache(processor.image_processor)
    base = evaluate(model, processor, [task], pixels, cfg, image_tokens).items["drift"]
    assert base["hit"] == [] and base["answer"] == [] and len(base["logprob"]) == cfg.n_probe
    assert evaluate(model, processor, [task], pixels, cfg, image_tokens).items["drift"] == base  # deterministic
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    moved = evaluate(model, processor, [task], pixels, cfg, image_tokens).items["drift"]["logprob"]
    drift = sum(b - m for b, m in zip(base["logprob"], moved, strict=True)) / cfg.n_probe
    assert drift != 0.0
