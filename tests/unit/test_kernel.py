"""``tailor_weight``: the kernel contract of docs/ARCHITECTURE.md (docs/METHOD.md §3-§8, D1-D14)."""

from __future__ import annotations

import pytest
import torch

from model_tailor.errors import ConfigError, NumericalError, ShapeMismatchError
from model_tailor.kernel.compensation import compensate as compensate_impl
from model_tailor.kernel.compensation import reconstruction_error
from model_tailor.kernel.hessian import factor_hessian
from model_tailor.kernel.masking import keep_count, select_keep_mask
from model_tailor.kernel.tailor import TailoredWeight, compensate, tailor_weight


def _layer(rows=16, cols=24, seed=0, dtype=torch.float32, tokens=96):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + 0.3 * torch.eye(cols)
    X = mix @ (torch.randn(cols, tokens, generator=g) * torch.linspace(1, 4, cols)[:, None])
    H = 2 * X @ X.T / tokens
    base = 0.05 * torch.randn(rows, cols, generator=g)
    ft = base + 0.02 * torch.randn(rows, cols, generator=g)
    return base.to(dtype), ft.to(dtype), H


def test_compensate_is_reexported():
    assert compensate is compensate_impl


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_density_one_without_compensation_returns_finetuned_exactly(dtype):
    base, ft, H = _layer(dtype=dtype)
    out = tailor_weight(base, ft, H, density=1.0, compensation="none")
    assert torch.equal(out.weight, ft) and out.weight.dtype == dtype
    assert out.keep_mask.all() and out.stats.kept == ft.numel()


@pytest.mark.parametrize("compensation", ["obs", "official", "none", "exact"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_off_mask_entries_are_base_bitwise_and_counts_exact(compensation, dtype):
    base, ft, H = _layer(dtype=dtype)
    out = tailor_weight(base, ft, H, density=0.25, compensation=compensation, block_size=8, name="m.q")
    assert isinstance(out, TailoredWeight)
    assert out.weight.shape == base.shape and out.weight.dtype == dtype
    assert out.keep_mask.dtype == torch.bool
    assert torch.equal(out.weight[~out.keep_mask], base[~out.keep_mask])
    for b in range(0, 24, 8):  # block granularity: exactly floor(rho * m) per block
        assert int(out.keep_mask[:, b : b + 8].sum()) == keep_count(0.25, 16 * 8)
    assert out.stats.kept == int(out.keep_mask.sum())
    assert out.stats.density == pytest.approx(out.stats.kept / base.numel())
    assert out.stats.compensation == compensation and out.stats.name == "m.q"


def test_masked_only_result_equals_finetuned_on_the_mask():
    base, ft, H = _layer()
    out = tailor_weight(base, ft, H, compensation="none")
    assert torch.equal(out.weight, torch.where(out.keep_mask, ft, base))
    assert out.stats.used == "none" and out.stats.error_masked == out.stats.error_compensated


def test_given_keep_mask_skips_scoring():
    base, ft, H = _layer()
    keep = torch.zeros(16, 24, dtype=torch.bool)
    keep[:, -5:] = True
    out = tailor_weight(base, ft, H, keep_mask=keep, guard=False)
    assert torch.equal(out.keep_mask, keep) and out.stats.mask_timing == "fixed"
    expected = compensate(base, ft, keep, H, compensation="obs")
    torch.testing.assert_close(out.weight, expected, rtol=0, atol=0)


def test_upfront_timing_equals_select_then_compensate():
    base, ft, H = _layer()
    out = tailor_weight(base, ft, H, mask_timing="upfront", alpha=1.0, block_size=8, guard=False)
    keep = select_keep_mask((ft - base).abs(), 0.1, granularity="block", block_size=8)
    # alpha = 1 z-scores |delta| per row in each block, which can reorder entries across rows of a block.
    assert out.stats.mask_timing == "upfront"
    torch.testing.assert_close(out.weight, compensate(base, ft, out.keep_mask, H, block_size=8))
    assert out.keep_mask.sum() == keep.sum()


def test_adaptive_mask_is_recorded_and_row_granularity_falls_back_to_upfront():
    base, ft, H = _layer()
    assert tailor_weight(base, ft, H).stats.mask_timing == "adaptive"
    out = tailor_weight(base, ft, H, granularity="row", density=0.25)
    assert out.stats.mask_timing == "upfront"
    assert out.keep_mask.sum(dim=1).tolist() == [6] * 16


def test_guard_keeps_the_masked_result_when_decoration_hurts():
    base, ft, H = _layer(rows=32, cols=48, seed=3)
    unguarded = tailor_weight(base, ft, H, compensation="official", guard=False, block_size=16)
    assert unguarded.stats.used == "compensated"
    assert unguarded.stats.error_compensated > unguarded.stats.error_masked
    guarded = tailor_weight(base, ft, H, compensation="official", guard=True, block_size=16)
    assert guarded.stats.used == "masked"
    assert torch.equal(guarded.weight, torch.where(guarded.keep_mask, ft, base))
    assert guarded.stats.error_compensated == pytest.approx(unguarded.stats.error_compensated)


def test_guard_errors_are_measured_under_the_damped_hessian():
    base, ft, H = _layer(dtype=torch.float64)
    out = tailor_weight(base, ft, H.double(), guard=False)
    H_damped = factor_hessian(H.double()).H_damped
    assert out.stats.error_compensated == pytest.approx(reconstruction_error(out.weight, ft, H_damped), rel=1e-9)


def test_exact_never_loses_to_the_sweep_under_the_same_mask():
    base, ft, H = _layer(dtype=torch.float64)
    H = H.double()
    keep = tailor_weight(base, ft, H).keep_mask
    errs = {c: tailor_weight(base, ft, H, keep_mask=keep, compensation=c, guard=False).stats for c in ("obs", "exact")}
    assert errs["exact"].error_compensated <= errs["obs"].error_compensated * (1 + 1e-10)


def test_target_is_reconstructed_and_can_drive_salience():
    base, ft, H = _layer()
    target = base + 0.5 * (ft - base)
    assert torch.equal(tailor_weight(base, ft, H, density=1.0, target=target).weight, target)
    g = torch.Generator().manual_seed(9)
    target2 = base + torch.randn(16, 24, generator=g) * 0.02
    m_delta = tailor_weight(base, ft, H, target=target2, alpha=1.0, compensation="none").keep_mask
    m_target = tailor_weight(base, ft, H, target=target2, alpha=1.0, compensation="none", salience_from="target")
    assert not torch.equal(m_delta, m_target.keep_mask)
    assert torch.equal(m_target.weight, torch.where(m_target.keep_mask, target2, base))


def test_data_free_mode_needs_no_hessian():
    base, ft, _ = _layer()
    out = tailor_weight(base, ft, None, alpha=1.0, compensation="none")
    assert out.stats.error_masked is None and out.stats.kept > 0
    with pytest.raises(ConfigError, match="Hessian"):
        tailor_weight(base, ft, None)


def test_shape_mismatch_names_the_tensor():
    base, ft, H = _layer()
    with pytest.raises(ShapeMismatchError, match="layers.1.up"):
        tailor_weight(base, ft[:, :-1], H, name="layers.1.up")
    with pytest.raises(ShapeMismatchError, match="hessian"):
        tailor_weight(base, ft, H[:-1, :-1], name="layers.1.up")
    with pytest.raises(ShapeMismatchError):
        tailor_weight(base, ft, H, keep_mask=torch.ones(2, 2, dtype=torch.bool))


@pytest.mark.parametrize("which", ["base", "finetuned", "hessian", "target"])
def test_non_finite_inputs_raise_naming_the_tensor(which):
    base, ft, H = _layer()
    tensors = {"base": base, "finetuned": ft, "hessian": H, "target": ft.clone()}
    tensors[which] = tensors[which].clone()
    tensors[which][0, 0] = float("inf") if which == "hessian" else float("nan")
    with pytest.raises(NumericalError, match=which) as info:
        tailor_weight(tensors["base"], tensors["finetuned"], tensors["hessian"], target=tensors["target"], name="L")
    assert info.value.layer == "L"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"density": 0.0},
        {"density": 1.5},
        {"alpha": 1.2},
        {"compensation": "sparsegpt"},
        {"granularity": "global"},
        {"sensitivity": "grad"},
        {"mask_timing": "late"},
        {"block_size": 0},
        {"salience_from": "base"},
        {"keep_mask": torch.ones(16, 24)},
    ],
)
def test_bad_options_raise_config_error(kwargs):
    base, ft, H = _layer()
    with pytest.raises(ConfigError):
        tailor_weight(base, ft, H, **kwargs)


def test_revert_sensitivity_and_all_zero_delta():
    base, ft, H = _layer()
    out = tailor_weight(base, ft, H, sensitivity="revert", alpha=0.0)
    assert torch.equal(out.weight[~out.keep_mask], base[~out.keep_mask])
    same = tailor_weight(base, base.clone(), H)
    assert torch.equal(same.weight, base)
    assert same.stats.kept == 0 and not same.keep_mask.any()  # STYLE §7: all-zero delta -> empty patch


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda_and_matches_cpu():
    base, ft, H = _layer()
    cpu = tailor_weight(base, ft, H)
    gpu = tailor_weight(base.cuda(), ft.cuda(), H.cuda())
    assert gpu.weight.device.type == "cuda"
    assert torch.equal(gpu.weight.cpu()[~gpu.keep_mask.cpu()], base[~gpu.keep_mask.cpu()])
    assert (gpu.keep_mask.cpu() == cpu.keep_mask).float().mean() > 0.99


def test_data_free_fapm_salience_keeps_fapm_top_entries_of_each_row():
    """alpha 1, no compensation, one group per row: the kernel keeps each row's top FAPM scores
    (kernel.baselines.fapm_scores, mean |W_pre| over the whole matrix), and they are not magnitude's."""
    from model_tailor.kernel.baselines import fapm_scores

    g = torch.Generator().manual_seed(3)
    base = torch.randn(12, 20, generator=g)
    ft = base + 0.3 * torch.randn(12, 20, generator=g)
    opts = dict(density=0.25, alpha=1.0, compensation="none", granularity="row")
    got = tailor_weight(base, ft, None, salience="fapm", **opts)
    top = fapm_scores(ft - base, base).topk(5, dim=1).indices  # floor(0.25 * 20) per row
    expected = torch.zeros_like(got.keep_mask).scatter_(1, top, True)
    assert torch.equal(got.keep_mask, expected)
    assert torch.equal(got.weight[got.keep_mask], ft[got.keep_mask])
    assert not torch.equal(got.keep_mask, tailor_weight(base, ft, None, **opts).keep_mask)


def test_unknown_salience_is_a_config_error():
    with pytest.raises(ConfigError, match="salience"):
        tailor_weight(torch.zeros(2, 2), torch.ones(2, 2), None, alpha=1.0, compensation="none", salience="x")
