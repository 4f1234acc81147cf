"""TensorPatch / SparsePatch: construction, dense round trips, exact bf16 apply/remove, summaries."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model_tailor.errors import CheckpointError, NumericalError, PatchFormatError, ShapeMismatchError
from model_tailor.patch.model import PatchMetadata, SparsePatch, TensorPatch
from model_tailor.patch.summary import layer_of


def _bf16_pair(seed: int, shape=(6, 5)):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=g).to(torch.bfloat16)
    ft = (base.float() + 0.05 * torch.randn(*shape, generator=g)).to(torch.bfloat16)
    return base, ft


def test_from_dense_keeps_mask_entries_sorted():
    delta = torch.tensor([[0.0, 1.5, 0.0], [-2.0, 0.0, 3.0]])
    mask = torch.tensor([[True, True, False], [False, False, True]])
    tp = TensorPatch.from_dense("w", delta, mask)
    assert tp.indices.tolist() == [0, 1, 5] and tp.indices.dtype == torch.int64
    assert tp.values.tolist() == [0.0, 1.5, 3.0] and tp.values.dtype == torch.float32
    assert tp.nnz == 3 and tp.density == 0.5
    assert torch.equal(tp.to_dense(), torch.tensor([[0.0, 1.5, 0.0], [0.0, 0.0, 3.0]]))
    assert TensorPatch.from_dense("w", delta).indices.tolist() == [1, 3, 5]  # no mask: nonzeros


def test_empty_and_full_density():
    delta = torch.randn(3, 4)
    assert TensorPatch.from_dense("w", delta, torch.zeros(3, 4, dtype=torch.bool)).nnz == 0
    full = TensorPatch.from_dense("w", delta, torch.ones(3, 4, dtype=torch.bool))
    assert full.density == 1.0 and torch.equal(full.to_dense(), delta)
    assert TensorPatch.from_dense("w", torch.zeros(2, 2)).nnz == 0


@pytest.mark.parametrize(
    ("indices", "values", "match"),
    [
        ([2, 1], [1.0, 2.0], "not sorted"),
        ([1, 1], [1.0, 2.0], "not unique"),
        ([0, 6], [1.0, 2.0], "out of range"),
        ([-1, 0], [1.0, 2.0], "out of range"),
        ([0, 1], [1.0], "2 indices but 1 values"),
    ],
)
def test_invalid_patches_are_refused(indices, values, match):
    with pytest.raises(PatchFormatError, match=match):
        TensorPatch("w", (2, 3), torch.tensor(indices), torch.tensor(values))


def test_bad_inputs_name_the_tensor():
    with pytest.raises(PatchFormatError, match="1-D"):
        TensorPatch("w", (2, 2), torch.zeros(1, 2, dtype=torch.int64), torch.zeros(1, 2))
    with pytest.raises(NumericalError, match="'w'"):
        TensorPatch.from_dense("w", torch.tensor([1.0, float("nan")]))
    with pytest.raises(ShapeMismatchError, match="keep_mask"):
        TensorPatch.from_dense("w", torch.zeros(2, 2), torch.ones(2, 3, dtype=torch.bool))
    base, ft = _bf16_pair(0)
    mask = torch.zeros(base.shape, dtype=torch.bool)
    with pytest.raises(PatchFormatError, match="outside keep_mask"):
        TensorPatch.from_weights("w", base, ft, mask)


def test_full_patch_of_bf16_difference_is_exact():
    base, ft = _bf16_pair(1)
    tp = TensorPatch.from_weights("w", base, ft)
    patched = tp.apply(base)
    assert patched.dtype == torch.bfloat16 and torch.equal(patched, ft)
    assert torch.equal(tp.remove(patched), base)


def test_apply_leaves_untouched_entries_bitwise():
    base = torch.tensor([[-0.0, 1.0], [2.0, 3.0]], dtype=torch.float16)
    tp = TensorPatch("w", (2, 2), torch.tensor([3]), torch.tensor([0.5]))
    out = tp.apply(base)
    assert torch.signbit(out[0, 0]) and out.dtype == torch.float16
    assert out.tolist() == [[0.0, 1.0], [2.0, 3.5]]


def test_lowrank_part_is_added_densely():
    a, b = torch.randn(3, 1), torch.randn(1, 4)
    tp = TensorPatch("w", (3, 4), torch.tensor([0, 11]), torch.tensor([1.0, -1.0]), (a, b))
    expected = a @ b
    expected.view(-1)[0] += 1.0
    expected.view(-1)[11] -= 1.0
    assert torch.allclose(tp.to_dense(), expected)
    base = torch.randn(3, 4)
    assert torch.allclose(tp.apply(base), base + expected)
    with pytest.raises(PatchFormatError, match="low-rank"):
        TensorPatch("w", (3, 4), torch.tensor([0]), torch.tensor([1.0]), (torch.randn(3, 1), torch.randn(1, 5)))


def _patch(seed: int = 0) -> tuple[SparsePatch, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight", "lm_head.weight"]
    base, ft = {}, {}
    for i, name in enumerate(names):
        base[name], ft[name] = _bf16_pair(seed + i)
    tensors = {n: TensorPatch.from_weights(n, base[n], ft[n]) for n in names}
    meta = PatchMetadata(base_dtypes=dict.fromkeys(names, "bfloat16"))
    return SparsePatch(tensors, meta), base, ft


def test_state_dict_apply_remove_is_identity():
    patch, base, ft = _patch()
    base["untouched"] = torch.randn(2)
    out = patch.apply_to_state_dict(base)
    assert out is not base and all(torch.equal(out[n], ft[n]) for n in ft)
    assert out["untouched"] is base["untouched"]
    back = patch.remove_from_state_dict(out)
    assert all(torch.equal(back[n], base[n]) for n in base)
    same = patch.apply_to_state_dict(base, inplace=True)
    assert same is base


def test_state_dict_errors_change_nothing():
    patch, base, _ = _patch()
    original = dict(base)
    del base["lm_head.weight"]
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        patch.apply_to_state_dict(base, inplace=True)
    base["lm_head.weight"] = torch.zeros(2, 2)
    with pytest.raises(ShapeMismatchError, match="lm_head.weight"):
        patch.apply_to_state_dict(base, inplace=True)
    assert all(base[n] is original[n] for n in base if n != "lm_head.weight")


def test_apply_to_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    before = model[0].weight.detach().clone()
    delta = torch.randn(2, 3)
    patch = SparsePatch({"0.weight": TensorPatch.from_dense("0.weight", delta)})
    patch.apply_to_model(model)
    assert torch.allclose(model[0].weight, before + delta)
    with pytest.raises(CheckpointError, match="missing"):
        SparsePatch({"1.weight": TensorPatch.from_dense("1.weight", delta)}).apply_to_model(model)


def test_summary_density_per_tensor_and_layer():
    tensors = {
        "model.layers.0.a.weight": TensorPatch("model.layers.0.a.weight", (4, 5), torch.arange(2), torch.ones(2)),
        "model.layers.0.b.weight": TensorPatch("model.layers.0.b.weight", (2, 5), torch.arange(8), torch.ones(8)),
        "model.layers.10.a.weight": TensorPatch("model.layers.10.a.weight", (2, 2), torch.arange(1), torch.ones(1)),
        "lm_head.weight": TensorPatch("lm_head.weight", (2, 2), torch.arange(4), torch.ones(4)),
    }
    s = SparsePatch(tensors, PatchMetadata(base_dtypes={"lm_head.weight": "bfloat16"})).summary()
    assert s.per_tensor["model.layers.0.a.weight"]["density"] == 0.1
    assert s.per_layer["model.layers.0"] == {"nnz": 10, "numel": 30, "density": 10 / 30}
    assert list(s.per_layer) == ["(other)", "model.layers.0", "model.layers.10"]
    assert (s.nnz, s.numel) == (15, 38)
    assert s.patch_bytes == 15 * 8 and s.dense_bytes == 34 * 4 + 4 * 2
    assert layer_of("model.layers.3.mlp.down_proj.weight") == "model.layers.3"


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 16),
    cols=st.integers(1, 16),
    seed=st.integers(0, 2**31 - 1),
    density=st.floats(0.0, 1.0),
)
def test_from_dense_indices_are_sorted_unique_in_range(rows, cols, seed, density):
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(rows, cols, generator=g)
    mask = torch.rand(rows, cols, generator=g) < density
    tp = TensorPatch.from_dense("w", delta, mask)
    idx = tp.indices
    assert idx.numel() == int(mask.sum())
    assert bool((idx[1:] > idx[:-1]).all()) and (
        idx.numel() == 0 or 0 <= int(idx.min()) <= int(idx.max()) < rows * cols
    )
    assert torch.equal(tp.to_dense(), torch.where(mask, delta, torch.zeros(())))
