"""The bench's retraining anchors (bench.retrain): rehearsal batch mixing, LoRA settings and their PEFT config,
and batches that mix text-only and image records."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model_tailor.bench import retrain as R
from model_tailor.bench.data import Example, collate_train
from model_tailor.bench.models import BuildConfig


@pytest.mark.parametrize(("steps", "share", "want"), [(80, 0.25, 20), (80, 0.5, 40), (6, 0.25, 2), (7, 0.5, 4)])
def test_rehearsal_plan_has_exactly_the_share_of_batches(steps, share, want):
    plan = R.rehearsal_plan(steps, share, seed=6)
    assert len(plan) == steps and sum(plan) == want  # round(share * steps), halves up (1.5 -> 2, 3.5 -> 4)
    assert R.rehearsal_plan(steps, share, seed=6) == plan  # deterministic with the seed


def test_rehearsal_plan_positions_follow_the_seed_and_the_ends_are_exact():
    plans = {R.rehearsal_plan(80, 0.25, seed) for seed in range(5)}
    assert len(plans) == 5  # different seeds, different steps (same count)
    assert R.rehearsal_plan(10, 0.0, 0) == (False,) * 10 and R.rehearsal_plan(10, 1.0, 0) == (True,) * 10
    with pytest.raises(ValueError, match="share"):
        R.rehearsal_plan(10, 1.5, 0)


def test_rehearsal_mix_swaps_exactly_the_planned_batches():
    pool = [Example(f"preserve {i}", None, "x") for i in range(5)]
    plan = R.rehearsal_plan(12, 0.25, seed=1)
    batches = [[Example(f"vqa {s}.{j}", None, "y") for j in range(4)] for s in range(12)]

    def run(seed):
        mix = R.RehearsalMix(pool, plan, seed)
        return [mix(step, drawn) for step, drawn in enumerate(batches)]

    out = run(8)
    for step, (got, drawn) in enumerate(zip(out, batches, strict=True)):
        if plan[step]:
            assert len(got) == 4 and all(ex in pool for ex in got)
        else:
            assert got is drawn  # the fine-tune's own batch, untouched
    assert sum(got is not drawn for got, drawn in zip(out, batches, strict=True)) == sum(plan) == 3
    assert run(8) == out  # deterministic with the seed
    assert any(a != b for a, b in zip(run(9), out, strict=True))
    with pytest.raises(ValueError):
        R.RehearsalMix([], plan, 0)


def test_lora_settings_follow_the_build():
    cfg = BuildConfig()
    s = R.LoraSettings.for_build(cfg, 16)
    assert (s.rank, s.lora_alpha, s.dropout, s.projector) == (16, 32, 0.0, "modules_to_save")
    assert s.lr == pytest.approx(R.LORA_LR_RATIO * cfg.ft_lr) == pytest.approx(1e-3)
    assert s.projector_lr == cfg.ft_projector_lr and s.method == "lora_r16"
    assert R.LoraSettings(**s.params()) == s  # the row's params rebuild the settings
    assert R.LoraSettings.for_build(cfg, 64).lora_alpha == 128
    assert R.is_lora("lora_r64") and not R.is_lora("lora_r16+mt") and R.is_rehearsal(R.rehearsal_method(0.5))
    assert R.rehearsal_method(0.5) == "rehearsal_0.50" and not R.is_retrain("finetuned")


def test_lora_config_targets_the_tuned_layers_linears_and_saves_the_projector(pico):
    peft = pytest.importorskip("peft")
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(pico("llava").base)
    cfg = R.lora_config(R.LoraSettings(rank=4, lora_alpha=8, lr=1e-3, projector_lr=2e-4), (1,))
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.modules_to_save) == (4, 8, 0.0, ["multi_modal_projector"])
    pm = peft.get_peft_model(model, cfg)
    lora = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_A")}
    layer = "model.language_model.layers.1."
    want = {layer + m for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")}
    want |= {layer + m for m in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert lora == want  # not layer 0, not the vision tower's attention, not the LM head
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert all(".lora_" in n or "multi_modal_projector.modules_to_save" in n for n in trainable)
    assert sum("modules_to_save" in n for n in trainable) == 4  # the projector's two linears, weights and biases
    with pytest.raises(ValueError, match="projector"):
        R.lora_config(R.LoraSettings(4, 8, 1e-3, 2e-4, projector="lora"), (1,))


class _Tokenizer:
    eos_token, pad_token_id = "$", 0

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return "U:" + messages[0]["content"] + "A:"

    def __call__(self, text, add_special_tokens):
        return {"input_ids": [ord(c) for c in text]}


class _Pixels:
    def get(self, paths):
        return torch.stack([torch.full((3, 2, 2), float(len(str(p)))) for p in paths])


def test_collate_train_mixes_text_only_and_image_records():
    batch = [Example("q", Path("a.png"), "r"), Example("capital?", None, "Paris"), Example("q", Path("bb.png"), "r")]
    out = collate_train(_Tokenizer(), batch, _Pixels(), image_tokens=2)
    assert out["pixel_values"].shape[0] == 2  # one per record with an image, in batch order
    assert out["pixel_values"][:, 0, 0, 0].tolist() == [5.0, 6.0]
    assert "pixel_values" not in collate_train(_Tokenizer(), batch[1:2], _Pixels(), image_tokens=2)
    labels = out["labels"][1]
    assert [chr(t) for t in labels[labels != -100].tolist()] == list("Paris$")  # response + end of turn only
