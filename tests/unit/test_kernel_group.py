"""``tailor_group``: modules sharing one input (q/k/v, gate/up) give what per-module ``tailor_weight`` gives.

Oracle: the per-module calls themselves on pico random tensors with one shared random SPD Hessian. Rows are
independent in the OBS update, so the stacked sweep must reproduce every module's weights, mask, kept count and
guard decision; only the row count of the lazy-update matmuls changes, so weights are compared to fp32 rounding.
"""

from __future__ import annotations

import pytest
import torch

from model_tailor.errors import NumericalError, ShapeMismatchError
from model_tailor.kernel.group import GroupMember, tailor_group
from model_tailor.kernel.tailor import tailor_weight

COLS = 40


def _spd(cols=COLS, seed=0, tokens=160):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + 0.3 * torch.eye(cols)
    X = mix @ (torch.randn(cols, tokens, generator=g) * torch.linspace(1, 4, cols)[:, None])
    return 2 * X @ X.T / tokens


def _members(rows=(24, 8, 8), cols=COLS, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, r in enumerate(rows):
        base = 0.05 * torch.randn(r, cols, generator=g)
        ft = base + 0.02 * (i + 1) * torch.randn(r, cols, generator=g)  # different delta scales per module
        out.append(GroupMember(base.to(dtype), ft.to(dtype), name=f"m{i}"))
    return out


def _check_same(grouped, members, H, **opts):
    for res, m in zip(grouped, members, strict=True):
        ref = tailor_weight(m.base, m.finetuned, H, keep_mask=m.keep_mask, name=m.name, **opts)
        assert torch.equal(res.keep_mask, ref.keep_mask), m.name
        assert res.stats.kept == ref.stats.kept and res.stats.used == ref.stats.used, m.name
        assert res.stats.mask_timing == ref.stats.mask_timing and res.stats.damping == ref.stats.damping
        assert res.weight.dtype == ref.weight.dtype
        torch.testing.assert_close(res.weight, ref.weight, rtol=1e-5, atol=1e-6)
        assert torch.equal(res.weight[~res.keep_mask], m.base[~res.keep_mask])  # reverted == base bitwise
        assert res.stats.error_compensated == pytest.approx(ref.stats.error_compensated, rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("granularity", ["block", "row", "tensor"])
@pytest.mark.parametrize("compensation", ["obs", "official", "none", "exact"])
@pytest.mark.parametrize("mask_timing", ["adaptive", "upfront"])
def test_group_equals_per_module_calls(granularity, compensation, mask_timing):
    H, members = _spd(), _members()
    opts = dict(
        density=0.3,
        alpha=0.7,
        block_size=16,
        compensation=compensation,
        granularity=granularity,
        mask_timing=mask_timing,
    )
    _check_same(tailor_group(members, H, **opts), members, H, **opts)


def test_counts_stay_per_module_with_tensor_granularity():
    """Stacking must not pool the tensor group: each module keeps floor(density * its numel)."""
    H, members = _spd(), _members(rows=(12, 4))
    out = tailor_group(members, H, density=0.25, granularity="tensor", mask_timing="upfront")
    assert [r.stats.kept for r in out] == [int(0.25 * 12 * COLS), int(0.25 * 4 * COLS)]


@pytest.mark.parametrize("sensitivity", ["weight", "revert"])
def test_fixed_masks_sensitivity_and_bf16(sensitivity):
    H = _spd()
    members = _members(dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    members = [
        GroupMember(m.base, m.finetuned, name=m.name, keep_mask=torch.rand(m.base.shape, generator=g) < 0.2)
        for m in members
    ]
    opts = dict(density=0.2, block_size=16, sensitivity=sensitivity)
    _check_same(tailor_group(members, H, **opts), members, H, **opts)


def test_trivial_member_and_density_one():
    """A member with no delta (empty patch) or density 1 takes the per-module path and still matches."""
    H, members = _spd(), _members()
    members[1] = GroupMember(members[1].base, members[1].base.clone(), name="same")
    _check_same(tailor_group(members, H, density=0.3, block_size=16), members, H, density=0.3, block_size=16)
    _check_same(tailor_group(members, H, density=1.0), members, H, density=1.0)


def test_guard_decision_is_per_module():
    """``official`` (sign +1) often loses to plain masking; the guard must decide for each module alone."""
    H, members = _spd(), _members(rows=(16, 16, 16), seed=3)
    opts = dict(density=0.1, block_size=8, compensation="official", guard=True)
    out = tailor_group(members, H, **opts)
    _check_same(out, members, H, **opts)


def test_one_member_and_mismatched_columns():
    H, members = _spd(), _members(rows=(8,))
    _check_same(tailor_group(members, H, density=0.5), members, H, density=0.5)
    bad = [*_members(rows=(4,)), GroupMember(torch.zeros(4, COLS + 1), torch.ones(4, COLS + 1), name="wide")]
    with pytest.raises(ShapeMismatchError, match="wide"):
        tailor_group(bad, H)


def test_overflowing_sweep_is_a_numerical_error_naming_the_member():
    """Finite inputs whose decoration overflows fp32 are refused, as tailor_weight refuses them."""
    H, base = _spd(cols=8), torch.full((4, 8), 3e38)
    with pytest.raises(NumericalError, match="tailored weight"):
        tailor_weight(base, -base, H, density=0.5, guard=False, name="big")
    members = [GroupMember(base, -base, name="big"), GroupMember(base, -base, name="other")]
    with pytest.raises(NumericalError, match="big: tailored weight contains NaN or Inf"):
        tailor_group(members, H, density=0.5, guard=False)


@pytest.mark.parametrize("mask_timing", ["adaptive", "upfront"])
def test_group_equals_per_module_calls_with_fapm_salience(mask_timing):
    H, members = _spd(), _members()
    opts = dict(density=0.3, alpha=1.0, block_size=16, mask_timing=mask_timing, salience="fapm")
    _check_same(tailor_group(members, H, **opts), members, H, **opts)
