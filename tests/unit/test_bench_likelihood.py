"""The bench's teacher-forced answer log-likelihood on a pico LLaVA, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from model_tailor.bench.data import Example, PixelCache, answer_ids, prompt_ids
from model_tailor.bench.likelihood import answer_logprobs

QA = [
    ("what color is the car ?", "red"),
    ("who is there ?", "a man and a woman"),
    ("describe this big red house and the small tree", "a big red house ."),
    ("is the dog small ?", "yes"),
    ("where is the cat ?", "on the tree"),
]


def _load(pico):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    pair = pico("llava")
    model = LlavaForConditionalGeneration.from_pretrained(pair.finetuned).eval()
    processor = AutoProcessor.from_pretrained(pair.finetuned)
    vision = model.config.vision_config
    return pair, model, processor, (vision.image_size // vision.patch_size) ** 2


def _examples(pair, with_image):
    image = pair.calibration.parent / "img0.png" if with_image else None
    return [Example(q, image, a) for q, a in QA]


def test_uniform_model_scores_minus_log_vocab(pico):
    # all-zero LM head: every logit is 0, so every token has probability 1/V and every mean log-prob is -log V
    pair, model, processor, tokens = _load(pico)
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.zero_()
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()
    examples = _examples(pair, with_image=False)
    got = answer_logprobs(
        model, processor, examples, PixelCache(processor.image_processor), batch_size=2, image_tokens=tokens
    )
    assert got == pytest.approx([-math.log(head.weight.shape[0])] * len(QA), abs=1e-5)


@pytest.mark.parametrize("with_image", [False, True])
def test_batched_prefix_cached_scores_equal_one_plain_forward_per_item(pico, with_image):
    pair, model, processor, tokens = _load(pico)
    examples = _examples(pair, with_image)
    pixels = PixelCache(processor.image_processor)
    got = answer_logprobs(model, processor, examples, pixels, batch_size=3, image_tokens=tokens)
    tok = processor.tokenizer
    expected = []
    for ex, prompt, answer in zip(examples, prompt_ids(tok, examples, tokens), answer_ids(tok, examples), strict=True):
        ids = torch.tensor([prompt + answer])
        extra = {"pixel_values": pixels.get([ex.image])} if with_image else {}
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids, **extra).logits[0].float(), dim=-1)
        positions = range(len(prompt) - 1, len(prompt) + len(answer) - 1)  # the logit before each answer token
        expected.append(sum(logp[p, t].item() for p, t in zip(positions, answer, strict=True)) / len(answer))
    assert len({len(a) for a in answer_ids(tok, examples)}) > 1  # answers of several lengths share a batch
    assert got == pytest.approx(expected, abs=1e-4)
    assert all(v < 0 for v in got)


@pytest.mark.parametrize("with_image", [False, True])
def test_scores_on_the_decoding_prompt_pass_equal_the_separate_pass_and_leave_the_answers_unchanged(pico, with_image):
    # generate_and_score teacher-forces the reference on the prompt's KV cache and crops it back before decoding:
    # the same scores as a separate likelihood pass, and bit-for-bit the same greedy answers as plain decoding
    from model_tailor.bench.tasks import generate, generate_and_score

    pair, model, processor, tokens = _load(pico)
    examples = _examples(pair, with_image)
    pixels = PixelCache(processor.image_processor)
    common = {"max_new_tokens": 6, "batch_size": 3, "image_tokens": tokens, "desc": "t"}
    answers, scores = generate_and_score(model, processor, examples, pixels, **common)
    assert answers == generate(model, processor, examples, pixels, **common)
    plain = answer_logprobs(model, processor, examples, pixels, batch_size=3, image_tokens=tokens)
    assert scores == pytest.approx(plain, abs=1e-4)
    assert len(scores) == len(QA)
