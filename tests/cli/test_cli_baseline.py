"""`model-tailor baseline` on hand-made fp32 checkpoints whose values are exact in binary (multiples of 1/4), so
every merged tensor has a known answer; errors are one stderr line, a non-zero exit and nothing at --out."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from model_tailor.cli import main
from model_tailor.io.checkpoint import CheckpointReader

L0, L1, L2 = (f"model.layers.{i}.mlp.up_proj.weight" for i in range(3))
EMB = "model.embed_tokens.weight"


def _save(folder, tensors):
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")


@pytest.fixture
def pair(tmp_path):
    base = {n: torch.full((2, 2), 1.0) for n in (L0, L1, L2, EMB)}
    base[L0] = torch.tensor([[1.0, 2.0], [4.0, 1.0]])  # mean |W_pre| = 2
    # layers 0 and 1 and the embedding are tuned; layer 2 is not
    delta = {L0: torch.tensor([[0.25, -2.0], [0.5, 0.0]]), L1: torch.full((2, 2), 0.5), EMB: torch.full((2, 2), 0.75)}
    ft = {n: base[n] + delta.get(n, torch.zeros(2, 2)) for n in base}
    _save(tmp_path / "base", base)
    _save(tmp_path / "ft", ft)
    return tmp_path, base, ft


def _run(tmp_path, *extra):
    out = tmp_path / "out"
    code = main(
        ["baseline", "--base", str(tmp_path / "base"), "--finetuned", str(tmp_path / "ft"), "--out", str(out), *extra]
    )
    return code, out


def _read(out):
    with CheckpointReader(out) as r:
        return {n: r.get(n).clone() for n in r.names()}


def test_revert_first_k_resets_the_shallowest_tuned_layer_only(pair):
    tmp_path, base, ft = pair
    code, out = _run(tmp_path, "--method", "revert_first_k", "--k", "1")
    assert code == 0
    got = _read(out)
    assert torch.equal(got[L0], base[L0])  # layer 0: the shallowest tuned layer, reverted
    assert torch.equal(got[L1], ft[L1])  # layer 1 keeps its delta
    assert torch.equal(got[EMB], ft[EMB])  # outside the numbered blocks: kept


def test_lines_scales_the_delta_linearly_with_depth(pair):
    tmp_path, base, ft = pair
    code, out = _run(tmp_path, "--method", "lines", "--alpha", "0", "--beta", "1")
    assert code == 0
    got = _read(out)
    # three numbered blocks: scales 0, 1/2, 1 for layers 0, 1, 2
    assert torch.equal(got[L0], base[L0])
    assert torch.equal(got[L1], base[L1] + 0.25)
    assert torch.equal(got[L2], base[L2])  # untuned: copied
    assert torch.equal(got[EMB], ft[EMB])  # outside the blocks: whole delta


def test_fapm_keeps_the_top_entry_by_penalised_magnitude(pair):
    tmp_path, base, ft = pair
    code, out = _run(tmp_path, "--method", "fapm", "--density", "0.25")
    assert code == 0
    got = _read(out)
    # L0 scores |d| - mean|W_pre| * |d| / |W_pre| with mean |W_pre| = 2:
    #   (0,0) 0.25 - 2*0.25/1 = -0.25   (0,1) 2 - 2*2/2 = 0   (1,0) 0.5 - 2*0.5/4 = 0.25   (1,1) 0
    # so FAPM keeps (1,0), where magnitude would keep (0,1)
    expected = base[L0].clone()
    expected[1, 0] = ft[L0][1, 0]
    assert torch.equal(got[L0], expected)


def test_revert_first_k_without_k_is_one_line_and_writes_nothing(pair, capsys):
    tmp_path, _, _ = pair
    code, out = _run(tmp_path, "--method", "revert_first_k")
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "needs k" in err[0]
    assert not out.exists()
