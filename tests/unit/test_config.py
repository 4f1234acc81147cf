"""TailorConfig: validation, YAML loading with overrides, one-line errors naming the field."""

from __future__ import annotations

import pytest

from model_tailor.config import TailorConfig
from model_tailor.errors import ConfigError

BASE = {"base": "b", "finetuned": "f", "calibration": "c.jsonl"}


def test_defaults_are_the_corrected_behaviour():
    cfg = TailorConfig.build(**BASE)
    assert (cfg.density, cfg.alpha, cfg.granularity, cfg.compensation) == (0.1, 0.8, "block", "obs")
    assert (cfg.samples, cfg.seed, cfg.device, cfg.non_target_policy) == (128, 0, "cpu", "reset")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("density", 0, "density"),
        ("density", 1.5, "density"),
        ("alpha", -0.1, "alpha"),
        ("granularity", "layer", "granularity"),
        ("compensation", "magic", "compensation"),
        ("samples", 0, "samples"),
        ("device", "tpu", "device"),
        ("device", "cpu:1", "device"),
        ("desnity", 0.1, "desnity: unknown option"),
    ],
)
def test_invalid_fields_are_one_line_config_errors(field, value, match):
    with pytest.raises(ConfigError, match=match) as info:
        TailorConfig.build(**BASE, **{field: value})
    assert "\n" not in str(info.value)


def test_frozen():
    cfg = TailorConfig.build(**BASE)
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error type
        cfg.density = 0.5  # type: ignore[misc]


def test_calibration_required_unless_data_free():
    with pytest.raises(ConfigError, match="calibration data is required"):
        TailorConfig.build(base="b", finetuned="f")
    cfg = TailorConfig.build(base="b", finetuned="f", alpha=1.0, compensation="none")
    assert cfg.data_free


def test_yaml_with_overrides_and_relative_paths(tmp_path):
    p = tmp_path / "sub" / "c.yaml"
    p.parent.mkdir()
    p.write_text("base: models/base\nfinetuned: /abs/ft\ncalibration: c.jsonl\ndensity: 0.2\ninclude: '*.mlp.*'\n")
    cfg = TailorConfig.from_yaml(p, density=0.3, seed=None)
    assert cfg.density == 0.3 and cfg.seed == 0
    assert str(cfg.base) == str(p.parent / "models/base") and str(cfg.finetuned) == "/abs/ft"
    assert cfg.include == ("*.mlp.*",)


@pytest.mark.parametrize(
    ("text", "match"),
    [("densty: 0.1\n", "densty: unknown option"), ("- a\n- b\n", "mapping"), ("a: [1\n", "not valid YAML")],
)
def test_yaml_errors(tmp_path, text, match):
    p = tmp_path / "c.yaml"
    p.write_text("base: b\nfinetuned: f\ncalibration: c\n" + text if "densty" in text else text)
    with pytest.raises(ConfigError, match=match):
        TailorConfig.from_yaml(p)


def test_fingerprint_ignores_output_paths():
    a = TailorConfig.build(**BASE, out="x.safetensors")
    b = TailorConfig.build(**BASE, out="y.safetensors", save_model="m")
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != TailorConfig.build(**BASE, density=0.2).fingerprint()
