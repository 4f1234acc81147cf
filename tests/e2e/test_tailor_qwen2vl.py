"""End to end on a pico Qwen2-VL: multi-dimensional rotary positions captured and replayed."""

from __future__ import annotations


def test_qwen2vl(tailor_and_check):
    check = tailor_and_check("qwen2vl")
    report = check.result.report
    assert [layer.block for layer in report.layers] == [
        "model.language_model.layers.0",
        "model.language_model.layers.1",
    ]
    roles = {b["role"] for b in report.plan.block_lists}
    assert roles == {"vision", "language"}
    assert any("visual.merger" in n["name"] for n in report.plan.non_targets)
