"""Pico-model fixtures: tiny base / "fine-tuned" checkpoint pairs built from configs, never downloaded.

Each factory builds a model from a config (hidden 32, 2 decoder layers, vocab ~100), saves it with
``save_pretrained`` into a session tmp dir together with an offline tokenizer (WordLevel, chat template set)
and, for multi-modal models, a processor built from a tiny image processor. The "fine-tune" is a seeded
perturbation of some decoder-block linears, one norm and the projector, so deltas are non-zero inside and
outside the targets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

WORDS = (
    "the a an is are was what who where when how why which this that of in on at to for with and or not "
    "cat dog bird car tree house red blue green big small one two three image picture shows answer question "
    "describe color yes no there photo man woman sky water"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> "
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ image_marker }}"
    "{% else %}{{ c['text'] }}{% endif %} {% endfor %}{% endif %} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


@dataclass(frozen=True)
class PicoPair:
    """A saved base / fine-tuned pair and a calibration JSONL for it."""

    arch: str
    base: Path
    finetuned: Path
    calibration: Path
    model_cls: type


def build_tokenizer(extra_special: tuple[str, ...] = ()):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", *extra_special]
    vocab = {tok: i for i, tok in enumerate([*specials, *WORDS, "?", ".", ","])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.add_special_tokens({"additional_special_tokens": list(specials[4:])})
    return fast


def _template(marker: str) -> str:
    return CHAT_TEMPLATE.replace("{{ image_marker }}", marker)


def _perturb(model: torch.nn.Module, patterns: tuple[str, ...], seed: int) -> None:
    """Seeded "fine-tune": add noise to every parameter whose name contains one of ``patterns``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in patterns):
                p.add_(torch.randn(p.shape, generator=g) * 0.02)


def _write_calibration(folder: Path, records: list[dict]) -> Path:
    path = folder / "calib.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _images(folder: Path, n: int, size: int) -> list[str]:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    names = []
    for i in range(n):
        arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
        name = f"img{i}.png"
        Image.fromarray(arr).save(folder / name)
        names.append(name)
    return names


def _records(images: list[str] | None) -> list[dict]:
    recs: list[dict] = [
        {"text": "the cat is big and the dog is small ."},
        {"prompt": "what color is the car ?", "response": "the car is red ."},
        {
            "messages": [
                {"role": "user", "content": "who is there ?"},
                {"role": "assistant", "content": "a man ."},
            ]
        },
        {"prompt": "describe this", "response": "a tree and a house ."},
        {"text": "two birds in the sky over the water"},
    ]
    if images:
        recs[1]["image"] = images[0]
        recs[2]["image"] = images[1]
        recs[3]["image"] = images[0]
    return recs


def _save_pair(root: Path, arch: str, build, ft_patterns: tuple[str, ...], save_side, records) -> PicoPair:
    torch.manual_seed(0)
    model = build()
    model.eval()
    base, ft = root / "base", root / "finetuned"
    model.save_pretrained(base, safe_serialization=True)
    save_side(base)
    _perturb(model, ft_patterns, seed=1)
    model.save_pretrained(ft, safe_serialization=True)
    save_side(ft)
    return PicoPair(arch, base, ft, _write_calibration(root, records), type(model))


def _pico_llama_config(tok, **overrides):
    """The pico language model every fixture shares: hidden 32, 2 layers, 4 heads (``overrides`` adjust it)."""
    from transformers import LlamaConfig

    fields = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaConfig(**{**fields, **overrides})


def make_llama(root: Path) -> PicoPair:
    from transformers import LlamaForCausalLM

    tok = build_tokenizer()
    tok.chat_template = _template("")
    cfg = _pico_llama_config(tok, num_hidden_layers=3, num_key_value_heads=2, tie_word_embeddings=False)
    return _save_pair(
        root,
        "llama",
        lambda: LlamaForCausalLM(cfg),
        ("layers.1.", "layers.2.", "model.norm"),
        tok.save_pretrained,
        _records(None),
    )


def make_llava(root: Path) -> PicoPair:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = build_tokenizer(("<image>",))
    image_id = tok.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
        projection_dim=16,
    )
    text = _pico_llama_config(tok, num_key_value_heads=4)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_id, vision_feature_layer=-1)
    ip = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    proc = LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=_template("<image>"),
        num_additional_image_tokens=1,
    )
    tok.chat_template = proc.chat_template
    images = _images(root, 2, 20)
    return _save_pair(
        root,
        "llava",
        lambda: LlavaForConditionalGeneration(cfg),
        ("language_model.layers.0.", "language_model.layers.1.self_attn", "multi_modal_projector"),
        proc.save_pretrained,
        _records(images),
    )


def _blip_vision_qformer():
    from transformers import Blip2QFormerConfig, Blip2VisionConfig

    vision = Blip2VisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )
    qformer = Blip2QFormerConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        encoder_hidden_size=16,
        cross_attention_frequency=1,
        vocab_size=len(build_tokenizer()) + 2,
        max_position_embeddings=64,
    )
    return vision, qformer


def make_blip2(root: Path) -> PicoPair:
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
    )

    tok = build_tokenizer(("<image>",))
    vision, qformer = _blip_vision_qformer()
    text = _pico_llama_config(tok)
    cfg = Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=4,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    ip = BlipImageProcessor(size={"height": 16, "width": 16})
    tok.chat_template = _template("")
    proc = Blip2Processor(image_processor=ip, tokenizer=tok, num_query_tokens=4)
    images = _images(root, 2, 20)
    return _save_pair(
        root,
        "blip2",
        lambda: Blip2ForConditionalGeneration(cfg),
        (
            "qformer.encoder.layer.0.",
            "qformer.encoder.layer.1.crossattention",
            "language_model.model.layers.1.",
            "language_model.layers.1.",
            "language_projection",
        ),
        proc.save_pretrained,
        _records(images),
    )


def make_instructblip(root: Path) -> PicoPair:
    from transformers import (
        BlipImageProcessor,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
        InstructBlipQFormerConfig,
        InstructBlipVisionConfig,
    )

    tok = build_tokenizer(("<image>",))
    qtok = build_tokenizer()
    v, q = _blip_vision_qformer()
    vision = InstructBlipVisionConfig(
        **{
            k: v.to_dict()[k]
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "image_size",
                "patch_size",
            )
        }
    )
    qformer = InstructBlipQFormerConfig(
        **{
            k: q.to_dict()[k]
            for k in (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
                "encoder_hidden_size",
                "vocab_size",
                "cross_attention_frequency",
                "max_position_embeddings",
            )
        }
    )
    text = _pico_llama_config(tok)
    cfg = InstructBlipConfig(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=4,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    ip = BlipImageProcessor(size={"height": 16, "width": 16})
    tok.chat_template = _template("")
    proc = InstructBlipProcessor(image_processor=ip, tokenizer=tok, qformer_tokenizer=qtok, num_query_tokens=4)
    images = _images(root, 2, 20)
    return _save_pair(
        root,
        "instructblip",
        lambda: InstructBlipForConditionalGeneration(cfg),
        (
            "qformer.encoder.layer.0.",
            "qformer.encoder.layer.1.crossattention",
            "language_model.layers.0.",
            "language_model.model.layers.0.",
            "language_projection",
        ),
        proc.save_pretrained,
        _records(images),
    )


def make_qwen2vl(root: Path) -> PicoPair:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

    tok = build_tokenizer(("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"))
    ids = {
        t: tok.convert_tokens_to_ids(t)
        for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
    }
    cfg = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            depth=2,
            embed_dim=16,
            hidden_size=32,
            num_heads=2,
            mlp_ratio=2,
            patch_size=8,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    ip = Qwen2VLImageProcessor(
        patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16, max_pixels=32 * 32
    )
    # Qwen2VLProcessor cannot be built without torchvision (its video processor); the fixture saves
    # tokenizer and
    # image processor, and model-tailor falls back to them (calibration.data._TokenizerAndImages).
    tok.chat_template = _template("<|vision_start|><|image_pad|><|vision_end|>")

    def save_side(folder: Path) -> None:
        tok.save_pretrained(folder)
        ip.save_pretrained(folder)

    images = _images(root, 2, 32)
    return _save_pair(
        root,
        "qwen2vl",
        lambda: Qwen2VLForConditionalGeneration(cfg),
        ("language_model.layers.0.", "language_model.layers.1.mlp", "visual.merger"),
        save_side,
        _records(images),
    )


def make_gpt2(root: Path) -> PicoPair:
    """GPT-2 stores its linears as ``Conv1D`` with weights ``(in, out)``: the transposed path."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = build_tokenizer()
    tok.chat_template = _template("")
    cfg = GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=128, pad_token_id=tok.pad_token_id
    )
    return _save_pair(root, "gpt2", lambda: GPT2LMHeadModel(cfg), ("h.1.", "ln_f"), tok.save_pretrained, _records(None))


FACTORIES = {
    "llama": make_llama,
    "llava": make_llava,
    "blip2": make_blip2,
    "instructblip": make_instructblip,
    "qwen2vl": make_qwen2vl,
    "gpt2": make_gpt2,
}


def pytest_collection_modifyitems(config, items):
    """Every test under ``tests/e2e`` is ``slow``: ``pytest -m "not slow"`` is the quick loop while editing;
    ``make test`` (and CI) runs everything."""
    e2e = Path(__file__).parent / "e2e"
    for item in items:
        if e2e in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def pico(tmp_path_factory):
    """``pico(arch) -> PicoPair``, built once per session per architecture."""
    cache: dict[str, PicoPair] = {}

    def get(arch: str) -> PicoPair:
        if arch not in cache:
            cache[arch] = FACTORIES[arch](tmp_path_factory.mktemp(f"pico-{arch}"))
        return cache[arch]

    return get


@dataclass
class TailorCheck:
    """What :func:`tailor_and_check` verified, for architecture-specific assertions."""

    result: object
    patched: dict[str, torch.Tensor]
    base: dict[str, torch.Tensor]
    finetuned: dict[str, torch.Tensor]
    out: Path
    model_dir: Path


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from model_tailor.io.checkpoint import CheckpointReader

    reader = CheckpointReader(folder)
    return {n: reader.get(n) for n in reader.names()}


@pytest.fixture(scope="session")
def tailor_and_check(pico, tmp_path_factory):
    """``tailor_and_check(arch, **fields) -> TailorCheck``: tailor -> patch file -> apply -> load -> forward.

    Asserts the end-to-end contract shared by every architecture: the patch file round-trips, every targeted
    tensor
    keeps exactly ``density`` of its entries (sizes in the fixtures are multiples of 4, so 0.25 is exact),
    tensors
    outside the patch equal base, non-targets follow the policy, the saved model equals base + patch, loads
    with
    ``from_pretrained`` and runs a forward pass with finite logits, padding is left out of every language
    Hessian.
    """

    def run(arch: str, **fields) -> TailorCheck:
        from model_tailor.api import tailor
        from model_tailor.patch.format import load_patch

        pair = pico(arch)
        root = tmp_path_factory.mktemp(f"out-{arch}")
        out, model_dir = root / "patch.safetensors", root / "tailored"
        fields = {"density": 0.25, "block_size": 16, "samples": 16, **fields}
        result = tailor(pair.base, pair.finetuned, pair.calibration, out=out, save_model=model_dir, **fields)
        patch = load_patch(out)
        assert sorted(patch.tensors) == sorted(result.patch.tensors)
        report = json.loads((root / "patch.safetensors.report.json").read_text())
        base, ft = _state(pair.base), _state(pair.finetuned)
        patched = patch.apply_to_state_dict(base)
        saved = _state(model_dir)
        assert saved.keys() == base.keys()
        for name in base:
            torch.testing.assert_close(saved[name], patched[name], rtol=0, atol=1e-6, msg=name)
        targets = {t["name"] for t in report["plan"]["targets"]}
        assert targets, "no targets selected"
        for name in targets:
            kept = patch.tensors[name].nnz if name in patch.tensors else 0
            assert kept == base[name].numel() // 4, (name, kept)
        actions = {n["name"]: n["action"] for n in report["plan"]["non_targets"]}
        for name in base:
            if name in targets:
                continue
            expect = {"reset": base, "keep": ft}.get(actions.get(name, "reset"), base)
            if actions.get(name) == "tailor":
                continue
            if name not in actions:
                assert torch.equal(base[name], ft[name]), f"{name} changed but neither target nor non-target"
            assert torch.equal(saved[name], expect[name]), name
        language = [
            layer for layer in report["layers"] if "language" in layer["block"] or "model.layers" in layer["block"]
        ]
        for layer in language:
            assert layer["n_tokens"] == report["calibration"]["n_tokens"], layer["block"]
        model = pair.model_cls.from_pretrained(model_dir)
        model.eval()
        batch = _forward_batch(pair)
        with torch.no_grad():
            logits = model(**batch).logits
        assert torch.isfinite(logits).all()
        assert not any(p.name.startswith(".") for p in root.iterdir()), "work or temp files left behind"
        return TailorCheck(result, patched, base, ft, out, model_dir)

    return run


def _forward_batch(pair: PicoPair) -> dict[str, torch.Tensor]:
    from model_tailor.calibration.data import build_calibration

    cal = build_calibration(
        pair.calibration,
        pair.finetuned,
        samples=2,
        max_tokens=64,
        batch_size=2,
        seed=0,
        model_cls=pair.model_cls,
    )
    return cal.batches[-1].inputs


@pytest.fixture(scope="session")
def second_llama(pico, tmp_path_factory) -> Path:
    """A second fine-tune of the pico Llama's base, for multi-task runs: the base checkpoint with seeded noise on
    decoder layers 0 and 1 (the first fine-tune changes layers 1 and 2), config and tokenizer copied."""
    import shutil

    from safetensors.torch import save_file

    from model_tailor.io.checkpoint import CheckpointReader

    pair = pico("llama")
    folder = tmp_path_factory.mktemp("pico-llama-second") / "second"
    shutil.copytree(pair.base, folder)
    reader = CheckpointReader(folder)
    state = {n: reader.get(n).clone() for n in reader.names()}
    reader.close()
    g = torch.Generator().manual_seed(2)
    for name, t in state.items():
        if "layers.0." in name or "layers.1." in name:
            t.add_(torch.randn(t.shape, generator=g) * 0.02)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
