"""TailorConfig: validation, YAML loading with overrides, one-line errors naming the field."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

from model_tailor import options
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
        ("compensation_from", -1, "compensation_from"),
        ("compensation_depth", 0, "compensation_depth"),
        ("compensation_depth", 1.5, "compensation_depth"),
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


def test_yaml_not_utf8_is_one_line_naming_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"base: b\nfinetuned: \xe9t\xe9\n")  # latin-1, not UTF-8
    with pytest.raises(ConfigError, match="is not UTF-8 text") as info:
        TailorConfig.from_yaml(p)
    assert str(p) in str(info.value) and "\n" not in str(info.value)


def test_missing_yaml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        TailorConfig.from_yaml(tmp_path / "absent.yaml")


def test_choice_fields_and_kernel_checks_share_one_vocabulary():
    from model_tailor.kernel import compensation, masking, scoring, structure, tailor

    fields = TailorConfig.model_fields
    assert get_args(fields["granularity"].annotation) == ("block", "row", "tensor", "global")
    assert masking.GRANULARITIES == ("block", "row", "tensor")  # "global" is chosen above the one-tensor kernel
    assert compensation.COMPENSATIONS is options.COMPENSATIONS == get_args(fields["compensation"].annotation)
    assert scoring.SENSITIVITY_KINDS is options.SENSITIVITY_KINDS == get_args(fields["sensitivity"].annotation)
    assert tailor.MASK_TIMINGS is options.MASK_TIMINGS == get_args(fields["mask_timing"].annotation)
    assert tailor.SALIENCE_SOURCES is options.SALIENCE_SOURCES == get_args(fields["salience_from"].annotation)
    assert structure.STRUCTURES is options.STRUCTURES == get_args(fields["structure"].annotation)


def test_every_field_has_a_description():
    assert [n for n, f in TailorConfig.model_fields.items() if not f.description] == []


def test_shard_size_and_cache_folder_have_one_default(monkeypatch, tmp_path):
    from model_tailor.bench.assets import resolve_cache_dir
    from model_tailor.io.checkpoint import CheckpointWriter
    from model_tailor.patch.apply import apply_patches, remove_patches

    assert options.DEFAULT_MAX_SHARD_BYTES == 2_000_000_000
    assert TailorConfig.build(**BASE).max_shard_bytes == options.DEFAULT_MAX_SHARD_BYTES
    for fn in (CheckpointWriter, apply_patches, remove_patches):
        assert inspect.signature(fn).parameters["max_shard_bytes"].default == options.DEFAULT_MAX_SHARD_BYTES
    monkeypatch.setenv("MODEL_TAILOR_CACHE", "~/mt-cache")
    expected = Path.home() / "mt-cache"
    assert resolve_cache_dir() == TailorConfig.build(**BASE).cache_dir == expected
    assert resolve_cache_dir(tmp_path) == tmp_path  # --cache-dir wins


def test_options_import_nothing_heavy():
    code = "import sys, model_tailor.options; print(sorted({'torch', 'pydantic', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("length", "start", "depth", "first"),
    [
        (30, 0, 1.0, 0),  # every layer
        (30, 0, 0.4, 18),  # 0.4 x 30 is 12 layers, not 13 (the float product is 12.000000000000002)
        (30, 0, 0.25, 22),  # ceil(7.5) = 8 layers: 22..29
        (30, 0, 0.5, 15),
        (30, 20, 0.5, 20),  # compensation_from is later: it wins
        (30, 10, 0.5, 15),  # depth is later: it wins
        (4, 0, 0.01, 3),  # at least one layer
        (1, 0, 0.5, 0),
    ],
)
def test_first_compensated_layer(length, start, depth, first):
    from model_tailor.config import first_compensated

    assert first_compensated(length, start, depth) == first
