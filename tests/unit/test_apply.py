"""Streaming apply/remove on checkpoints: exact bf16 round trips, sharded inputs, provenance, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from model_tailor.errors import CheckpointError, ConfigError, NumericalError, PatchFormatError
from model_tailor.io.checkpoint import CheckpointReader
from model_tailor.patch.apply import PROVENANCE_NAME, apply_patches, remove_patches
from model_tailor.patch.combine import combine_patches
from model_tailor.patch.fingerprint import fingerprint
from model_tailor.patch.format import load_patch, save_patch
from model_tailor.patch.model import PatchMetadata, SparsePatch, TensorPatch, dtype_name

TARGETS = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"]


def _models(dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {name: torch.randn(6, 4, generator=g).to(dtype) for name in TARGETS}
    base["model.norm.weight"] = torch.ones(4, dtype=dtype)
    base["model.embed_tokens.weight"] = torch.randn(10, 4, generator=g).to(dtype)
    ft = {n: (t.float() + 0.05 * torch.randn(t.shape, generator=g)).to(dtype) for n, t in base.items()}
    return base, ft


def _write_sharded(folder, tensors, *, shards=2):
    """A hand-written multi-shard HF checkpoint (index.json + shards) plus config and tokenizer files."""
    folder.mkdir(parents=True)
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, str(folder / shard))
        weight_map.update(dict.fromkeys(part, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "tokenizer.json").write_text("{}")
    return folder


def _full_patch(base, ft, names=TARGETS, *, mask_seed=None) -> SparsePatch:
    tensors = {}
    for n in names:
        keep = None
        if mask_seed is not None:
            g = torch.Generator().manual_seed(mask_seed)
            keep = torch.rand(base[n].shape, generator=g) < 0.5
            tailored = torch.where(keep, ft[n], base[n])
        else:
            tailored = ft[n]
        tensors[n] = TensorPatch.from_weights(n, base[n], tailored, keep)
    meta = PatchMetadata(
        base_dtypes={n: dtype_name(base[n].dtype) for n in names},
        base_fingerprint=fingerprint(base, content_names=names),
        config={"density": 1.0},
    )
    return SparsePatch(tensors, meta)


@pytest.fixture
def bf16_setup(tmp_path):
    base, ft = _models()
    base_dir = _write_sharded(tmp_path / "base", base)
    patch_file = save_patch(_full_patch(base, ft), tmp_path / "patch.safetensors")
    return base, ft, base_dir, patch_file


def _read(folder):
    with CheckpointReader(folder) as reader:
        return {n: reader.get(n) for n in reader.names()}


def test_full_patch_gives_finetuned_exactly_and_remove_restores_base(tmp_path, bf16_setup):
    base, ft, base_dir, patch_file = bf16_setup
    result = apply_patches(base_dir, [patch_file], tmp_path / "out", max_shard_bytes=100)
    out = _read(tmp_path / "out")
    assert sorted(result.patched) == TARGETS
    for name in base:
        expected = ft[name] if name in TARGETS else base[name]
        assert out[name].dtype == torch.bfloat16 and torch.equal(out[name], expected), name
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()  # small shards: several files
    assert (tmp_path / "out" / "config.json").read_text() == '{"model_type": "llama"}'
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    prov = json.loads((tmp_path / "out" / PROVENANCE_NAME).read_text())
    assert prov["operation"] == "apply" and prov["patches"][0]["config"] == {"density": 1.0}
    assert len(prov["patches"][0]["sha256"]) == 64

    back = remove_patches(tmp_path / "out", [patch_file], tmp_path / "back")
    assert back.mismatched == []
    restored = _read(tmp_path / "back")
    assert all(torch.equal(restored[n], base[n]) for n in base)
    assert json.loads((tmp_path / "back" / PROVENANCE_NAME).read_text())["operation"] == "remove"
    # stacking a second apply keeps the first provenance
    apply_patches(tmp_path / "out", [patch_file], tmp_path / "twice", force=True)
    assert json.loads((tmp_path / "twice" / PROVENANCE_NAME).read_text())["previous"]["operation"] == "apply"


def test_save_load_then_apply_equals_in_memory_apply(tmp_path):
    base, ft = _models(seed=3)
    patch = _full_patch(base, ft, mask_seed=1)
    save_patch(patch, tmp_path / "p.safetensors")
    assert load_patch(tmp_path / "p.safetensors").equal(patch)
    base_dir = _write_sharded(tmp_path / "base", base, shards=3)
    apply_patches(base_dir, [tmp_path / "p.safetensors"], tmp_path / "out")
    expected = patch.apply_to_state_dict(base)
    out = _read(tmp_path / "out")
    assert all(torch.equal(out[n], expected[n]) for n in base)


def test_fp32_round_trip_within_tolerance(tmp_path):
    base, ft = _models(torch.float32, seed=5)
    patch = _full_patch(base, ft)
    save_file(base, str(tmp_path / "base.safetensors"))  # a single file works as a checkpoint too
    save_patch(patch, tmp_path / "p.safetensors")
    apply_patches(tmp_path / "base.safetensors", [tmp_path / "p.safetensors"], tmp_path / "out")
    out = _read(tmp_path / "out")
    assert all(torch.allclose(out[n], ft[n], rtol=0, atol=1e-6) for n in TARGETS)
    remove_patches(tmp_path / "out", [tmp_path / "p.safetensors"], tmp_path / "back")
    back = _read(tmp_path / "back")
    assert all(torch.allclose(back[n], base[n], rtol=0, atol=1e-6) for n in base)


def test_several_patches_are_combined_before_apply(tmp_path):
    base, ft1 = _models(seed=0)
    g = torch.Generator().manual_seed(7)
    ft2 = {n: (t.float() + 0.05 * torch.randn(t.shape, generator=g)).to(t.dtype) for n, t in base.items()}
    p1, p2 = _full_patch(base, ft1, mask_seed=1), _full_patch(base, ft2, mask_seed=2)
    files = [save_patch(p, tmp_path / f"p{i}.safetensors") for i, p in enumerate((p1, p2))]
    base_dir = _write_sharded(tmp_path / "base", base)
    result = apply_patches(base_dir, files, tmp_path / "out", policy="ties")
    combined, _ = combine_patches([p1, p2], policy="ties")
    expected = combined.apply_to_state_dict(base)
    out = _read(tmp_path / "out")
    assert all(torch.equal(out[n], expected[n]) for n in base)
    assert result.combine_report is not None and result.combine_report.policy == "ties"
    remove_patches(tmp_path / "out", files, tmp_path / "back", policy="ties")
    back = _read(tmp_path / "back")
    assert all(torch.allclose(back[n].float(), base[n].float(), atol=1e-2) for n in base)


def test_refusals_leave_nothing_behind(tmp_path, bf16_setup):
    base, ft, base_dir, patch_file = bf16_setup
    other = {n: t.clone() for n, t in base.items()}
    other[TARGETS[0]][0, 0] += 1
    other_dir = _write_sharded(tmp_path / "other", other)
    with pytest.raises(PatchFormatError, match="made for another base"):
        apply_patches(other_dir, [patch_file], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    apply_patches(other_dir, [patch_file], tmp_path / "out", force=True)
    with pytest.raises(CheckpointError, match="already exists"):
        apply_patches(base_dir, [patch_file], tmp_path / "out")
    with pytest.raises(ConfigError, match="unknown combine policy"):
        apply_patches(base_dir, [patch_file], tmp_path / "out2", policy="nope")
    small = {n: t for n, t in base.items() if n != TARGETS[1]}
    small_dir = _write_sharded(tmp_path / "small", small)
    with pytest.raises(CheckpointError, match="missing from the checkpoint"):
        apply_patches(small_dir, [patch_file], tmp_path / "out3", force=True)
    wide_dir = _write_sharded(tmp_path / "wide", {**base, "model.norm.weight": torch.ones(4)})  # fp32 norm
    with pytest.raises(PatchFormatError, match="other tensor names"):
        remove_patches(wide_dir, [patch_file], tmp_path / "out4")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["base", "other", "out", "patch.safetensors", "small", "wide"]


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("lowrank", [False, True])
def test_overflowing_weights_are_refused_before_the_model_is_written(tmp_path, lowrank):
    """fp16 holds at most 65504: a delta scaled by 1e38 fits fp32 but not the checkpoint dtype."""
    base, ft = _models(torch.float16, seed=2)
    patch = _full_patch(base, ft, mask_seed=1)
    if lowrank:  # factors touch every entry, not only the sparse ones
        name = TARGETS[0]
        tp = patch.tensors[name]
        zero = torch.zeros(0, dtype=torch.int64)
        patch.tensors[name] = TensorPatch(name, tp.shape, zero, torch.zeros(0), (torch.ones(6, 1), torch.ones(1, 4)))
    base_dir = _write_sharded(tmp_path / "base", base)
    save_patch(patch, tmp_path / "p.safetensors")
    with pytest.raises(NumericalError, match="NaN/Inf"):
        apply_patches(base_dir, [tmp_path / "p.safetensors"], tmp_path / "out", weights=[1e38], policy="sum")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    apply_patches(base_dir, [tmp_path / "p.safetensors"], tmp_path / "out", weights=[1.0], policy="sum")


def test_remove_refuses_the_base_it_was_never_applied_to(tmp_path, bf16_setup):
    base, ft, base_dir, patch_file = bf16_setup
    with pytest.raises(PatchFormatError, match="not applied"):
        remove_patches(base_dir, [patch_file], tmp_path / "back")
    assert not (tmp_path / "back").exists() and _leftovers(tmp_path) == []
    remove_patches(base_dir, [patch_file], tmp_path / "back", force=True)  # on purpose: written


def test_remove_refuses_a_model_made_by_applying_other_patches(tmp_path, bf16_setup):
    base, ft, base_dir, patch_file = bf16_setup
    _, ft2 = _models(seed=9)
    ft2 = {n: t.to(torch.bfloat16) for n, t in ft2.items()}
    other = save_patch(_full_patch(base, ft2, mask_seed=3), tmp_path / "other.safetensors")
    apply_patches(base_dir, [other], tmp_path / "out")
    with pytest.raises(PatchFormatError, match="other patch"):
        remove_patches(tmp_path / "out", [patch_file], tmp_path / "back")
    apply_patches(base_dir, [patch_file], tmp_path / "out2", weights=[0.5])
    with pytest.raises(PatchFormatError, match="weights"):
        remove_patches(tmp_path / "out2", [patch_file], tmp_path / "back")
    assert not (tmp_path / "back").exists() and _leftovers(tmp_path) == []
    back = remove_patches(tmp_path / "out2", [patch_file], tmp_path / "back", weights=[0.5])
    assert back.out_dir.is_dir()


def test_a_combination_forced_across_bases_is_refused_by_apply_unless_forced(tmp_path):
    base, ft = _models(seed=0)
    other_base = {n: t.clone() for n, t in base.items()}
    other_base[TARGETS[0]][0, 0] += 1
    p_a, p_b = _full_patch(base, ft, mask_seed=1), _full_patch(other_base, ft, mask_seed=2)
    with pytest.raises(PatchFormatError, match="different base models"):
        combine_patches([p_a, p_b])
    combined, _ = combine_patches([p_a, p_b], force=True)
    assert combined.metadata.base_fingerprint["forced_across_bases"]
    path = save_patch(combined, tmp_path / "c.safetensors")
    assert load_patch(path).metadata.base_fingerprint["forced_across_bases"]
    base_dir = _write_sharded(tmp_path / "base", base)
    with pytest.raises(PatchFormatError, match="combined with --force"):
        apply_patches(base_dir, [path], tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    apply_patches(base_dir, [path], tmp_path / "out", force=True)
    # combining it again keeps the record
    again, _ = combine_patches([load_patch(path)], policy="sum")
    assert (
        again.metadata.base_fingerprint["forced_across_bases"]
        == combined.metadata.base_fingerprint["forced_across_bases"]
    )


def _bits(t):
    """Raw bits, so -0.0 vs 0.0 and NaN payloads count as differences too."""
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize(
    ("structure", "policy"), [("sparse", "keep"), ("sparse+lowrank", "reset"), ("sparse", "tailor")]
)
def test_apply_of_the_patch_equals_save_model_bit_for_bit(pico, tmp_path, structure, policy):
    """fp32 pico Llama: both outputs come from one construction (base + the TensorPatch, in fp32)."""
    from model_tailor.api import tailor

    pair = pico("llama")
    out, model_dir = tmp_path / "p.safetensors", tmp_path / "tailored"
    fields = {"density": 0.25, "block_size": 16, "samples": 4, "structure": structure}
    tailor(pair.base, pair.finetuned, pair.calibration, out=out, save_model=model_dir, non_target_policy=policy,
           **fields)  # fmt: skip
    apply_patches(pair.base, [out], tmp_path / "applied")
    saved, applied = _read(model_dir), _read(tmp_path / "applied")
    assert saved.keys() == applied.keys()
    assert next(iter(saved.values())).dtype == torch.float32
    differ = {n: int((_bits(saved[n]) != _bits(applied[n])).sum()) for n in saved}
    assert sum(differ.values()) == 0, {n: d for n, d in differ.items() if d}


def _ulp(x):
    x = x.abs()
    return torch.nextafter(x, torch.tensor(float("inf"), dtype=x.dtype)) - x


@pytest.mark.parametrize("lowrank", [False, True])
def test_fp32_remove_is_within_one_ulp_of_the_larger_of_base_and_patched(tmp_path, lowrank):
    """What remove guarantees on fp32 (README): untouched entries come back bit for bit; a patched entry b
    comes back within one ulp of max(|b|, |b + delta|), which is more than one ulp of b where |delta| >> |b|."""
    g = torch.Generator().manual_seed(4)
    scale = lambda: torch.pow(2.0, torch.randint(-12, 12, (16, 16), generator=g).float())  # noqa: E731
    base = {TARGETS[0]: torch.randn(16, 16, generator=g) * scale(), "model.norm.weight": torch.ones(16)}
    keep = torch.rand(16, 16, generator=g) < 0.5
    delta = torch.where(keep, torch.randn(16, 16, generator=g) * scale(), torch.zeros(16, 16))
    tp = TensorPatch.from_dense(TARGETS[0], delta, keep)
    if lowrank:
        factors = (torch.randn(16, 2, generator=g) * 1e-3, torch.randn(2, 16, generator=g))
        tp = TensorPatch(tp.name, tp.shape, tp.indices, tp.values, factors)
    meta = PatchMetadata(
        base_dtypes={TARGETS[0]: "float32"}, base_fingerprint=fingerprint(base, content_names=[TARGETS[0]])
    )
    path = save_patch(SparsePatch({TARGETS[0]: tp}, meta), tmp_path / "p.safetensors")
    save_file(base, str(tmp_path / "base.safetensors"))
    apply_patches(tmp_path / "base.safetensors", [path], tmp_path / "out")
    remove_patches(tmp_path / "out", [path], tmp_path / "back")
    b, p, r = base[TARGETS[0]], _read(tmp_path / "out")[TARGETS[0]], _read(tmp_path / "back")[TARGETS[0]]
    err = (r - b).abs()
    assert bool((err <= _ulp(torch.maximum(b.abs(), p.abs()))).all())
    assert bool((err > _ulp(b)).any())  # so "within one ulp of the base" would be false
    if not lowrank:
        assert torch.equal(_bits(r[~keep]), _bits(b[~keep]))
