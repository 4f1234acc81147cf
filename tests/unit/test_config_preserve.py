"""TailorConfig fields of preserve-aware tailoring and patch structures: defaults and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_tailor.config import DEFAULT_PRESERVE_WEIGHT, TailorConfig
from model_tailor.errors import ConfigError

BASE = {"base": "b", "finetuned": "f", "calibration": "c.jsonl"}
DATA_FREE = {"base": "b", "finetuned": "f", "alpha": 1.0, "compensation": "none"}


def test_defaults_keep_the_plain_run():
    cfg = TailorConfig.build(**BASE)
    assert cfg.preserve is None and cfg.structure == "sparse" and cfg.salience_from == "delta"
    assert cfg.preserve_weight == DEFAULT_PRESERVE_WEIGHT == 1.0
    assert (cfg.preserve_samples, cfg.preserve_max_new_tokens) == (64, 48)


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MODEL_TAILOR_CACHE", str(tmp_path))
    assert TailorConfig.build(**BASE).cache_dir == tmp_path
    monkeypatch.delenv("MODEL_TAILOR_CACHE")
    assert TailorConfig.build(**BASE).cache_dir == Path.home() / ".cache" / "model-tailor"
    # where the cache lives does not change the patch: not part of the resume fingerprint
    assert TailorConfig.build(**BASE, cache_dir="a").fingerprint() == TailorConfig.build(**BASE).fingerprint()


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"preserve_weight": -0.5}, "preserve_weight"),
        ({"preserve_weight": float("nan")}, "preserve_weight"),
        ({"structure": "dense"}, "structure"),
        ({"salience_from": "weights"}, "salience_from"),
        ({"preserve_samples": 0}, "preserve_samples"),
        ({"preserve_max_new_tokens": 0}, "preserve_max_new_tokens"),
        ({"preserve": " "}, "preserve"),
        ({"granularity": "global", "structure": "lowrank"}, "granularity 'global'"),
    ],
)
def test_invalid_fields(fields, match):
    with pytest.raises(ConfigError, match=match) as info:
        TailorConfig.build(**BASE, **fields)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("fields", "match"), [({"preserve": "p.jsonl"}, "preserve needs"), ({"structure": "lowrank"}, "data-free")]
)
def test_preserve_and_structures_need_calibration(fields, match):
    with pytest.raises(ConfigError, match=match):
        TailorConfig.build(**DATA_FREE, **fields)


def test_yaml_preserve_path_resolves_beside_the_file_but_self_stays(tmp_path):
    p = tmp_path / "sub" / "c.yaml"
    p.parent.mkdir()
    head = "base: b\nfinetuned: f\ncalibration: c.jsonl\n"
    p.write_text(head + "preserve: keep.jsonl\npreserve-weight: 0.3\nstructure: sparse+lowrank\n")
    cfg = TailorConfig.from_yaml(p)
    assert cfg.preserve == str(p.parent / "keep.jsonl") and cfg.preserve_weight == 0.3
    assert cfg.structure == "sparse+lowrank"
    p.write_text(head + "preserve: self\n")
    assert TailorConfig.from_yaml(p).preserve == "self"


def test_lambda_changes_the_fingerprint():
    a = TailorConfig.build(**BASE, preserve="p.jsonl")
    assert a.fingerprint() != TailorConfig.build(**BASE, preserve="p.jsonl", preserve_weight=0.3).fingerprint()
