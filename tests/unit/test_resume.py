"""Resume work files: the patch file's key layout (``indices/<name>``), a lossless round trip, and files of
another layout recomputed rather than trusted."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model_tailor.pipeline.resume import WorkDir
from model_tailor.pipeline.weights import SparseValues

NAME = "model.layers.1.mlp.up_proj.weight"


def test_block_file_uses_the_patch_layout_and_round_trips(tmp_path):
    work = WorkDir(tmp_path / "p.safetensors", "k")
    plain = SparseValues(torch.tensor([0, 5], dtype=torch.int32), torch.tensor([1.5, -2.0], dtype=torch.bfloat16))
    factors = (torch.ones(3, 1), torch.full((1, 2), 0.5))
    low = SparseValues(torch.tensor([1], dtype=torch.int32), torch.tensor([4.0]), factors)
    other = NAME.replace("up_proj", "down_proj")
    work.save_block("model.layers.1", {NAME: plain, other: low}, {"block": "model.layers.1"})
    file = work.path / "model.layers.1.safetensors"
    with safe_open(file, framework="pt") as f:
        keys = set(f.keys())
    assert keys == {
        f"indices/{NAME}",
        f"values/{NAME}",
        f"indices/{other}",
        f"values/{other}",
        f"lowrank_a/{other}",
        f"lowrank_b/{other}",
    }
    loaded = work.load_block("model.layers.1")
    assert loaded is not None
    tensors, layer = loaded
    assert layer == {"block": "model.layers.1"}
    assert torch.equal(tensors[NAME].indices, plain.indices) and tensors[NAME].indices.dtype == torch.int32
    assert torch.equal(tensors[NAME].values, plain.values) and tensors[NAME].values.dtype == torch.bfloat16
    assert tensors[NAME].lowrank is None
    assert all(torch.equal(a, b) for a, b in zip(tensors[other].lowrank, factors, strict=True))


def test_block_file_of_another_layout_is_recomputed(tmp_path):
    work = WorkDir(tmp_path / "p.safetensors", "k")
    work.path.mkdir()
    old = {f"{NAME}/indices": torch.tensor([0], dtype=torch.int32), f"{NAME}/values": torch.tensor([1.0])}
    save_file(old, str(work.path / "model.layers.1.safetensors"), metadata={"layer": json.dumps({})})
    assert work.load_block("model.layers.1") is None
    assert work.load_block("model.layers.2") is None  # never written


def test_tailored_indices_take_the_patch_files_index_dtype():
    base = torch.zeros(2, 3, dtype=torch.bfloat16)
    keep = torch.tensor([[True, False, False], [False, False, True]])
    sv = SparseValues.from_dense(base, torch.ones(2, 3), keep)
    assert sv.indices.dtype == torch.int32 and sv.indices.tolist() == [0, 5]
    assert sv.values.dtype == torch.bfloat16 and sv.values.tolist() == [1.0, 1.0]
