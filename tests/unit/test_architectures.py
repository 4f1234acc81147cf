"""Block discovery by structure, roles and forward order, meta skeletons, checkpoint-name mapping."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model_tailor.errors import CheckpointError
from model_tailor.pipeline.architectures import (
    build_skeleton,
    checkpoint_names,
    discover_layout,
    empty_parameters,
    is_conv1d,
    linear_modules,
    role_of,
)


@pytest.mark.parametrize(
    ("arch", "expected"),
    [
        ("llama", [("model.layers", "language", 3)]),
        (
            "llava",
            [
                ("model.vision_tower.encoder.layers", "vision", 2),
                ("model.language_model.layers", "language", 2),
            ],
        ),
        (
            "blip2",
            [
                ("vision_model.encoder.layers", "vision", 2),
                ("qformer.encoder.layer", "qformer", 2),
                ("language_model.model.layers", "language", 2),
            ],
        ),
        ("qwen2vl", [("model.visual.blocks", "vision", 2), ("model.language_model.layers", "language", 2)]),
    ],
)
def test_discover_layout(pico, arch, expected):
    model = build_skeleton(str(pico(arch).finetuned))
    layout = discover_layout(model)
    assert [(b.path, b.role, b.length) for b in layout.block_lists] == expected
    assert all(p.device.type == "meta" for p in model.parameters())


def test_skeleton_keeps_buffers_real(pico):
    model = build_skeleton(str(pico("llama").finetuned))
    inv_freq = model.model.rotary_emb.inv_freq
    assert inv_freq.device.type == "cpu" and torch.isfinite(inv_freq).all()


def test_locate():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.h = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(3)])
            self.head = nn.Linear(4, 2)

    layout = discover_layout(Net())
    assert [b.path for b in layout.block_lists] == ["h"]
    assert layout.locate("h.2.0") == (layout.block_lists[0], 2)
    assert layout.locate("head") is None


def test_no_blocks_is_an_error():
    with pytest.raises(CheckpointError, match="no repeated blocks"):
        discover_layout(nn.Sequential(nn.Linear(2, 2)))


def test_nested_lists_use_the_outer_one():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block() for _ in range(2)])

    assert [b.path for b in discover_layout(Net()).block_lists] == ["layers"]


def test_roles():
    assert role_of("vision_model.encoder.layers") == "vision"
    assert role_of("model.visual.blocks") == "vision"
    assert role_of("qformer.encoder.layer") == "qformer"
    assert role_of("transformer.h") == "language"


def test_gpt2_conv1d_is_found_transposed():
    from transformers import GPT2Config, GPT2LMHeadModel

    with empty_parameters():
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32))
    layout = discover_layout(model)
    assert [b.path for b in layout.block_lists] == ["transformer.h"]
    lin = dict(linear_modules(model))
    assert is_conv1d(lin["transformer.h.0.attn.c_attn"])
    assert lin["transformer.h.0.attn.c_attn"].weight.shape == (32, 96)  # (in, out)


def test_checkpoint_names_map_legacy_layout(pico):
    from model_tailor.io.checkpoint import CheckpointReader

    pair = pico("llava")
    model = build_skeleton(str(pair.finetuned))
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    mapping = checkpoint_names(model, names, set(CheckpointReader(pair.finetuned).names()))
    assert (
        mapping["model.language_model.layers.0.mlp.up_proj.weight"]
        == "language_model.model.layers.0.mlp.up_proj.weight"
    )
    assert mapping["lm_head.weight"] == "language_model.lm_head.weight"
