"""A PEFT LoRA adapter folder read as the fine-tuned model (no peft import): hand-written adapters on pico
models, fine-tuned weights known in closed form (``W + scale * B @ A``), and every refusal by name."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from model_tailor.errors import CheckpointError, ShapeMismatchError
from model_tailor.io.checkpoint import CheckpointReader
from model_tailor.io.peft_adapter import AdapterReader, open_finetuned

Q0 = "model.layers.0.self_attn.q_proj"  # (32, 32)
D1 = "model.layers.1.mlp.down_proj"  # (32, 64)


def _write(folder, tensors, **config):
    folder.mkdir()
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "down_proj"], **config}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def _factors(module, r, out_f, in_f, seed):
    g = torch.Generator().manual_seed(seed)
    key = f"base_model.model.{module}"
    return {
        f"{key}.lora_A.weight": torch.randn(r, in_f, generator=g),
        f"{key}.lora_B.weight": torch.randn(out_f, r, generator=g),
    }


@pytest.fixture
def llama(pico):
    return pico("llama")


def _expect(base, tensors, module, scale, transpose=False):
    a = tensors[f"base_model.model.{module}.lora_A.weight"]
    b = tensors[f"base_model.model.{module}.lora_B.weight"]
    delta = torch.einsum("or,ri->oi", b, a) * scale
    return base.get(f"{module}.weight") + (delta.T if transpose else delta)


def test_scale_rank_and_alpha_patterns(llama, tmp_path):
    tensors = {**_factors(Q0, 2, 32, 32, 0), **_factors(D1, 3, 32, 64, 1)}
    folder = _write(
        tmp_path / "ad", tensors, rank_pattern={"down_proj": 3}, alpha_pattern={"layers.1.mlp.down_proj": 6}
    )
    base = CheckpointReader(llama.base)
    reader = open_finetuned(folder, base)
    assert isinstance(reader, AdapterReader)
    assert reader.target_names() == [f"{Q0}.weight", f"{D1}.weight"]
    torch.testing.assert_close(reader.get(f"{Q0}.weight"), _expect(base, tensors, Q0, 4 / 2))
    torch.testing.assert_close(reader.get(f"{D1}.weight"), _expect(base, tensors, D1, 6 / 3))
    untouched = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(reader.get(untouched), base.get(untouched))
    assert reader.names() == base.names()


def test_rslora_scale(llama, tmp_path):
    tensors = _factors(Q0, 4, 32, 32, 2)
    folder = _write(tmp_path / "ad", tensors, r=4, lora_alpha=8, use_rslora=True)
    base = CheckpointReader(llama.base)
    reader = AdapterReader(folder, base)
    torch.testing.assert_close(reader.get(f"{Q0}.weight"), _expect(base, tensors, Q0, 8 / math.sqrt(4)))


def test_modules_to_save_read_whole(llama, tmp_path):
    norm = torch.full((32,), 3.0)
    folder = _write(tmp_path / "ad", {**_factors(Q0, 2, 32, 32, 0), "base_model.model.model.norm.weight": norm})
    reader = AdapterReader(folder, CheckpointReader(llama.base))
    assert torch.equal(reader.get("model.norm.weight"), norm)
    assert reader.saved == {"model.norm.weight": "base_model.model.model.norm.weight"}
    assert reader.restrict_include(()) == (f"{Q0}.weight",)
    assert reader.restrict_include(("*down_proj*",)) == ("",)  # narrowed to nothing: matches no tensor


def test_fan_in_fan_out_conv1d(pico, tmp_path):
    pair = pico("gpt2")
    base = CheckpointReader(pair.base)
    name = next(n for n in base.names() if n.endswith("h.0.attn.c_attn.weight"))
    module = name.removesuffix(".weight")
    in_f, out_f = base.shape(name)  # Conv1D stores (in, out)
    tensors = _factors(module, 2, out_f, in_f, 3)
    folder = _write(tmp_path / "ad", tensors, target_modules=["c_attn"], fan_in_fan_out=True)
    reader = AdapterReader(folder, base)
    torch.testing.assert_close(reader.get(name), _expect(base, tensors, module, 2.0, transpose=True))


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"use_dora": True}, "use_dora"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
        ({"peft_type": "IA3"}, "'IA3' is not supported"),
        ({"r": 0}, "r must be a positive number"),
    ],
)
def test_unsupported_options_are_named(llama, tmp_path, config, needle):
    folder = _write(tmp_path / "ad", _factors(Q0, 2, 32, 32, 0), **config)
    with pytest.raises(CheckpointError, match=needle):
        AdapterReader(folder, CheckpointReader(llama.base))


def test_corrupt_config(llama, tmp_path):
    folder = _write(tmp_path / "ad", _factors(Q0, 2, 32, 32, 0))
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        AdapterReader(folder, CheckpointReader(llama.base))


def test_names_for_another_base_are_listed(llama, tmp_path):
    tensors = {**_factors(Q0, 2, 32, 32, 0), **_factors("model.layers.9.self_attn.q_proj", 2, 32, 32, 1)}
    tensors["base_model.model.model.extra.weight"] = torch.ones(3)
    folder = _write(tmp_path / "ad", tensors)
    with pytest.raises(CheckpointError, match=r"model\.extra\.weight, .*layers\.9\.self_attn\.q_proj\.lora_A\.weight"):
        AdapterReader(folder, CheckpointReader(llama.base))


def test_shapes_for_another_base(llama, tmp_path):
    folder = _write(tmp_path / "ad", _factors(Q0, 2, 48, 32, 0))
    with pytest.raises(ShapeMismatchError, match=r"q_proj\.weight \(B @ A \[48, 32\] vs base \[32, 32\]\)"):
        AdapterReader(folder, CheckpointReader(llama.base))


def test_missing_weights(llama, tmp_path):
    folder = _write(tmp_path / "ad", _factors(Q0, 2, 32, 32, 0))
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="adapter_model.safetensors is missing"):
        AdapterReader(folder, CheckpointReader(llama.base))
