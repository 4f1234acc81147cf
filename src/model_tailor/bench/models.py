"""TailorBench models: a mini-LLaVA (SmolLM2 + CLIP-style tower + projector), its stage 1 and its fine-tune.

The pre-trained MLLM follows LLaVA's recipe at toy scale: stage 1 keeps the language model frozen, first
teaching the vision tower the images (colour and shape heads on its patch features), then aligning the
projector so the frozen LM captions them through its chat template. The fine-tuned MLLM then trains the
last ``tune_last`` decoder layers and the projector on easy-VQA (LLaVA-1.5's "tune12layers", docs/METHOD.md §18),
which makes it forget captioning and world knowledge. Both are saved as HF folders (safetensors, tokenizer,
processor) under a cache key derived from the whole build config, so quick and full runs share them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from model_tailor.bench import assets
from model_tailor.bench.data import (
    Example,
    PixelCache,
    caption_examples,
    collate_train,
    sample,
    vqa_examples,
    write_calibration,
)

log = logging.getLogger(__name__)

BUILD_VERSION = 1


@dataclass(frozen=True)
class BuildConfig:
    """Everything that determines the two models; its hash names the cache folder."""

    lm: str = "smollm2"  # "smollm2" (real weights from the GGUF) or "tiny" (random, for CI)
    tiny_lm: dict = field(
        default_factory=lambda: {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        }
    )
    vision_hidden: int = 192
    vision_layers: int = 4
    vision_heads: int = 3
    image_size: int = 64
    patch_size: int = 16
    tune_last: int = 12  # decoder layers 18-29 of SmolLM2's 30; 0 = every layer (``all_layers``)
    vision_steps: int = 300
    vision_batch: int = 32
    vision_lr: float = 1e-3
    align_steps: int = 50  # 100 until cold `make demo` had to fit 15 min; 50 captions as well (quick: 0.42 vs 0.33)
    align_batch: int = 8
    align_lr: float = 1e-3
    ft_steps: int = 80  # 120 before; 80 still forgets (quick retention 0.24) and fits easy-VQA (0.78 vs 0.73)
    ft_batch: int = 8
    ft_lr: float = 1e-4  # LLaVA-1.5 recipe (docs/METHOD.md §18)
    ft_projector_lr: float = 2e-4
    calibration_samples: int = 128
    seed: int = 0
    # The fine-tune's own seed: its draw of training examples and of each step's batch (full, LoRA and rehearsal
    # fine-tunes alike); the pre-trained model and the calibration set stay those of ``seed``. A second value
    # measures a row on another fine-tune of the same model. 0 is what every earlier build used, and is left out
    # of the key, so their caches stay valid.
    ft_seed: int = 0

    def tuned_layers(self, num_layers: int) -> tuple[int, ...]:
        """Indices of the decoder layers the fine-tune trains: the last ``tune_last``, or all when it is 0."""
        n = num_layers if self.tune_last == 0 else min(self.tune_last, num_layers)
        return tuple(range(num_layers - n, num_layers))

    def all_layers(self) -> BuildConfig:
        """The second fine-tuned pair: every decoder layer and the projector tuned, all else unchanged (the
        pre-trained model is shared: ``stage1_key`` ignores the fine-tune fields)."""
        return replace(self, tune_last=0)

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def key(self) -> str:
        """Hash of the whole build (names the fine-tuned model, calibration set and evaluations)."""
        fields = asdict(self)
        if fields["ft_seed"] == 0:  # the field is newer than the cached builds, which all had 0
            del fields["ft_seed"]
        blob = json.dumps({"v": BUILD_VERSION, **fields}, sort_keys=True)
        return f"{self.lm}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    @property
    def ft_draw_seed(self) -> int:
        """The seed of the fine-tune's draws: ``seed`` itself for ``ft_seed`` 0 (every earlier build)."""
        return self.seed + 1000 * self.ft_seed

    def stage1_key(self) -> str:
        """Hash of the fields stage 1 depends on, so changing the fine-tune recipe reuses the base model."""
        fields = {k: v for k, v in asdict(self).items() if not k.startswith(("ft_", "tune_", "calibration_"))}
        blob = json.dumps({"v": BUILD_VERSION, **fields}, sort_keys=True)
        return f"{self.lm}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    @classmethod
    def tiny(cls) -> BuildConfig:
        """A seconds-scale build for the CI smoke test (random LM, small tower, a few steps)."""
        return cls(
            lm="tiny",
            vision_hidden=32,
            vision_layers=1,
            vision_heads=2,
            tune_last=2,
            vision_steps=5,
            vision_batch=16,
            align_steps=4,
            align_batch=4,
            ft_steps=6,
            ft_batch=4,
            ft_lr=1e-3,
            ft_projector_lr=1e-3,
            calibration_samples=8,
        )


@dataclass(frozen=True)
class BuiltModels:
    """Paths of the cached models and calibration data, and the seconds each stage took when built."""

    root: Path
    pretrained: Path
    finetuned: Path
    calibration: Path
    tuned_layers: tuple[int, ...]
    seconds: dict


def _lm_and_tokenizer(cfg: BuildConfig) -> tuple[torch.nn.Module, object]:
    if cfg.lm == "smollm2":
        return assets.load_smollm2()
    if cfg.lm != "tiny":
        raise ValueError(f"unknown bench lm {cfg.lm!r}")
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = assets.load_smollm2_tokenizer()
    tiny = LlamaConfig(
        vocab_size=len(tok),
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **cfg.tiny_lm,
    )
    return LlamaForCausalLM(tiny).eval(), tok


# SmolLM2's own template, extended to LLaVA-style list content ({"type": "image"} -> "<image>\n"), so the
# processor renders {"image", "text"} messages exactly as the bench renders "<image>\n" + text strings.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_llava(cfg: BuildConfig) -> tuple[torch.nn.Module, object]:
    """Untrained LLaVA-layout model (seeded) around the LM, and its ``LlavaProcessor``."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    torch.manual_seed(cfg.seed)
    lm, tok = _lm_and_tokenizer(cfg)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.padding_side = "left"
    tok.chat_template = CHAT_TEMPLATE
    lm.resize_token_embeddings(len(tok), mean_resizing=False)
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=4 * cfg.vision_hidden,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.vision_hidden,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=lm.config,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=cfg.image_tokens,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.tie_weights()
    size = {"height": cfg.image_size, "width": cfg.image_size}
    image_processor = CLIPImageProcessor(size=size, crop_size=size, do_center_crop=False)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    return model.eval(), processor


def response_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy on the response tokens only; the LM head runs just there (the vocabulary is 49k)."""
    labels = batch["labels"]
    hidden = model.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch.get("pixel_values")
    ).last_hidden_state
    keep = labels[:, 1:] != -100
    logits = model.lm_head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), labels[:, 1:][keep])


def _schedule(step: int, total: int) -> float:
    warm = max(1, round(0.05 * total))
    return (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def train_steps(
    model,
    params_groups,
    examples: list[Example],
    steps: int,
    batch: int,
    cfg: BuildConfig,
    processor,
    pixels: PixelCache,
    device: str,
    desc: str,
    mix: Callable[[int, list[Example]], list[Example]] | None = None,
    draw_seed: int | None = None,
) -> float:
    """AdamW on the response loss, warm-up + cosine; one seeded draw per step (from ``draw_seed``, default
    ``cfg.seed``). ``mix(step, batch)`` may swap a step's batch (rehearsal, ``bench.retrain``): every other step
    gets the batch it gets without ``mix``."""
    opt = torch.optim.AdamW(params_groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, steps))
    rng = torch.Generator().manual_seed((cfg.seed if draw_seed is None else draw_seed) + 1)
    model.train()
    loss_avg = float("nan")
    with tqdm(range(steps), desc=desc, unit="step", leave=False) as bar:
        for step in bar:
            idx = torch.randint(len(examples), (batch,), generator=rng).tolist()
            drawn = [examples[i] for i in idx]
            drawn = drawn if mix is None else mix(step, drawn)
            data = collate_train(processor.tokenizer, drawn, pixels, cfg.image_tokens)
            loss = response_loss(model, {k: v.to(device) for k, v in data.items()})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_avg = loss.item() if math.isnan(loss_avg) else 0.9 * loss_avg + 0.1 * loss.item()
            bar.set_postfix(loss=f"{loss_avg:.3f}")
    model.eval()
    log.info("%s: final smoothed loss %.4f", desc, loss_avg)
    return loss_avg


def _set_trainable(model: torch.nn.Module, prefixes: tuple[str, ...]) -> list[torch.nn.Parameter]:
    out = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
        if p.requires_grad:
            out.append(p)
    return out


def train_vision_tower(model, labels, pixels: PixelCache, cfg: BuildConfig, device: str) -> float:
    """Stage 1a: colour and shape heads on the tower's mean patch feature (the heads are then dropped)."""
    tower = model.model.vision_tower
    heads = torch.nn.Linear(cfg.vision_hidden, len(assets.COLORS) + len(assets.SHAPES)).to(device)
    params = [*tower.parameters(), *heads.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.vision_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, cfg.vision_steps))
    rng = torch.Generator().manual_seed(cfg.seed + 2)
    color = torch.tensor([assets.COLORS.index(lab.color) for lab in labels])
    shape = torch.tensor([assets.SHAPES.index(lab.shape) for lab in labels])
    tower.train()
    acc = 0.0
    with tqdm(range(cfg.vision_steps), desc="stage 1a: vision tower", unit="step", leave=False) as bar:
        for _ in bar:
            idx = torch.randint(len(labels), (cfg.vision_batch,), generator=rng)
            px = pixels.get([labels[i].image for i in idx.tolist()]).to(device)
            feats = tower(pixel_values=px).last_hidden_state[:, 1:].mean(dim=1)
            out = heads(feats)
            c, s = color[idx].to(device), shape[idx].to(device)
            nc = len(assets.COLORS)
            loss = torch.nn.functional.cross_entropy(out[:, :nc], c) + torch.nn.functional.cross_entropy(out[:, nc:], s)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            hit = (out[:, :nc].argmax(-1) == c) & (out[:, nc:].argmax(-1) == s)
            acc = 0.9 * acc + 0.1 * hit.float().mean().item()
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}")
    tower.eval()
    log.info("stage 1a: running train accuracy %.3f", acc)
    return acc


def save_folder(model, processor, out: Path, meta: dict) -> None:
    """``save_pretrained`` of the model (or a PEFT adapter), the processor and ``tailorbench.json``, renamed in."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "tailorbench.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def load_model(path: Path, device: str = "cpu") -> tuple[torch.nn.Module, object]:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32, trust_remote_code=False)
    model = model.to(device).eval()
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=False)
    processor.tokenizer.padding_side = "left"
    return model, processor


def _build_stage1(cfg: BuildConfig, pre_dir: Path, labels: list, device: str) -> float:
    """Stage 1 (vision tower, then projector alignment with the LM frozen); saves the pre-trained model."""
    t0 = time.perf_counter()
    model, processor = build_llava(cfg)
    model.to(device)
    pixels = PixelCache(processor.image_processor)
    acc = train_vision_tower(model, labels, pixels, cfg, device)
    params = [{"params": _set_trainable(model, ("model.multi_modal_projector.",)), "lr": cfg.align_lr}]
    examples = caption_examples(labels)
    args = (cfg.align_steps, cfg.align_batch, cfg, processor, pixels, device, "stage 1b: projector alignment")
    loss = train_steps(model, params, examples, *args)
    seconds = time.perf_counter() - t0
    meta = {"build": asdict(cfg), "stage": "pretrained", "vision_acc": acc, "align_loss": loss, "seconds": seconds}
    save_folder(model, processor, pre_dir, meta)
    return seconds


def finetune_examples(cfg: BuildConfig, train_items: list) -> list[Example]:
    """The fine-tune's easy-VQA draw (every fine-tune of a build, full, LoRA or rehearsal, trains on it)."""
    return vqa_examples(sample(train_items, cfg.ft_steps * cfg.ft_batch * 4, cfg.ft_draw_seed + 3))


def build_finetune(
    cfg: BuildConfig,
    pre_dir: Path,
    ft_dir: Path,
    train_items: list,
    device: str,
    mix=None,
    meta: dict | None = None,
    examples: list[Example] | None = None,
    desc: str = "fine-tune: easy-VQA",
) -> float:
    """The fine-tune: the tuned layers (``BuildConfig.tuned_layers``) and the projector on easy-VQA; ``mix`` and
    ``meta`` as the rehearsal fine-tunes pass them (``bench.retrain``). ``examples`` replaces the easy-VQA draw
    (the multitask pair's second fine-tune: the same recipe on another task's data)."""
    t0 = time.perf_counter()
    model, processor = load_model(pre_dir, device)
    tuned = cfg.tuned_layers(model.config.text_config.num_hidden_layers)
    layer_params = _set_trainable(model, tuple(f"model.language_model.layers.{i}." for i in tuned))
    proj_params = [p for n, p in model.named_parameters() if n.startswith("model.multi_modal_projector.")]
    for p in proj_params:
        p.requires_grad_(True)
    groups = [{"params": layer_params, "lr": cfg.ft_lr}, {"params": proj_params, "lr": cfg.ft_projector_lr}]
    pixels = PixelCache(processor.image_processor)
    args = (cfg.ft_steps, cfg.ft_batch, cfg, processor, pixels, device, desc)
    drawn = finetune_examples(cfg, train_items) if examples is None else examples
    loss = train_steps(model, groups, drawn, *args, mix=mix, draw_seed=cfg.ft_draw_seed)
    seconds = time.perf_counter() - t0
    info = {"build": asdict(cfg), "stage": "finetuned", "ft_loss": loss, "seconds": seconds, **(meta or {})}
    save_folder(model, processor, ft_dir, info)
    return seconds


def build_models(cfg: BuildConfig, cache_root: Path, device: str = "cpu") -> BuiltModels:
    """Build (or reuse) pre-trained and fine-tuned mini-LLaVAs and the calibration set under the cache."""
    stage1_root = cache_root / "tailorbench" / f"stage1-{cfg.stage1_key()}"
    root = cache_root / "tailorbench" / cfg.key()
    root.mkdir(parents=True, exist_ok=True)
    stage1_root.mkdir(parents=True, exist_ok=True)
    pre_dir, ft_dir, calib_dir = stage1_root / "pretrained", root / "finetuned", root / "calibration"
    seconds = {}
    train_items = assets.load_vqa("train")
    if not (pre_dir / "config.json").exists():
        seconds["stage1"] = _build_stage1(cfg, pre_dir, assets.image_labels(train_items), device)
    if not (ft_dir / "config.json").exists():
        seconds["finetune"] = build_finetune(cfg, pre_dir, ft_dir, train_items, device)
    if not (calib_dir / "calibration.jsonl").exists():
        # Calibration comes from the TRAIN split, disjoint from the fine-tuning draw's seed stream.
        write_calibration(sample(train_items, cfg.calibration_samples, cfg.seed + 4), calib_dir)
    n_layers = json.loads((pre_dir / "config.json").read_text())["text_config"]["num_hidden_layers"]
    for key, folder in (("stage1", pre_dir), ("finetune", ft_dir)):  # cached runs report the build times
        if key not in seconds and (folder / "tailorbench.json").exists():
            seconds[key] = json.loads((folder / "tailorbench.json").read_text()).get("seconds", 0.0)
    return BuiltModels(root, pre_dir, ft_dir, calib_dir / "calibration.jsonl", cfg.tuned_layers(n_layers), seconds)
