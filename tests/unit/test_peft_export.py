"""Patch -> PEFT adapter pieces on tiny tensors: the factor and SHiRA encodings are exact, and the refusals."""

from __future__ import annotations

import sys

import pytest
import torch

from model_tailor.errors import ConfigError
from model_tailor.patch.export import MissingExtraError, _lora_tensors, _selection, _shira_tensors, export_peft
from model_tailor.patch.model import TensorPatch


def _sparse(shape, keep, seed=0):
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < keep)
    return delta, TensorPatch.from_dense("w", delta)


@pytest.mark.parametrize(("shape", "keep"), [((6, 10), 0.1), ((10, 6), 0.1), ((8, 8), 1.0), ((5, 7), 0.0)])
def test_selection_factors_are_exact(shape, keep):
    delta, _ = _sparse(shape, keep)
    x, y = _selection(delta)
    assert torch.equal(x @ y, delta)  # one-hot products add exact zeros: bit for bit
    assert x.shape[1] == min(int((delta != 0).any(1).sum()), int((delta != 0).any(0).sum()))


def test_lora_tensors_sum_lowrank_and_sparse():
    delta, tp = _sparse((6, 4), 0.2)
    a, b = torch.randn(6, 2), torch.randn(2, 4)
    both = TensorPatch("w", (6, 4), tp.indices, tp.values, (a, b))
    tensors, rank = _lora_tensors("m", both, conv1d=False)
    lora_a, lora_b = tensors["base_model.model.m.lora_A.weight"], tensors["base_model.model.m.lora_B.weight"]
    assert lora_a.shape == (rank, 4) and lora_b.shape == (6, rank)
    torch.testing.assert_close(lora_b @ lora_a, delta + a @ b, rtol=0, atol=1e-6)
    stored = TensorPatch("w", (4, 6), torch.tensor([1, 9]), torch.tensor([0.5, -2.0]))  # Conv1D: (in, out)
    tensors, _ = _lora_tensors("m", stored, conv1d=True)
    product = tensors["base_model.model.m.lora_B.weight"] @ tensors["base_model.model.m.lora_A.weight"]
    assert torch.equal(product.T, stored.to_dense())


def test_shira_tensors_pad_with_zeros_to_r_times_rows_plus_cols():
    delta, tp = _sparse((6, 10), 0.1)
    tensors = _shira_tensors("m", tp, r=2)
    idx, val = tensors["base_model.model.m.shira_indices"], tensors["base_model.model.m.shira_weight"]
    assert idx.shape == (2, 32) and val.shape == (32,) and idx.dtype == torch.int32
    assert len({(int(r), int(c)) for r, c in idx.T}) == 32  # distinct positions
    rebuilt = torch.zeros(6, 10)
    rebuilt[idx[0].long(), idx[1].long()] = val
    assert torch.equal(rebuilt, delta)


def test_missing_peft_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'model-tailor\[peft\]'"):
        export_peft(tmp_path / "p.safetensors", tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_peft_type(tmp_path):
    with pytest.raises(ConfigError, match="--peft-type must be one of auto, lora, shira"):
        export_peft(tmp_path / "p.safetensors", tmp_path, tmp_path / "out", peft_type="ia3")


def test_tied_tensor_cannot_be_an_adapter_module(pico, tmp_path):
    pytest.importorskip("peft")
    from model_tailor.io.checkpoint import CheckpointReader
    from model_tailor.patch.fingerprint import fingerprint
    from model_tailor.patch.format import save_patch
    from model_tailor.patch.model import PatchMetadata, SparsePatch

    base_dir = pico("gpt2").base
    base = CheckpointReader(base_dir)
    name = "transformer.wte.weight"  # GPT-2 ties lm_head.weight to it
    tp = TensorPatch("transformer.wte.weight", base.shape(name), torch.tensor([0, 5]), torch.tensor([1.0, 2.0]))
    save_patch(SparsePatch({name: tp}, PatchMetadata(base_fingerprint=fingerprint(base))), tmp_path / "p.safetensors")
    with pytest.raises(ConfigError, match=r"'transformer.wte.weight' is tied to .*lm_head.weight"):
        export_peft(tmp_path / "p.safetensors", base_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
