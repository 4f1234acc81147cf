"""``benchmarks/bench_scale.py`` on a tiny Llama shape: the pair it builds and the table it writes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_scale.py"


def _module():
    """The script as a module; registered in sys.modules first, which its dataclasses need."""
    spec = importlib.util.spec_from_file_location("bench_scale", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_scale", mod)
    spec.loader.exec_module(sys.modules["bench_scale"])
    return sys.modules["bench_scale"]


def test_pair_is_sharded_bf16_and_changes_every_decoder_linear(tmp_path):
    bs = _module()
    shape = bs.Shape(hidden=16, intermediate=24, heads=2, vocab=520)
    base, ft = bs.write_pair(tmp_path, shape, 2)
    index = json.loads((base / bs.INDEX).read_text())
    assert index == json.loads((ft / bs.INDEX).read_text())
    assert set(index["weight_map"].values()) == {
        "embed.safetensors",
        "layer-000.safetensors",
        "layer-001.safetensors",
        "head.safetensors",
    }
    for file in set(index["weight_map"].values()):
        b, f = load_file(str(base / file)), load_file(str(ft / file))
        for name, t in b.items():
            assert t.dtype == torch.bfloat16 and index["weight_map"][name] == file
            changed = not torch.equal(t, f[name])
            assert changed == (name.startswith("model.layers.") and "proj" in name), name
    assert load_file(str(base / "head.safetensors"))["lm_head.weight"].shape == (520, 16)


def test_run_writes_the_table_json(tmp_path):
    bs = _module()
    out = tmp_path / "scale.json"
    argv = ["--layers", "1", "--hidden", "64", "--intermediate", "96", "--heads", "4", "--vocab", "600"]
    result = bs.run(bs.parse_args([*argv, "--texts", "2", "--words", "8", "--tmp", str(tmp_path), "--out", str(out)]))
    assert json.loads(out.read_text()) == result
    assert result["shape"] == {"hidden": 64, "intermediate": 96, "heads": 4, "vocab": 600}
    (row,) = result["rows"]
    assert row["layers"] == 1 and row["blocks"] == 1
    assert row["peak_rss_gb"] > 0.05  # a Python child with torch loaded holds well over 50 MB
    assert 0.05 < row["peak_anon_gb"] <= row["peak_rss_gb"]  # sampled anonymous memory: part of RSS
    assert row["peak_gpu_gb"] is None  # CPU run
    assert 0 < row["seconds_per_block"] <= row["seconds_total"]
    assert 0 < row["checkpoint_gb"] < 0.01
    assert list(tmp_path.glob("bench-scale-*")) == []  # the pair is cleaned up
