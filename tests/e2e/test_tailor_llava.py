"""End to end on a pico LLaVA (LlavaForConditionalGeneration layout: CLIP tower, projector, Llama)."""

from __future__ import annotations


def test_llava(tailor_and_check):
    check = tailor_and_check("llava")
    report = check.result.report
    roles = {b["path"]: b["role"] for b in report.plan.block_lists}
    assert roles == {
        "model.vision_tower.encoder.layers": "vision",
        "model.language_model.layers": "language",
    }
    # checkpoint names are the legacy layout transformers 5 writes; targets use them
    assert all(t["name"].startswith("language_model.model.layers.") for t in report.plan.targets)
    projector = {n["name"]: n["action"] for n in report.plan.non_targets if "multi_modal_projector" in n["name"]}
    assert projector and set(projector.values()) == {"reset"}
    assert check.result.report.calibration["n_tokens"] > 0


def test_llava_tailor_policy_projector(tailor_and_check):
    check = tailor_and_check("llava", non_target_policy="tailor")
    free = check.result.report.data_free
    assert {n for n in free} == {
        "multi_modal_projector.linear_1.weight",
        "multi_modal_projector.linear_2.weight",
    }
    assert all(s.data_free and s.kept == s.numel // 4 for s in free.values())
