"""Per-tensor records: typed in memory, the same JSON as the kernel stats merged with the pipeline's extras."""

from __future__ import annotations

import dataclasses
import json

from model_tailor.kernel.tailor import TailorStats
from model_tailor.pipeline.report import LayerReport, TensorRecord

KERNEL = TailorStats("w", 12, 3, 0.25, 2.0, 1.0, "compensated", "obs", "adaptive", 0.01, {"sweep": 0.5})
EXTRA = {"structure": "sparse", "rank": 0, "params": 3, "budget": 3.0}
TRADEOFF = {"target_error_masked": 1.0, "target_error_final": 0.5, "preserve_error_masked": 4.0,
            "preserve_error_final": 3.0}  # fmt: skip


def test_record_json_is_kernel_stats_then_extras_then_data_free():
    plain = TensorRecord(**dataclasses.asdict(KERNEL), **EXTRA, data_free=False)
    expected = {**dataclasses.asdict(KERNEL), **EXTRA, "data_free": False}
    assert json.dumps(plain.to_json()) == json.dumps(expected)  # same keys, same order, no trade-off keys
    dual = TensorRecord(**dataclasses.asdict(KERNEL), **EXTRA, **TRADEOFF)
    assert json.dumps(dual.to_json()) == json.dumps(
        {**dataclasses.asdict(KERNEL), **EXTRA, **TRADEOFF, "data_free": False}
    )


def test_layer_sums_and_round_trip():
    a = TensorRecord(**dataclasses.asdict(KERNEL), **EXTRA)
    b = dataclasses.replace(a, name="v", kept=1, numel=8, params=5, budget=2.0, error_masked=None)
    layer = LayerReport("model.layers.0", {"w": a, "v": b}, {"tailor": 1.0}, n_tokens=7)
    assert (layer.kept, layer.numel, layer.params, layer.budget) == (4, 20, 8, 5.0)
    assert layer.error("error_compensated") == 2.0 and layer.error("error_masked") is None
    assert layer.error("target_error_final") is None  # not measured without preserve data
    back = LayerReport.from_json(json.loads(json.dumps(layer.to_json())), resumed=True)
    assert back.tensors == layer.tensors and back.resumed and back.n_tokens == 7
