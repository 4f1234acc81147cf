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
