"""The bench's paired stratified bootstrap on hand-made outcomes with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from model_tailor.bench.stats import bootstrap, harmonic, resample_counts

ORIG, TGT = ("a", "b"), ("t",)


def _table(rows_a, rows_b, rows_t):
    hits = {"a": torch.tensor(rows_a, dtype=torch.float64), "b": torch.tensor(rows_b, dtype=torch.float64)}
    hits["t"] = torch.tensor(rows_t, dtype=torch.float64)
    logprob = {t: v - 2.0 for t, v in hits.items()}  # a hit is likelier: -1 against -2
    return hits, logprob


def test_resample_counts_are_stratified_and_seeded():
    counts = resample_counts({"a": 5, "t": 7}, 100, seed=3)
    assert counts["a"].shape == (100, 5) and counts["t"].shape == (100, 7)
    assert torch.equal(counts["a"].sum(1), torch.full((100,), 5.0, dtype=torch.float64))
    assert torch.equal(counts["t"].sum(1), torch.full((100,), 7.0, dtype=torch.float64))
    again = resample_counts({"a": 5, "t": 7}, 100, seed=3)
    assert all(torch.equal(counts[k], again[k]) for k in counts)


def test_points_follow_the_documented_formulas():
    # models: pretrained, finetuned, row
    hits, logprob = _table(
        [[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]],
        [[1, 0], [1, 0], [1, 1]],
        [[0, 0, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]],
    )
    a = bootstrap(hits, logprob, 0, 1, ORIG, TGT, resamples=10)
    # original: pre (0.5 + 0.5) / 2 = 0.5, row (0.25 + 1) / 2 = 0.625 -> retention 1.25; target 0.4 / 0.8 = 0.5
    assert a.points["retention"][2].item() == pytest.approx(1.25)
    assert a.points["target_ratio"][2].item() == pytest.approx(0.5)
    assert a.points["h_score"][2].item() == pytest.approx(2 * 1.25 * 0.5 / 1.75)
    assert a.points["target_ratio"][0].item() == 0.0 and a.points["retention"][0].item() == 1.0
    # mean log-probs: task a pre -1.5, row -1.75; task b pre -1.5, row -1 -> (e^-0.25 + e^0.5) / 2
    assert a.points["ll_retention"][2].item() == pytest.approx((math.exp(-0.25) + math.exp(0.5)) / 2)
    # task t: ft -1.2, row -1.6 -> e^-0.4
    assert a.points["ll_target_ratio"][2].item() == pytest.approx(math.exp(-0.4))
    assert a.points["ll_retention"][0].item() == 1.0 and a.points["ll_target_ratio"][1].item() == 1.0


def test_row_identical_to_finetuned_has_target_ratio_interval_exactly_one():
    g = torch.Generator().manual_seed(0)
    ft_t = (torch.rand(30, generator=g) < 0.6).double()
    hits = {
        "a": (torch.rand(3, 25, generator=g) < 0.5).double(),
        "b": (torch.rand(3, 25, generator=g) < 0.5).double(),
        "t": torch.stack([torch.zeros(30, dtype=torch.float64), ft_t, ft_t.clone()]),
    }
    hits["a"][2], hits["b"][2] = hits["a"][1], hits["b"][1]  # row 2 is the fine-tuned model
    logprob = {t: -torch.rand(v.shape, generator=g, dtype=torch.float64) for t, v in hits.items()}
    logprob["t"][2] = logprob["t"][1]
    a = bootstrap(hits, logprob, 0, 1, ORIG, TGT, resamples=2000, seed=1)
    assert a.interval("target_ratio", 2) == (1.0, 1.0)
    assert a.interval("ll_target_ratio", 2) == (1.0, 1.0)
    assert a.interval("retention", 0) == (1.0, 1.0)  # the pretrained anchor itself
    assert a.interval("retention", 2) == a.interval("retention", 1)
    assert a.difference("h_score", 2, 1) == {"delta": 0.0, "interval": [0.0, 0.0], "excludes_zero": False}


def test_two_rows_differing_on_one_item():
    n = 20
    ones, zeros = torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    row_a = ones.clone()
    row_b = ones.clone()
    row_b[7] = 0.0  # b misses one target item a hits
    half = torch.tensor([1.0, 0.0] * 5, dtype=torch.float64)
    hits = {"a": half.repeat(4, 1), "b": half.repeat(4, 1), "t": torch.stack([zeros, ones, row_a, row_b])}
    logprob = {t: torch.zeros_like(v) for t, v in hits.items()}
    a = bootstrap(hits, logprob, 0, 1, ORIG, TGT, resamples=4000, seed=0)
    diff = a.difference("target_ratio", 2, 3)
    # the fine-tuned model hits every item, so per resample the difference is c_7 / n with c_7 ~ Binomial(20, 1/20):
    # P(c_7 = 0) = 0.95^20 = 0.36 > 2.5 %, and the 97.5 % quantile of the binomial is 3 (P(<= 2) = 0.92,
    # P(<= 3) = 0.984)
    assert diff["delta"] == pytest.approx(1 / n)
    assert diff["interval"] == pytest.approx([0.0, 3 / n])
    assert diff["excludes_zero"] is False
    many = hits["t"].clone()
    many[3, :8] = 0.0  # now b misses 8 of 20: the difference is clearly positive
    b = bootstrap({**hits, "t": many}, logprob, 0, 1, ORIG, TGT, resamples=2000, seed=0)
    assert b.difference("target_ratio", 2, 3)["excludes_zero"] is True


def test_undefined_anchors_give_no_interval_and_harmonic_edges():
    zeros = torch.zeros(2, 4, dtype=torch.float64)
    a = bootstrap({"a": zeros, "b": zeros, "t": zeros}, {"a": zeros, "b": zeros, "t": zeros}, 0, 1, ORIG, TGT)
    assert a.interval("retention", 1) is None and math.isnan(a.points["h_score"][1].item())
    assert a.difference("retention", 1, 0) is None
    h = harmonic(torch.tensor([0.0, 1.0, torch.nan]), torch.tensor([0.0, 0.5, 1.0]))
    assert h[0] == 0.0 and h[1].item() == pytest.approx(2 / 3) and h[2].isnan()
    with pytest.raises(ValueError):
        bootstrap(
            {"a": zeros, "b": zeros, "t": zeros}, {"a": zeros, "b": zeros, "t": zeros}, 0, 1, ORIG, TGT, resamples=0
        )


def test_drift_is_the_mean_log_prob_drop_from_pretrained_and_leaves_other_metrics_alone():
    # probe "p" (likelihood only): pretrained [-1, -2, -3], finetuned 0.5 lower on every item, row 1.0 lower on
    # the first item only -> drift 0 (exactly, interval [0, 0]), 0.5 (a constant shift: interval [0.5, 0.5]), 1/3
    hits, logprob = _table(
        [[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]],
        [[1, 0], [1, 0], [1, 1]],
        [[0, 0, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]],
    )
    pre = torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64)
    probe = {**logprob, "p": torch.stack([pre, pre - 0.5, pre - torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)])}
    with_probe = bootstrap(hits, probe, 0, 1, ORIG, TGT, probe=("p",), resamples=300, seed=2)
    without = bootstrap(hits, logprob, 0, 1, ORIG, TGT, resamples=300, seed=2)
    drift = with_probe.points["drift"]
    assert drift[0].item() == 0.0 and with_probe.interval("drift", 0) == (0.0, 0.0)
    assert drift[1].item() == pytest.approx(0.5) and with_probe.interval("drift", 1) == pytest.approx((0.5, 0.5))
    assert drift[2].item() == pytest.approx(1 / 3)
    low, high = with_probe.interval("drift", 2)
    assert 0.0 <= low < 1 / 3 < high <= 1.0  # one item of three carries it: the resamples spread it
    assert with_probe.difference("drift", 1, 2)["delta"] == pytest.approx(0.5 - 1 / 3)
    # the probe is drawn after the other tasks: every other metric's resamples are unchanged by it
    assert "drift" not in without.points
    for key in without.samples:
        assert torch.equal(with_probe.samples[key].nan_to_num(-9), without.samples[key].nan_to_num(-9))
