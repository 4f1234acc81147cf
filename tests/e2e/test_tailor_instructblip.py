"""End to end on a pico InstructBLIP: instruction-aware Q-Former (queries + text) and the LLM."""

from __future__ import annotations


def test_instructblip_qformer_and_llm(tailor_and_check):
    check = tailor_and_check("instructblip")
    report = check.result.report
    blocks = [layer.block for layer in report.layers]
    assert blocks == ["qformer.encoder.layer.0", "qformer.encoder.layer.1", "language_model.model.layers.0"]
    stats = {n: s for layer in report.layers for n, s in layer.tensors.items()}
    # with instruction text in the Q-Former, the text-path FFN receives tokens too
    assert stats["qformer.encoder.layer.0.intermediate.dense.weight"].data_free is False
    assert stats["qformer.encoder.layer.1.crossattention.attention.value.weight"].data_free is False


def test_instructblip_bfloat16_forward_and_global_granularity(pico):
    """bf16 block forwards (meta dtypes follow, so pixel casts agree); one global threshold."""
    from model_tailor.api import tailor

    pair = pico("instructblip")
    res = tailor(pair.base, pair.finetuned, pair.calibration, dtype="bfloat16", granularity="global", density=0.25)
    targets = {t["name"] for t in res.report.plan.targets}
    kept = sum(tp.nnz for name, tp in res.patch.tensors.items() if name in targets)
    assert kept == res.report.numel // 4
