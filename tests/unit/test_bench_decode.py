"""The bench's prefix-cached greedy decoder against the oracle: ``model.generate`` on left-padded prompts."""

from __future__ import annotations

import pytest
import torch

from model_tailor.bench.data import Example, PixelCache, collate_generate, prompt_ids, shared_prefix
from model_tailor.bench.tasks import cache_name, generate


def test_shared_prefix_stops_before_the_stop_token_and_leaves_one_token():
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5]]) == 3
    assert shared_prefix([[1, 2, 9, 4], [1, 2, 9, 5]], stop_token=9) == 2
    assert shared_prefix([[1, 2, 3], [1, 2, 3]]) == 2  # identical rows still leave one token to run
    assert shared_prefix([[7, 2], [1, 2]]) == 0 and shared_prefix([]) == 0


def test_collate_generate_pads_between_prefix_and_suffix_with_contiguous_positions():
    batch = collate_generate([[5, 6, 1, 2, 3], [5, 6, 4]], prefix=2, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 1]]
    assert batch["position_ids"].tolist() == [[2, 3, 4], [1, 1, 2]]  # the pads' positions are never attended to


def test_cache_name_follows_the_forward_signature():
    class Old(torch.nn.Module):  # transformers < 5.24
        def forward(self, input_ids, past_key_values=None, use_cache=None): ...

    class New(torch.nn.Module):  # transformers >= 5.24
        def forward(self, input_ids, cache=None, use_cache=None): ...

    assert cache_name(Old()) == "past_key_values" and cache_name(New()) == "cache"


def _oracle(model, tok, rows, pixel_values, max_new_tokens):
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    extra = {} if pixel_values is None else {"pixel_values": pixel_values}
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        **extra,
    )
    return tok.batch_decode(out[:, width:], skip_special_tokens=True)


@pytest.mark.parametrize("with_image", [False, True])
def test_generate_equals_hf_generate(pico, with_image):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    pair = pico("llava")
    model = LlavaForConditionalGeneration.from_pretrained(pair.finetuned).eval()
    processor = AutoProcessor.from_pretrained(pair.finetuned)
    image = pair.calibration.parent / "img0.png" if with_image else None
    questions = [
        "what color is the car ?",
        "who is there ?",
        "describe this big red house and the small tree",
        "is the dog small ?",
        "where is the cat ?",
    ]
    examples = [Example(q, image) for q in questions]
    vision = model.config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2  # features per image ("default": CLS dropped)
    pixels = PixelCache(processor.image_processor)
    ours = generate(
        model, processor, examples, pixels, max_new_tokens=6, batch_size=3, image_tokens=tokens, desc="test"
    )
    rows = prompt_ids(processor.tokenizer, examples, tokens)
    assert shared_prefix(rows, model.config.image_token_id) > 0  # the cached-prefix path is what is tested
    oracle = []
    for start in range(0, len(rows), 3):  # same batches: padding widths match
        px = pixels.get([ex.image for ex in examples[start : start + 3]]) if with_image else None
        oracle += _oracle(model, processor.tokenizer, rows[start : start + 3], px, 6)
    assert ours == oracle
    assert any(ours)  # something was generated


def test_weights_digest_is_equal_exactly_for_bit_identical_weights():
    from model_tailor.bench.runner import weights_digest
    from model_tailor.kernel.baselines import magnitude_topk, task_arithmetic, ties, wise_ft

    g = torch.Generator().manual_seed(0)
    base, delta = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    digest = weights_digest({"w": base + magnitude_topk(delta, 0.25)})
    assert weights_digest({"w": base + ties([delta], 0.25)}) == digest  # one-model TIES is magnitude top-k
    assert weights_digest({"w": base + magnitude_topk(delta, 0.5)}) != digest
    assert weights_digest({"v": base + magnitude_topk(delta, 0.25)}) != digest  # names count
    assert weights_digest({"w": (base + magnitude_topk(delta, 0.25)).double()}) != digest  # and dtypes
    wise = weights_digest({"w": base + wise_ft(delta, 0.5)})
    assert wise == weights_digest({"w": base + task_arithmetic([delta], 0.5)})  # WiSE-FT alpha = TA scale
    bumped = base + magnitude_topk(delta, 0.25)
    bumped[3, 2] = torch.nextafter(bumped[3, 2], torch.tensor(9.0))
    assert weights_digest({"w": bumped}) != digest  # one ulp is a different model
