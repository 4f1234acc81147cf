"""BuildConfig keys: what names the cached models must not move when a field is added."""

from __future__ import annotations

from model_tailor.bench.models import BuildConfig


def test_the_default_builds_keep_the_keys_of_their_cached_models():
    """The keys of the main and all-layers builds every measured run used (docs/bench/*/RUN.md), written out."""
    assert BuildConfig().key() == "smollm2-11cc00d37b4c"
    assert BuildConfig().all_layers().key() == "smollm2-4fb4940f57cf"
    assert BuildConfig().stage1_key() == "smollm2-dfe07a33c1c3"


def test_another_fine_tune_seed_is_another_fine_tune_of_the_same_pretrained_model():
    other = BuildConfig(ft_seed=1)
    assert other.key() != BuildConfig().key()
    assert other.stage1_key() == BuildConfig().stage1_key()
    seeds = (BuildConfig().ft_draw_seed, other.ft_draw_seed, BuildConfig(seed=5, ft_seed=2).ft_draw_seed)
    assert seeds == (0, 1000, 2005)
