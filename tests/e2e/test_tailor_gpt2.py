"""End to end on a pico GPT-2: Conv1D weights are stored (in, out) and transposed around the kernel."""

from __future__ import annotations


def test_gpt2_conv1d(tailor_and_check):
    check = tailor_and_check("gpt2")
    report = check.result.report
    targets = {t["name"]: t for t in report.plan.targets}
    assert targets["transformer.h.1.attn.c_attn.weight"]["transposed"] is True
    assert targets["transformer.h.1.attn.c_attn.weight"]["shape"] == [32, 96]  # (in, out)
    assert [layer.block for layer in report.layers] == ["transformer.h.1"]
    # c_attn and mlp.c_fc read the same input as nothing else; c_attn's Hessian is (in, in) = 32 x 32
    stats = report.layers[0].tensors["transformer.h.1.attn.c_attn.weight"]
    assert stats.data_free is False and stats.numel == 32 * 96
