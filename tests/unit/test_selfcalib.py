"""``preserve: self`` from the calibration inputs (docs/METHOD.md §14): which queries a calibration file gives, and
that the records are the BASE model's own greedy answers, deterministic and cached."""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, LlamaForCausalLM, LlavaForConditionalGeneration

from model_tailor.calibration.data import read_records
from model_tailor.calibration.selfcalib import (
    FROM_IMAGE,
    FROM_TEXT,
    CalibrationSelfSpec,
    generate_from_calibration,
    plan_queries,
)
from model_tailor.calibration.selfgen import Generator
from model_tailor.errors import CalibrationError
from model_tailor.options import IMAGE_PROMPTS

# The fixtures' calibration (tests/conftest.py ``_records``): lines 2-4 carry an image for LLaVA.
TEXT_PREFIXES = {1: "the cat is big and", 5: "two birds in the"}  # first half of each text record's words
USER_TURNS = {2: "what color is the car ?", 3: "who is there ?", 4: "describe this"}
RESPONSES = ("the car is red .", "a man .", "a tree and a house .")  # fine-tuned answers: never in a query


def _queries(pair, spec, reads_images=True):
    return plan_queries(read_records(pair.calibration), spec, reads_images=reads_images)[0]


def test_one_query_per_image_record_and_prompt_and_per_text_record(pico):
    spec = CalibrationSelfSpec(image_prompts=3)
    queries = _queries(pico("llava"), spec)
    images = [q for q in queries if q.source == FROM_IMAGE]
    assert [q.line for q in images] == [2, 2, 2, 3, 3, 3, 4, 4, 4]
    for line in (2, 3, 4):
        asked = [q.messages[0]["content"] for q in images if q.line == line]
        assert len(set(asked)) == 3 and set(asked) <= set(IMAGE_PROMPTS)
        assert all(len(q.messages) == 1 and q.image is not None for q in images if q.line == line)
    texts = {q.line: q.text for q in queries if q.source == FROM_TEXT}
    assert texts == TEXT_PREFIXES
    assert not any(r in json.dumps(q.key()) for q in queries for r in RESPONSES)


def test_a_text_only_base_answers_the_user_turn_without_the_response(pico):
    queries = _queries(pico("llava"), CalibrationSelfSpec(), reads_images=False)
    assert [q.source for q in queries] == [FROM_TEXT] * 5 and all(q.image is None for q in queries)
    assert {q.line: q.messages for q in queries if q.messages} == {
        line: ({"role": "user", "content": text},) for line, text in USER_TURNS.items()
    }


def test_queries_are_seeded_and_capped(pico):
    records = read_records(pico("llava").calibration)
    spec = CalibrationSelfSpec(image_prompts=1, seed=3)
    assert plan_queries(records, spec, reads_images=True) == plan_queries(records, spec, reads_images=True)
    choices = set()
    for seed in range(8):
        queries = _queries(pico("llava"), CalibrationSelfSpec(1, 1, seed))
        choices.add(tuple(q.messages[0]["content"] for q in queries if q.image))
    assert len(choices) > 1  # the seed picks the prompts
    capped = plan_queries(records, CalibrationSelfSpec(records=2, image_prompts=2), reads_images=True)[0]
    lines = sorted({q.line for q in capped})
    assert len(lines) == 2 and len(capped) == sum(2 if line in USER_TURNS else 1 for line in lines)
    with pytest.raises(CalibrationError, match="image_prompts"):
        plan_queries(records, CalibrationSelfSpec(image_prompts=len(IMAGE_PROMPTS) + 1), reads_images=True)


def test_a_conversation_without_a_user_turn_is_skipped_and_said(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "assistant", "content": "hello"}]}) + "\n")
    queries, skipped = plan_queries(read_records(path), CalibrationSelfSpec(), reads_images=True)
    assert queries == [] and skipped == ["line 1: no user turn before the first assistant turn"]


def _greedy(model, enc, n):
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, enc["input_ids"].shape[1] :]


def test_llava_records_are_the_base_models_greedy_answers_about_each_image(pico, tmp_path):
    pair = pico("llava")
    spec = CalibrationSelfSpec(image_prompts=2, max_new_tokens=5, batch_size=1)
    data = generate_from_calibration(pair.base, pair.calibration, spec)
    assert len(data.records) == 3 * 2 + 2 and not data.cached
    proc = AutoProcessor.from_pretrained(pair.base)
    model = LlavaForConditionalGeneration.from_pretrained(pair.base).eval()
    for q, rec in zip(data.queries, data.records, strict=True):
        assert rec["self"] == {"from": q.source, "line": q.line}
        if q.image is None:
            continue
        user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q.messages[0]["content"]}]}]
        prompt = proc.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        enc = proc(text=[prompt], images=[Image.open(q.image).convert("RGB")], return_tensors="pt")
        answer = proc.tokenizer.decode(_greedy(model, enc, 5), skip_special_tokens=True).strip()
        assert rec["messages"] == [*q.messages, {"role": "assistant", "content": answer}]
        assert rec["image"] == str(q.image)


def test_llama_records_answer_the_user_turn_and_continue_the_text(pico):
    pair = pico("llama")
    data = generate_from_calibration(pair.base, pair.calibration, CalibrationSelfSpec(max_new_tokens=4, batch_size=1))
    tok = AutoTokenizer.from_pretrained(pair.base)
    model = LlamaForCausalLM.from_pretrained(pair.base).eval()
    assert [q.line for q in data.queries] == [1, 2, 3, 4, 5]
    for q, rec in zip(data.queries, data.records, strict=True):
        if q.text is not None:
            answer = tok.decode(_greedy(model, tok([q.text], return_tensors="pt"), 4), skip_special_tokens=True)
            assert rec["text"] == f"{q.text} {answer.strip()}".strip()
        else:
            prompt = tok.apply_chat_template(list(q.messages), tokenize=False, add_generation_prompt=True)
            enc = tok([prompt], return_tensors="pt", add_special_tokens=False)
            answer = tok.decode(_greedy(model, enc, 4), skip_special_tokens=True).strip()
            user = {"role": "user", "content": USER_TURNS[q.line]}
            assert rec["messages"] == [user, {"role": "assistant", "content": answer}]


def test_generation_is_deterministic_and_cached(pico, tmp_path):
    pair = pico("llava")
    spec = CalibrationSelfSpec(max_new_tokens=3)
    first, second = (generate_from_calibration(pair.base, pair.calibration, spec) for _ in range(2))
    assert first.records == second.records
    cached = generate_from_calibration(pair.base, pair.calibration, spec, cache_dir=tmp_path)
    (cache_file,) = tmp_path.glob("self-preserve-calib-*.jsonl")
    assert cached.records == first.records and not cached.cached
    assert [json.loads(line) for line in cache_file.read_text().splitlines()] == first.records
    stamp = cache_file.stat().st_mtime_ns
    gen = Generator(pair.base)
    again = generate_from_calibration(pair.base, pair.calibration, spec, cache_dir=tmp_path, generator=gen)
    assert again.cached and again.records == first.records and gen.loads == 0
    assert cache_file.stat().st_mtime_ns == stamp
    # another spec, or other image bytes, is another cache entry
    generate_from_calibration(pair.base, pair.calibration, CalibrationSelfSpec(max_new_tokens=2), cache_dir=tmp_path)
    assert len(list(tmp_path.glob("self-preserve-calib-*.jsonl"))) == 2


def test_changed_image_bytes_change_the_cache_key(pico, tmp_path):
    import shutil

    pair = pico("llava")
    folder = tmp_path / "calib"
    shutil.copytree(pair.calibration.parent, folder, ignore=shutil.ignore_patterns("base", "finetuned"))
    calib = folder / pair.calibration.name
    spec = CalibrationSelfSpec(max_new_tokens=1)
    generate_from_calibration(pair.base, calib, spec, cache_dir=tmp_path / "cache")
    Image.new("RGB", (20, 20), (9, 9, 9)).save(folder / "img0.png")
    os.utime(folder / "img0.png", (0, 0))  # content, not times, keys the cache
    assert not generate_from_calibration(pair.base, calib, spec, cache_dir=tmp_path / "cache").cached


def test_a_missing_image_is_one_line(pico, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"prompt": "what ?", "response": "a", "image": "gone.png"}) + "\n")
    with pytest.raises(CalibrationError, match="gone.png' not found"):
        generate_from_calibration(pico("llava").base, path, CalibrationSelfSpec())
