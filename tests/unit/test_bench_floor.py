"""``benchmarks/bench_floor.py`` on a tiny Llama shape: what the floor runs, the cached pair and the JSON it writes."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
TINY = ["--layers", "3", "--changed", "2", "--hidden", "64", "--intermediate", "96", "--heads", "4"]
TINY += ["--vocab", "600", "--texts", "6", "--tokens", "8", "--batch-size", "4"]


def _module():
    """The script as a module; registered in sys.modules first, which its dataclasses need."""
    spec = importlib.util.spec_from_file_location("bench_floor", _DIR / "bench_floor.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_floor", mod)
    spec.loader.exec_module(sys.modules["bench_floor"])
    return sys.modules["bench_floor"]


def test_floor_runs_tuned_blocks_twice_and_the_others_once(tmp_path, monkeypatch):
    from transformers.models.llama import modeling_llama

    bf = _module()
    args = bf.parse_args([*TINY, "--tmp", str(tmp_path)])
    pair = bf.cached_pair(args)
    assert bf.cached_pair(args) == pair  # cached: the second call finds the first one's folder
    assert len(list((tmp_path / "model-tailor-bench-floor").iterdir())) == 1
    _, state = bf.read_both(pair)
    # 3 layers of 4·64² + 3·64·96 + 2·64, embeddings and head 600·64 each, the final norm 64
    assert sum(t.numel() for t in state.values()) == 3 * (4 * 64 * 64 + 3 * 64 * 96 + 2 * 64) + 2 * 600 * 64 + 64
    calls: Counter[int] = Counter()
    real = modeling_llama.LlamaDecoderLayer.forward

    def counting(self, *a, **k):
        calls[self.self_attn.layer_idx] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "forward", counting)
    assert bf.forward_floor(pair, state, args) > 0
    batches = 2  # 6 texts in batches of 4
    assert calls == {0: batches, 1: 2 * batches, 2: 2 * batches}


@pytest.mark.slow  # two child processes (model-tailor, mergekit)
def test_run_writes_every_column(tmp_path):
    from model_tailor.bench.peers import is_available

    bf = _module()
    out = tmp_path / "floor.json"
    result = bf.run(bf.parse_args([*TINY, "--tmp", str(tmp_path), "--out", str(out)]))
    assert json.loads(out.read_text()) == result
    for key in ("read_seconds", "forward_seconds", "floor_seconds", "tailor_seconds", "tailor_over_floor"):
        assert result[key] > 0, key
    assert result["floor_seconds"] == pytest.approx(result["read_seconds"] + result["forward_seconds"])
    assert result["tailor_over_floor"] == pytest.approx(result["tailor_seconds"] / result["floor_seconds"])
    if is_available():
        assert result["mergekit_ties_seconds"] > 0 and result["mergekit"]
        assert result["tailor_over_ties"] == pytest.approx(result["tailor_seconds"] / result["mergekit_ties_seconds"])
    else:
        assert result["mergekit_ties_seconds"] is None and result["tailor_over_ties"] is None
    assert (result["layers"], result["changed"], result["texts"], result["tokens"]) == (3, 2, 6, 8)
    assert list(tmp_path.glob("bench-floor-*")) == []  # the scratch folder is removed, the cached pair stays
    assert "tailor/floor" in bf.table(result)


def test_changed_out_of_range_is_refused(tmp_path):
    bf = _module()
    with pytest.raises(SystemExit, match="--changed"):
        bf.run(bf.parse_args([*TINY[:2], "--changed", "4", "--tmp", str(tmp_path)]))
