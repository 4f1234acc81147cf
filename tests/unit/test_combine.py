"""Multi-task combination (docs/METHOD.md §12): hand-computed 2x3 examples for every policy, and properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model_tailor.errors import ConfigError, PatchFormatError, ShapeMismatchError
from model_tailor.patch.combine import COMBINE, combine_patches
from model_tailor.patch.model import PatchMetadata, SparsePatch, TensorPatch

FP = {"algorithm": "sha256", "structure": "s" * 64, "num_tensors": 2, "content": {}}


def _p(indices, values, *, name="w", shape=(2, 3), fp=FP, **tensors) -> SparsePatch:
    patch = {name: TensorPatch(name, shape, torch.tensor(indices), torch.tensor(values, dtype=torch.float32))}
    patch.update(tensors)
    return SparsePatch(patch, PatchMetadata(base_fingerprint=fp, base_dtypes={name: "bfloat16"}))


# P1 covers flat positions 0, 1, 4 and P2 covers 1, 2, 4 of a 2x3 weight: overlap at 1 and 4.
P1 = ([0, 1, 4], [1.0, 2.0, 3.0])
P2 = ([1, 2, 4], [4.0, -5.0, -1.0])
EXPECTED = {  # union positions 0, 1, 2, 4
    "sum": [1.0, 6.0, -5.0, 2.0],
    "disjoint-mean": [1.0, 3.0, -5.0, 1.0],
    "mean": [0.5, 3.0, -2.5, 1.0],
    "priority": [1.0, 2.0, -5.0, 3.0],
    "ties": [1.0, 3.0, -5.0, 3.0],  # position 4: mass 3 + (-1) > 0 elects +, only 3 agrees
}


@pytest.mark.parametrize("policy", sorted(EXPECTED))
def test_hand_computed_policies(policy):
    combined, report = combine_patches([_p(*P1), _p(*P2)], policy=policy)
    tp = combined.tensors["w"]
    assert tp.indices.tolist() == [0, 1, 2, 4]
    assert tp.values.tolist() == EXPECTED[policy]
    o = report.per_tensor["w"]
    assert (o.union, o.overlap, o.fraction, o.patches) == (4, 2, 0.5, 2)
    assert combined.metadata.config["combine"]["policy"] == policy
    assert combined.metadata.base_fingerprint == FP


def test_policies_are_registered_with_references():
    assert COMBINE.names() == sorted(EXPECTED)
    assert all(entry.reference.startswith("https://") for entry in COMBINE)


def test_weights_scale_each_delta_before_the_policy():
    combined, _ = combine_patches([_p(*P1), _p(*P2)], policy="disjoint-mean", weights=[2.0, 0.5])
    assert combined.tensors["w"].values.tolist() == [2.0, 3.0, -2.5, 2.75]


def test_tensor_in_one_patch_only_counts_as_zero_elsewhere():
    other = TensorPatch("v", (2,), torch.tensor([1]), torch.tensor([4.0]))
    combined, report = combine_patches([_p(*P1, v=other), _p(*P2)], policy="mean")
    assert combined.tensors["v"].values.tolist() == [2.0]
    assert report.per_tensor["v"].patches == 1 and report.per_tensor["v"].overlap == 0


def test_errors():
    with pytest.raises(ConfigError, match="unknown combine policy 'avg'"):
        combine_patches([_p(*P1)], policy="avg")
    with pytest.raises(ConfigError, match="one weight per patch"):
        combine_patches([_p(*P1), _p(*P2)], weights=[1.0])
    with pytest.raises(ConfigError, match="at least one patch"):
        combine_patches([])
    other_base = dict(FP, structure="t" * 64)
    with pytest.raises(PatchFormatError, match="different base models"):
        combine_patches([_p(*P1), _p(*P2, fp=other_base)])
    combined, _ = combine_patches([_p(*P1), _p(*P2, fp=other_base)], force=True)
    assert combined.tensors["w"].nnz == 4
    with pytest.raises(ShapeMismatchError, match="'w'"):
        combine_patches([_p(*P1), _p([0], [1.0], shape=(3, 2))], force=True)


def test_lowrank_combines_under_sum_and_mean_only():
    a1, b1, a2, b2 = torch.randn(2, 1), torch.randn(1, 3), torch.randn(2, 2), torch.randn(2, 3)
    lr1 = SparsePatch({"w": TensorPatch("w", (2, 3), torch.tensor([0]), torch.tensor([1.0]), (a1, b1))})
    lr2 = SparsePatch({"w": TensorPatch("w", (2, 3), torch.tensor([5]), torch.tensor([2.0]), (a2, b2))})
    combined, _ = combine_patches([lr1, lr2], policy="sum")
    expected = lr1.tensors["w"].to_dense() + lr2.tensors["w"].to_dense()
    assert torch.allclose(combined.tensors["w"].to_dense(), expected, atol=1e-6)
    combined, _ = combine_patches([lr1, lr2], policy="mean")
    assert torch.allclose(combined.tensors["w"].to_dense(), expected / 2, atol=1e-6)
    with pytest.raises(ConfigError, match="low-rank"):
        combine_patches([lr1, lr2])


@st.composite
def _patches(draw, count: int):
    rows, cols = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    out = []
    for _ in range(count):
        mask = draw(st.lists(st.booleans(), min_size=rows * cols, max_size=rows * cols))
        vals = draw(
            st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=rows * cols, max_size=rows * cols)
        )
        delta = torch.tensor(vals, dtype=torch.float32).reshape(rows, cols)
        keep = torch.tensor(mask).reshape(rows, cols)
        out.append(SparsePatch({"w": TensorPatch.from_dense("w", delta, keep)}, PatchMetadata(base_fingerprint=FP)))
    return out


@settings(max_examples=40, deadline=None)
@given(patches=_patches(1), policy=st.sampled_from(sorted(EXPECTED)))
def test_combine_of_one_patch_is_the_patch(patches, policy):
    combined, report = combine_patches(patches, policy=policy)
    assert combined.equal(patches[0])
    assert report.overlap == 0


@settings(max_examples=40, deadline=None)
@given(patches=_patches(3), order=st.permutations(range(3)))
def test_disjoint_mean_commutes(patches, order):
    ref, _ = combine_patches(patches)
    permuted, _ = combine_patches([patches[i] for i in order])
    assert torch.equal(ref.tensors["w"].indices, permuted.tensors["w"].indices)
    assert torch.allclose(ref.tensors["w"].values, permuted.tensors["w"].values, rtol=1e-6, atol=1e-5)
