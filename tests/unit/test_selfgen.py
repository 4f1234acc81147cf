"""``--preserve self``: shipped instructions, seeded sampling, deterministic cached generation."""

from __future__ import annotations

import json
import re

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from model_tailor.calibration.selfgen import (
    SelfPreserveSpec,
    generate_self_preserve,
    load_instructions,
    sample_instructions,
)
from model_tailor.errors import ConfigError

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def pico_llama(tmp_path_factory):
    words = ["<unk>", "<pad>", "</s>", "<user>", "<assistant>"] + [f"w{i}" for i in range(59)]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=1, eos_token_id=2, bos_token_id=2,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("pico-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_shipped_instructions_are_generic_and_disjoint_from_bench_topics():
    instructions = load_instructions()
    assert len(instructions) >= 128 and len(set(instructions)) == len(instructions)
    banned = {"capital", "capitals", "rectangle", "triangle", "circle", "blue", "red", "green", "yellow", "teal"}
    words = [set(re.findall(r"[a-z]+", i.lower())) for i in instructions]
    assert not [i for i, w in zip(instructions, words, strict=True) if w & banned]


def test_sampling_is_seeded_and_capped(caplog):
    assert sample_instructions(10, 3) == sample_instructions(10, 3)
    assert sample_instructions(10, 3) != sample_instructions(10, 4)
    everything = sample_instructions(10_000, 0)
    assert sorted(everything) == sorted(load_instructions())
    assert "using all" in caplog.text
    with pytest.raises(ConfigError):
        sample_instructions(0, 0)


def test_generation_is_deterministic_and_cached(pico_llama, tmp_path):
    spec = SelfPreserveSpec(samples=5, seed=7, max_new_tokens=4, batch_size=2)
    first = generate_self_preserve(pico_llama, spec)
    second = generate_self_preserve(pico_llama, spec)
    assert first == second and len(first) == 5
    assert [r["messages"][0]["content"] for r in first] == sample_instructions(5, 7)
    assert all(r["messages"][1]["role"] == "assistant" for r in first)
    cached = generate_self_preserve(pico_llama, spec, cache_dir=tmp_path)
    files = list(tmp_path.glob("self-preserve-*.jsonl"))
    assert cached == first and len(files) == 1
    assert [json.loads(line) for line in files[0].read_text().splitlines()] == first
    other = generate_self_preserve(
        pico_llama, SelfPreserveSpec(samples=3, seed=7, max_new_tokens=4), cache_dir=tmp_path
    )
    assert len(other) == 3 and len(list(tmp_path.glob("self-preserve-*.jsonl"))) == 2


@pytest.mark.parametrize(
    ("config", "device", "expected"),
    [
        ({"dtype": "bfloat16"}, "cpu", torch.bfloat16),
        ({"torch_dtype": "bfloat16"}, "cpu", torch.bfloat16),
        ({"text_config": {"dtype": "bfloat16"}}, "cpu", torch.bfloat16),
        ({"dtype": "float16"}, "cpu", torch.float32),
        ({"dtype": "float16"}, "cuda:0", torch.float16),
        ({"dtype": "float32"}, "cpu", torch.float32),
        ({}, "cpu", torch.float32),
    ],
)
def test_the_base_generates_in_its_stored_dtype(tmp_path, config, device, expected):
    from model_tailor.calibration.selfgen import generation_dtype

    (tmp_path / "config.json").write_text(json.dumps(config))
    assert generation_dtype(tmp_path, device) == expected
    assert generation_dtype(tmp_path / "missing", device) == torch.float32


def test_a_bf16_base_is_loaded_in_bf16(pico_llama, tmp_path):
    """Half the memory of an fp32 copy: a 7B bf16 base generates in 14 GB, not 28."""
    from model_tailor.calibration.selfgen import Generator

    half = tmp_path / "bf16"
    LlamaForCausalLM.from_pretrained(pico_llama, dtype=torch.bfloat16).save_pretrained(half)
    PreTrainedTokenizerFast.from_pretrained(pico_llama).save_pretrained(half)
    assert Generator(half).parts()[0].dtype == torch.bfloat16
    assert Generator(pico_llama).parts()[0].dtype == torch.float32
