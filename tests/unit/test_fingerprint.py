"""Base fingerprints: stable for the same base, sensitive to names/shapes/dtypes and targeted content."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from model_tailor.errors import CheckpointError
from model_tailor.io.checkpoint import CheckpointReader
from model_tailor.patch.fingerprint import compare_fingerprint, fingerprint, tensor_hash


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(3, 4, generator=g).to(torch.bfloat16),
        "b.bias": torch.randn(4, generator=g),
    }


def test_reader_and_mapping_agree(tmp_path):
    state = _state()
    save_file(state, str(tmp_path / "m.safetensors"))
    with CheckpointReader(tmp_path / "m.safetensors") as reader:
        fp = fingerprint(reader, content_names=["a.weight"])
        assert compare_fingerprint(fp, reader) == []
    assert fp == fingerprint(state, content_names=["a.weight"])
    assert fp["algorithm"] == "sha256" and fp["num_tensors"] == 2 and list(fp["content"]) == ["a.weight"]
    assert fp["content"]["a.weight"] == tensor_hash(state["a.weight"])


def test_structure_changes_are_detected():
    state = _state()
    fp = fingerprint(state)
    for changed in (
        {**state, "a.weight": state["a.weight"].float()},  # dtype
        {**state, "b.bias": torch.zeros(5)},  # shape
        {"c.weight": state["a.weight"], "b.bias": state["b.bias"]},  # name
        {**state, "extra": torch.zeros(1)},
    ):
        problems = compare_fingerprint(fp, changed)
        assert len(problems) == 1 and "names/shapes/dtypes" in problems[0]
    # content outside content_names is not hashed
    assert compare_fingerprint(fp, _state(seed=1)) == []


def test_content_changes_are_detected():
    state = _state()
    fp = fingerprint(state, content_names=["a.weight", "b.bias"])
    other = dict(state)
    other["a.weight"] = state["a.weight"].clone()
    other["a.weight"][0, 0] += 1
    assert compare_fingerprint(fp, other) == ["content of 'a.weight' differs"]
    del other["b.bias"]
    assert any("'b.bias' is missing" in p for p in compare_fingerprint(fp, other))
    assert compare_fingerprint({}, state) == ["the patch records no base fingerprint"]
    with pytest.raises(CheckpointError, match="nope"):
        fingerprint(state, content_names=["nope"])


def test_tensor_hash_covers_bytes_not_values():
    assert tensor_hash(torch.tensor([0.0])) != tensor_hash(torch.tensor([-0.0]))
    assert tensor_hash(torch.zeros(0)) == tensor_hash(torch.zeros(0, 3))
    t = torch.arange(6.0).reshape(2, 3)
    assert tensor_hash(t.t()) == tensor_hash(t.t().contiguous())
