"""End to end on a pico BLIP-2: the Q-Former layers are blocks too (cross-attention fed by the vision
model)."""

from __future__ import annotations


def test_blip2_qformer_and_llm(tailor_and_check):
    check = tailor_and_check("blip2")
    report = check.result.report
    blocks = [layer.block for layer in report.layers]
    assert blocks == ["qformer.encoder.layer.0", "qformer.encoder.layer.1", "language_model.model.layers.1"]
    stats = {n: s for layer in report.layers for n, s in layer.tensors.items()}
    # cross-attention key/value read encoder_hidden_states captured from the vision model: real Hessians
    assert stats["qformer.encoder.layer.1.crossattention.attention.key.weight"].data_free is False
    assert stats["qformer.encoder.layer.0.attention.attention.query.weight"].data_free is False
    assert stats["qformer.encoder.layer.0.intermediate_query.dense.weight"].data_free is False
    assert any("text-only record(s) skipped" in w for w in report.warnings)
