"""Every baseline against a 2x3 example computed by hand (comments show the arithmetic)."""

from __future__ import annotations

import pytest
import torch

from model_tailor.errors import ConfigError
from model_tailor.kernel.baselines import (
    BASELINES,
    BaselineParams,
    dare,
    magnitude_topk,
    task_arithmetic,
    ties,
    wise_ft,
)
from model_tailor.kernel.masking import keep_count

T = torch.tensor
D = T([[0.5, -2.0, 1.0], [3.0, -0.1, 0.0]])


def _count(numel, density):
    return keep_count(density, numel, tolerance="absolute")  # the count every sparse baseline keeps


def test_keep_count_is_floor():
    assert _count(6, 0.5) == 3
    assert _count(6, 0.34) == 2  # floor(2.04)
    assert _count(10, 0.3) == 3  # 0.3 * 10 = 2.9999999999999996 in floats: still 3
    assert _count(6, 1.0) == 6
    with pytest.raises(ConfigError):
        _count(6, 0.0)
    with pytest.raises(ConfigError):
        _count(6, 1.5)


def test_baselines_keep_their_absolute_float_tolerance():
    # 0.29 * 1e8 = 28999999.999999996, 3.7e-9 below the integer: near it relative to its size, not absolutely
    assert _count(10**8, 0.29) == 28_999_999
    assert keep_count(0.29, 10**8) == 29_000_000  # the kernel's relative rule
    assert int(magnitude_topk(torch.arange(1.0, 101.0), 0.29).count_nonzero()) == 29  # small: both agree


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


def test_layer_index_from_full_names():
    from model_tailor.kernel.baselines import layer_index

    assert layer_index("model.language_model.layers.17.mlp.up_proj.weight") == 17
    assert layer_index("model.layers.0.self_attn.q_proj.weight") == 0
    assert layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_index("model.multi_modal_projector.linear_1.weight") is None
    assert layer_index("model.embed_tokens.weight") is None


def test_fapm_scores_and_mask_by_hand():
    from model_tailor.kernel.baselines import fapm, fapm_scores

    base = T([[1.0, -2.0, 4.0], [0.5, 1.0, 3.0]])  # mean |W| = 11.5 / 6
    delta = T([[1.0, 1.0, -2.0], [0.5, -3.0, 0.0]])
    m = 11.5 / 6
    # |Δ| - m·|Δ|/|W|: 1 - m, 1 - m/2, 2 - m/2, 0.5 - m, 3 - 3m, 0
    expected = T([[1 - m, 1 - m / 2, 2 - m / 2], [0.5 - m, 3 - 3 * m, 0.0]])
    assert torch.allclose(fapm_scores(delta, base), expected)
    # order: 2 - m/2 = 1.04 (entry 2), 1 - m/2 = 0.04 (entry 1), 0 (entry 5), ...: k = 3 keeps entries 2, 1, 5
    assert torch.equal(fapm(delta, base, 0.5), T([[0.0, 1.0, -2.0], [0.0, 0.0, 0.0]]))
    # a pure magnitude top-3 would have kept -3 (entry 4) instead: FAPM penalises its 300 % relative change
    assert magnitude_topk(delta, 0.5)[1, 1] == -3.0


def test_fapm_guards_zero_base():
    from model_tailor.kernel.baselines import fapm, fapm_scores

    base = T([[0.0, 2.0], [2.0, 0.0]])  # mean 1
    delta = T([[5.0, 1.0], [0.0, 0.0]])
    scores = fapm_scores(delta, base)
    assert scores[0, 0] == -torch.inf and scores[1, 1] == 0.0  # infinite relative change / nothing changed
    assert scores[0, 1] == pytest.approx(0.5)  # 1 - 1·1/2
    assert not scores.isnan().any()
    assert torch.equal(fapm(delta, base, 0.25), T([[0.0, 1.0], [0.0, 0.0]]))
    zero = torch.zeros(2, 2)
    assert torch.equal(fapm_scores(delta, zero), delta.abs())  # no scale at all: plain magnitude
    assert torch.equal(fapm(delta, zero, 0.25), T([[5.0, 0.0], [0.0, 0.0]]))


def test_lines_scales_rise_with_depth_by_hand():
    from model_tailor.kernel.baselines import lines, lines_scale

    # L = 5, alpha 0.2, beta 1: 0.2 + 0.8·l/4 -> 0.2, 0.4, 0.6, 0.8, 1.0
    assert [lines_scale(i, 5, 0.2, 1.0) for i in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lines_scale(0, 5) == 0.0 and lines_scale(4, 5) == 1.0  # defaults: first removed, last kept
    assert lines_scale(0, 1, 0.3, 0.9) == 0.9
    assert torch.allclose(lines(D, 2, 5, alpha=0.2, beta=1.0), 0.6 * D)
    assert torch.equal(lines(D, None, 5), D)  # outside the blocks (projector): whole delta
    with pytest.raises(ConfigError):
        lines_scale(5, 5)
    fn = BASELINES.get("lines")
    params = BaselineParams(name="model.language_model.layers.3.mlp.down_proj.weight", num_layers=5)
    assert torch.allclose(fn([D], params, None), 0.75 * D)  # 0 + 1·3/4


def test_svd_lowrank_rank_budget_and_values_by_hand():
    from model_tailor.kernel.baselines import lowrank_rank, svd_lowrank

    assert lowrank_rank(4, 4, 1.0) == 2  # floor(16 / 8)
    assert lowrank_rank(4, 4, 0.5) == 1
    assert lowrank_rank(4, 4, 0.2) == 0  # floor(0.4)
    assert lowrank_rank(100, 300, 0.1) == 7  # floor(0.1 · 30000 / 400) = floor(7.5)
    d = torch.diag(T([1.0, 4.0, 2.0, 3.0]))  # singular values 4, 3, 2, 1
    assert torch.allclose(svd_lowrank(d, 1.0), torch.diag(T([0.0, 4.0, 0.0, 3.0])), atol=1e-6)
    assert torch.allclose(svd_lowrank(d, 0.5), torch.diag(T([0.0, 4.0, 0.0, 0.0])), atol=1e-6)
    assert torch.equal(svd_lowrank(d, 0.2), torch.zeros(4, 4))
    outer = torch.outer(T([1.0, -2.0, 0.5]), T([2.0, 0.0, 1.0, -1.0]))  # rank one: recovered exactly at r = 1
    assert torch.allclose(svd_lowrank(outer, 0.6), outer, atol=1e-6)  # floor(0.6·12/7) = 1
    vec = T([0.5, -3.0, 1.0, 0.1])
    assert torch.equal(svd_lowrank(vec, 0.5), T([0.0, -3.0, 1.0, 0.0]))  # not a matrix: magnitude top-k


def test_revert_first_k_by_hand():
    from model_tailor.kernel.baselines import revert_first_k

    tuned = (9, 7, 8, 6)  # unordered on purpose: the shallowest two are 6 and 7
    assert torch.equal(revert_first_k(D, 6, tuned, 2), torch.zeros_like(D))
    assert torch.equal(revert_first_k(D, 7, tuned, 2), torch.zeros_like(D))
    assert torch.equal(revert_first_k(D, 8, tuned, 2), D)
    assert torch.equal(revert_first_k(D, None, tuned, 2), D)  # projector keeps its delta
    assert torch.equal(revert_first_k(D, 6, tuned, 0), D)
    fn = BASELINES.get("revert_first_k")
    params = BaselineParams(name="model.language_model.layers.6.self_attn.q_proj.weight", tuned_layers=tuned, k=1)
    assert torch.equal(fn([D], params, None), torch.zeros_like(D))
    with pytest.raises(ConfigError, match="needs k"):
        fn([D], BaselineParams(name="x.layers.6.w"), None)


def test_new_baselines_say_what_they_miss():
    with pytest.raises(ConfigError, match="pre-trained tensor"):
        BASELINES.get("fapm")([D], BaselineParams(density=0.5), None)
    with pytest.raises(ConfigError, match="parameter name"):
        BASELINES.get("lines")([D], BaselineParams(num_layers=4), None)
    with pytest.raises(ConfigError, match="density"):
        BASELINES.get("svd")([D], BaselineParams(), None)
