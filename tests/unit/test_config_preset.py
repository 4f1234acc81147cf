"""``preset: paper``: the paper's method (docs/METHOD.md §2-§9 with the corrections of §16) as literal values, one
switch away whatever the defaults are; explicit values win over it; the CLI and YAML reach it."""

from __future__ import annotations

import pytest

from model_tailor.config import PRESETS, TailorConfig
from model_tailor.errors import ConfigError

BASE = {"base": "b", "finetuned": "f", "calibration": "c.jsonl"}

# What the paper describes, written out here as well (not read from PRESETS), so a change to the preset fails.
PAPER = {
    "density": 0.1,
    "alpha": 0.8,
    "granularity": "block",
    "compensation": "obs",
    "sensitivity": "weight",
    "mask_timing": "adaptive",
    "guard": True,
    "block_size": 128,
    "percdamp": 0.01,
    "non_target_policy": "reset",
    "preserve": None,
    "structure": "sparse",
    "salience_from": "delta",
    "salience": "magnitude",
    "compensation_from": 0,
    "compensation_depth": 1.0,
}


def test_the_paper_preset_is_the_papers_method():
    cfg = TailorConfig.build(**BASE, preset="paper")
    assert {k: getattr(cfg, k) for k in PAPER} == PAPER
    assert set(PAPER) <= set(PRESETS["paper"])


def test_explicit_values_win_over_the_preset():
    cfg = TailorConfig.build(**BASE, preset="paper", alpha=0.5, compensation_depth=0.4)
    assert (cfg.alpha, cfg.compensation_depth, cfg.compensation) == (0.5, 0.4, "obs")


def test_yaml_and_cli_reach_the_preset(tmp_path):
    """A YAML ``preset: paper`` with one key of its own; the CLI's ``--preset paper --alpha 0.9`` on top of it."""
    import argparse

    from model_tailor.commands.tailor import add_parser, build_config

    y = tmp_path / "run.yaml"
    y.write_text("preset: paper\nbase: b\nfinetuned: f\ncalibration: c.jsonl\ncompensation_depth: 0.5\n")
    cfg = TailorConfig.from_yaml(y)
    assert cfg.compensation_depth == 0.5 and {k: getattr(cfg, k) for k in PAPER if k != "compensation_depth"} == {
        k: v for k, v in PAPER.items() if k != "compensation_depth"
    }
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    cli = ["tailor", "--base", "b", "--finetuned", "f", "--calibration", "c.jsonl", "--out", "p", "--preset", "paper"]
    assert build_config(parser.parse_args([*cli, "--alpha", "0.9"])).alpha == 0.9
    by_cli = build_config(parser.parse_args(cli))
    assert {k: getattr(by_cli, k) for k in PAPER} == PAPER


def test_an_unknown_preset_is_a_one_line_error():
    with pytest.raises(ConfigError, match="preset") as info:
        TailorConfig.build(**BASE, preset="fancy")
    assert "\n" not in str(info.value)


# The data-free candidate measured best on both TailorBench pairs (README, 2026-12-08), written out.
SELF_LOWRANK = {
    "preserve": "self",
    "structure": "lowrank",
    "preserve_weight": 3.0,
    "compensation_depth": 0.4,
    "alpha": 1.0,
}


def test_the_self_lowrank_preset_sets_its_five_options_and_leaves_the_rest_at_the_defaults():
    cfg = TailorConfig.build(**BASE, preset="self-lowrank")
    assert {k: getattr(cfg, k) for k in SELF_LOWRANK} == SELF_LOWRANK
    assert PRESETS["self-lowrank"] == SELF_LOWRANK
    plain = TailorConfig.build(**BASE)
    others = set(TailorConfig.model_fields) - set(SELF_LOWRANK) - {"preset"}
    assert {k: getattr(cfg, k) for k in others} == {k: getattr(plain, k) for k in others}
    explicit = TailorConfig.build(**BASE, preset="self-lowrank", preserve="data.jsonl", preserve_weight=1.0)
    assert (explicit.preserve, explicit.preserve_weight, explicit.structure) == ("data.jsonl", 1.0, "lowrank")


def test_the_self_lowrank_preset_refuses_what_low_rank_or_self_data_cannot_do():
    """Low rank shares no budget with a global mask; self data needs calibration data and one fine-tune."""
    with pytest.raises(ConfigError, match="granularity 'global'"):
        TailorConfig.build(**BASE, preset="self-lowrank", granularity="global")
    with pytest.raises(ConfigError, match="cannot use preserve 'self'"):
        TailorConfig.build(**{**BASE, "finetuned": ["f", "g"]}, preset="self-lowrank")
