"""mergekit peer merges on a pico LLaVA pair, against known answers (see ``bench/peers.py``'s docstring).

For one fine-tuned model over ``base_model``: task_arithmetic = base + w·delta; ties = base + top-k(|delta|)
with k = max(1, int(d·numel)) (the project's ``magnitude`` / ``ties`` baselines up to that rounding);
dare_ties = base + Bernoulli(d) mask · delta rescaled to the tensor's L1 norm, deterministic for a seed.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("mergekit")

from model_tailor.bench import peers
from model_tailor.bench.methods import MethodSpec, baseline_overrides, changed_tensors
from model_tailor.io.checkpoint import CheckpointReader
from model_tailor.kernel.masking import keep_count
from model_tailor.pipeline.architectures import checkpoint_names


class Pair:
    def __init__(self, pico, tmp_path_factory):
        p = pico("llava")
        self.base_dir, self.ft_dir = p.base, p.finetuned
        base_model = p.model_cls.from_pretrained(p.base, dtype=torch.float32)
        ft_model = p.model_cls.from_pretrained(p.finetuned, dtype=torch.float32)
        self.base = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
        self.ft = {k: v.detach().clone() for k, v in ft_model.state_dict().items()}
        self.names = changed_tensors(self.base, self.ft)
        with CheckpointReader(p.base) as reader:
            self.to_ckpt = checkpoint_names(base_model, self.names, set(reader.names()))
        self.work = tmp_path_factory.mktemp("peers-work")
        self._cache: dict[tuple, peers.PeerMerge] = {}

    def merge(self, method: str, **kw) -> peers.PeerMerge:
        key = (method, tuple(sorted(kw.items())))
        if key not in self._cache:
            self._cache[key] = peers.merge_pair(
                self.base_dir, self.ft_dir, method, names=self.names, to_ckpt=self.to_ckpt, work_dir=self.work, **kw
            )
        return self._cache[key]

    def delta(self, n: str) -> torch.Tensor:
        return self.ft[n] - self.base[n]


@pytest.fixture(scope="module")
def pair(pico, tmp_path_factory) -> Pair:
    return Pair(pico, tmp_path_factory)


def test_fixture_changes_language_layers_and_projector(pair):
    # The fine-tune touches decoder layers (stored as language_model.model.* on disk) and the projector.
    assert any(n.startswith("model.language_model.layers.") for n in pair.names)
    assert any(n.startswith("model.multi_modal_projector.") for n in pair.names)
    assert any(pair.to_ckpt[n].startswith("language_model.model.layers.") for n in pair.names)


def test_unstaged_llava_checkpoint_loses_the_language_model(pair, tmp_path):
    """Why ``merge_pair`` stages the tensors: mergekit 0.1.5 reading the transformers-5 LLaVA folders
    directly keeps the vision tower and projector but silently drops every language-model tensor. If this
    starts failing, mergekit reads such checkpoints now and the staging could go."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    cfg = MergeConfiguration.model_validate(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(pair.base_dir),
            "dtype": "float32",
            "models": [{"model": str(pair.ft_dir), "parameters": {"weight": 0.5}}],
        }
    )
    with torch.random.fork_rng(devices=[]):
        run_merge(cfg, str(tmp_path / "out"), MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    with CheckpointReader(tmp_path / "out") as reader:
        written = set(reader.names())
    assert any(n.startswith("model.multi_modal_projector.") for n in written)
    assert not any("language_model" in n for n in written)


def test_task_arithmetic_is_base_plus_scaled_delta(pair):
    merged = pair.merge("task_arithmetic", weight=0.5)
    assert sorted(merged.overrides) == pair.names
    ours = baseline_overrides(MethodSpec("task_arithmetic", None, {"scale": 0.5}), pair.base, pair.ft, pair.names)
    for n in pair.names:
        expected = pair.base[n] + 0.5 * pair.delta(n)
        torch.testing.assert_close(merged.overrides[n], expected, rtol=0, atol=1e-6, msg=n)
        torch.testing.assert_close(merged.overrides[n], ours[n], rtol=0, atol=1e-6, msg=n)
    info = merged.info
    assert info["mergekit"] == peers.mergekit_version() and info["parameters"] == {"weight": 0.5, "lambda": 1.0}
    assert merged.seconds >= info["merge_seconds"] > 0


@pytest.mark.parametrize("density", [0.1, 0.25])
def test_ties_is_the_projects_magnitude_topk(pair, density):
    """Single-model TIES = base + top-k of |delta|, k = max(1, int(d·numel)); here int(d·numel) equals the
    project's keep_count on every tensor, so the result is the project's ties (and magnitude) row exactly."""
    merged = pair.merge("ties", density=density)
    ours_ties = baseline_overrides(MethodSpec("ties", density), pair.base, pair.ft, pair.names)
    ours_mag = baseline_overrides(MethodSpec("magnitude", density), pair.base, pair.ft, pair.names)
    for n in pair.names:
        numel = pair.base[n].numel()
        assert max(1, int(density * numel)) == keep_count(density, numel, tolerance="absolute"), n
        kept = merged.overrides[n] != pair.base[n]
        assert int(kept.sum()) == keep_count(density, numel, tolerance="absolute"), n
        # the kept entries are exactly the largest |delta| ones, at their fine-tuned value (no rescale)
        smallest_kept = pair.delta(n).abs()[kept].min()
        assert bool((pair.delta(n).abs()[~kept] <= smallest_kept).all()), n
        assert torch.equal(merged.overrides[n], ours_ties[n]), n
        assert torch.equal(merged.overrides[n], ours_mag[n]), n


def test_ties_weight_has_no_effect_for_one_model(pair):
    """normalize divides w·delta by w: same kept entries, same values up to float rounding."""
    a, b = pair.merge("ties", density=0.1), pair.merge("ties", density=0.1, weight=0.3)
    for n in pair.names:
        assert torch.equal(a.overrides[n] != pair.base[n], b.overrides[n] != pair.base[n]), n
        torch.testing.assert_close(a.overrides[n], b.overrides[n], rtol=0, atol=1e-7, msg=n)


def test_ties_of_two_finetunes_is_the_projects_two_delta_ties(pair, pico, tmp_path):
    """The multitask pair's ``mergekit_ties``: two fine-tunes of one base (the second: base - 0.5·delta + seeded
    noise on every changed tensor, so signs disagree and magnitudes differ), trimmed to 0.25 each, sign election,
    disjoint mean; equal to ``methods.merge_overrides`` (int(0.25·n) = keep_count here)."""
    from model_tailor.bench.methods import merge_overrides

    p = pico("llava")
    second = p.model_cls.from_pretrained(p.finetuned, dtype=torch.float32)
    gen = torch.Generator().manual_seed(5)
    state = {}
    for n in pair.names:
        noise = torch.randn(pair.base[n].shape, generator=gen) * pair.delta(n).abs().mean()
        state[n] = pair.base[n] - 0.5 * pair.delta(n) + noise
    second.load_state_dict(state, strict=False)
    second.save_pretrained(tmp_path / "second")
    ft2 = {k: v.detach().clone() for k, v in second.state_dict().items()}
    merged = peers.merge_pair(
        pair.base_dir,
        [pair.ft_dir, tmp_path / "second"],
        "ties",
        names=pair.names,
        to_ckpt=pair.to_ckpt,
        density=0.25,
        work_dir=pair.work,
    )
    ours = merge_overrides(MethodSpec("ties", 0.25), pair.base, [pair.ft, ft2], pair.names)
    assert merged.info["models"] == 2 and sorted(merged.overrides) == pair.names
    for n in pair.names:
        assert max(1, int(0.25 * pair.base[n].numel())) == keep_count(0.25, pair.base[n].numel(), tolerance="absolute")
        torch.testing.assert_close(merged.overrides[n], ours[n], rtol=0, atol=1e-6, msg=n)


def test_mergekit_magnitude_rounding_differs_from_keep_count():
    """The one place mergekit's top-k and the project's differ: int(d·n) without the float guard, and >= 1."""
    from mergekit.sparsify import magnitude

    x = torch.arange(1.0, 101.0)  # 0.29 * 100 = 28.999999999999996
    assert int((magnitude(x, 0.29) != 0).sum()) == 28 and keep_count(0.29, 100, tolerance="absolute") == 29
    y = torch.arange(1.0, 33.0)  # 0.01 * 32 = 0.32
    assert int((magnitude(y, 0.01) != 0).sum()) == 1 and keep_count(0.01, 32, tolerance="absolute") == 0


def test_dare_ties_is_bernoulli_mask_rescaled_to_l1_and_seeded(pair):
    d = 0.25
    torch.manual_seed(123)
    expected_next = torch.rand(4)
    torch.manual_seed(123)
    merged = peers.merge_pair(
        pair.base_dir,
        pair.ft_dir,
        "dare_ties",
        names=pair.names,
        to_ckpt=pair.to_ckpt,
        density=d,
        seed=0,
        work_dir=pair.work,
    )
    assert torch.equal(torch.rand(4), expected_next), "the caller's torch RNG must be restored"
    again = pair.merge("dare_ties", density=d, seed=0)
    other = pair.merge("dare_ties", density=d, seed=1)
    assert all(torch.equal(merged.overrides[n], again.overrides[n]) for n in pair.names)
    assert any(not torch.equal(merged.overrides[n], other.overrides[n]) for n in pair.names)
    off_floor = 0
    for n in pair.names:
        delta, merged_delta = pair.delta(n), merged.overrides[n] - pair.base[n]
        kept = merged_delta != 0
        numel, k = delta.numel(), int(kept.sum())
        assert k > 0, n
        # kept entries: delta times one factor per tensor, the L1 ratio (not 1/density)
        factor = delta.abs().sum() / delta.abs()[kept].sum()
        torch.testing.assert_close(merged_delta[kept], delta[kept] * factor, rtol=1e-5, atol=1e-7, msg=n)
        torch.testing.assert_close(merged_delta.abs().sum(), delta.abs().sum(), rtol=1e-5, atol=0, msg=n)
        # dropped entries are back at base exactly
        assert torch.equal(merged.overrides[n][~kept], pair.base[n][~kept]), n
        # Bernoulli(d): the count is random around d·numel (5 sigma), not exactly keep_count
        sigma = (numel * d * (1 - d)) ** 0.5
        assert abs(k - d * numel) <= 5 * sigma + 1, (n, k, numel)
        off_floor += k != keep_count(d, numel, tolerance="absolute")
    assert off_floor > 0, "every kept count equals floor(d·numel): not a Bernoulli mask?"


def test_merge_pair_rejects_bad_arguments(pair):
    from model_tailor.errors import CheckpointError, ConfigError

    with pytest.raises(ConfigError):
        pair.merge("slerp")
    with pytest.raises(ConfigError):
        pair.merge("ties")  # no density
    with pytest.raises(ConfigError):
        pair.merge("task_arithmetic", density=0.1)
    with pytest.raises(CheckpointError):
        peers.merge_pair(
            pair.base_dir, pair.ft_dir, "ties", names=pair.names, to_ckpt={}, density=0.1, work_dir=pair.work
        )
    assert not any(pair.work.iterdir()), "temporary merge folders left behind"
