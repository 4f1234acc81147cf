"""Target selection and the explicit policy for every other changed tensor."""

from __future__ import annotations

import pytest
import torch

from model_tailor.errors import NumericalError
from model_tailor.io.checkpoint import CheckpointReader
from model_tailor.pipeline.architectures import build_skeleton, checkpoint_names, discover_layout
from model_tailor.pipeline.targets import diff_checkpoints, select_targets


def _plan(pair, **kw):
    base, ft = CheckpointReader(pair.base), CheckpointReader(pair.finetuned)
    diff = diff_checkpoints(base, ft, base.names())
    model = build_skeleton(str(pair.finetuned))
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    mapping = checkpoint_names(model, names, set(base.names()))
    return diff, select_targets(model, discover_layout(model), mapping, diff, **kw)


def test_default_targets_llava(pico):
    diff, plan = _plan(pico("llava"))
    names = {t.name for t in plan.targets}
    assert names and all(n.startswith("language_model.model.layers.") and n.endswith(".weight") for n in names)
    assert all(len(t.shape) == 2 for t in plan.targets)
    # every changed tensor is either a target or a named non-target; nothing else
    assert names | {n.name for n in plan.non_targets} == set(diff.changed)
    assert plan.identical + len(diff.changed) == len(CheckpointReader(pico("llava").base).names())
    reasons = {n.name: n.reason for n in plan.non_targets}
    assert "outside the repeated blocks" in reasons["multi_modal_projector.linear_1.weight"]
    assert "not a Linear weight" in reasons["multi_modal_projector.linear_1.bias"]
    assert plan.block_order == (("model.language_model.layers", 0), ("model.language_model.layers", 1))


@pytest.mark.parametrize("policy", ["reset", "keep", "tailor"])
def test_policies(pico, policy):
    _, plan = _plan(pico("llava"), policy=policy)
    actions = {n.name: n.action for n in plan.non_targets}
    assert actions["multi_modal_projector.linear_1.weight"] == policy
    assert actions["multi_modal_projector.linear_1.bias"] == ("reset" if policy == "tailor" else policy)


def test_include_reaches_vision_blocks_and_exclude_wins(pico):
    _, plan = _plan(pico("qwen2vl"), include=("model.visual.blocks.*", "*.mlp.*"), exclude=("*down_proj*",))
    names = {t.name for t in plan.targets}
    assert all(("mlp" in n or "visual.blocks" in n) and "down_proj" not in n for n in names)


def test_blip2_targets_qformer_and_llm(pico):
    _, plan = _plan(pico("blip2"))
    lists = {t.block_list for t in plan.targets}
    assert lists == {"qformer.encoder.layer", "language_model.model.layers"}
    assert not any("vision_model" in t.name for t in plan.targets)


def test_nan_weights_are_listed(tmp_path, pico):
    from safetensors.torch import save_file

    pair = pico("llama")
    reader = CheckpointReader(pair.finetuned)
    state = {n: reader.get(n) for n in reader.names()}
    state["model.norm.weight"][0] = float("nan")
    state["lm_head.weight"][1, 1] = float("inf")
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(NumericalError, match=r"lm_head.weight \(finetuned\), model.norm.weight \(finetuned\)"):
        diff_checkpoints(CheckpointReader(pair.base), CheckpointReader(tmp_path), reader.names())
    assert torch.isnan(state["model.norm.weight"]).any()
