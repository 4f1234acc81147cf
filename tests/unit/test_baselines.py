"""Every baseline against a 2x3 example computed by hand (comments show the arithmetic)."""

from __future__ import annotations

import pytest
import torch

from model_tailor.errors import ConfigError
from model_tailor.kernel.baselines import (
    BASELINES,
    BaselineParams,
    dare,
    keep_count,
    magnitude_topk,
    task_arithmetic,
    ties,
    wise_ft,
)

T = torch.tensor
D = T([[0.5, -2.0, 1.0], [3.0, -0.1, 0.0]])


def test_keep_count_is_floor():
    assert keep_count(6, 0.5) == 3
    assert keep_count(6, 0.34) == 2  # floor(2.04)
    assert keep_count(10, 0.3) == 3  # 0.3 * 10 = 2.9999999999999996 in floats: still 3
    assert keep_count(6, 1.0) == 6
    with pytest.raises(ConfigError):
        keep_count(6, 0.0)
    with pytest.raises(ConfigError):
        keep_count(6, 1.5)


def test_magnitude_topk_by_hand():
    # |D| = 0.5 2 1 / 3 0.1 0 -> the three largest are 3, 2, 1
    assert torch.equal(magnitude_topk(D, 0.5), T([[0.0, -2.0, 1.0], [3.0, 0.0, 0.0]]))
    # k = 2 -> 3, 2
    assert torch.equal(magnitude_topk(D, 0.34), T([[0.0, -2.0, 0.0], [3.0, 0.0, 0.0]]))
    assert torch.equal(magnitude_topk(D, 1.0), D)


def test_magnitude_ties_broken_by_position():
    d = T([[1.0, -1.0, 1.0], [0.0, 0.0, 0.0]])
    assert torch.equal(magnitude_topk(d, 0.34), T([[1.0, -1.0, 0.0], [0.0, 0.0, 0.0]]))


def test_dare_fixed_by_seed():
    d = T([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    # torch.randperm(6) with manual_seed(0) starts 2, 5, 3 -> flat positions 2, 3, 5 kept (values 3, 4, 6)
    out = dare(d, 0.5, rescale=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, T([[0.0, 0.0, 6.0], [8.0, 0.0, 12.0]]))  # kept / 0.5
    raw = dare(d, 0.5, rescale=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(raw, T([[0.0, 0.0, 3.0], [4.0, 0.0, 6.0]]))
    other = dare(d, 0.5, rescale=False, generator=torch.Generator().manual_seed(1))
    assert int((other != 0).sum()) == 3  # exactly k kept whatever the seed


def test_ties_three_models_by_hand():
    d1 = T([[1.0, -2.0, 3.0], [0.5, 0.0, -1.0]])  # top-3: 3, -2, then 1 (tie with -1, first wins)
    d2 = T([[-2.0, 1.0, 1.0], [4.0, 0.0, 0.0]])  # top-3: 4, -2, then 1 at position 1 (tie, first wins)
    d3 = T([[3.0, -1.0, -4.0], [-1.0, 2.0, 0.0]])  # top-3: -4, 3, 2
    # trimmed: [1 -2 3 / 0 0 0], [-2 1 0 / 4 0 0], [3 0 -4 / 0 2 0]
    # elected signs of the sums: [+ (2), - (-1), - (-1) / + (4), + (2), 0]
    # disjoint means: (1+3)/2=2, -2/1, -4/1 / 4/1, 2/1, 0
    expected = T([[2.0, -2.0, -4.0], [4.0, 2.0, 0.0]])
    assert torch.equal(ties([d1, d2, d3], 0.5), expected)
    assert torch.equal(ties([d1, d2, d3], 0.5, scale=0.5), expected * 0.5)


def test_ties_one_model_is_magnitude_topk():
    assert torch.equal(ties([D], 0.5), magnitude_topk(D, 0.5))


def test_task_arithmetic_and_wise_ft_by_hand():
    d1 = T([[1.0, -2.0, 3.0], [0.5, 0.0, -1.0]])
    d2 = T([[-2.0, 1.0, 1.0], [4.0, 0.0, 0.0]])
    # 0.5 * (d1 + d2) = 0.5 * [-1 -1 4 / 4.5 0 -1]
    assert torch.equal(task_arithmetic([d1, d2], 0.5), T([[-0.5, -0.5, 2.0], [2.25, 0.0, -0.5]]))
    base = torch.ones(2, 3)
    finetuned = base + d1
    merged = base + wise_ft(finetuned - base, 0.25)
    assert torch.allclose(merged, 0.75 * base + 0.25 * finetuned)
    with pytest.raises(ConfigError):
        wise_ft(d1, 1.5)


def test_registry_uniform_signature_and_errors():
    assert {"magnitude", "dare", "random", "ties", "task_arithmetic", "wise_ft"} <= set(BASELINES.names())
    assert all(entry.reference.startswith("https://") for entry in BASELINES)
    fn = BASELINES.get("magnitude")
    assert torch.equal(fn([D], BaselineParams(density=0.5), None), magnitude_topk(D, 0.5))
    with pytest.raises(ConfigError, match="density"):
        fn([D], BaselineParams(), None)
    with pytest.raises(ConfigError, match="scale"):
        BASELINES.get("wise_ft")([D], BaselineParams(), None)
    with pytest.raises(ConfigError, match="exactly one"):
        fn([D, D], BaselineParams(density=0.5), None)
    with pytest.raises(ConfigError, match="unknown baseline"):
        BASELINES.get("nope")
