"""Lazy checkpoint reads, atomic sharded writes, and compatibility errors that list every offender."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from model_tailor.errors import CheckpointError, ShapeMismatchError
from model_tailor.io.atomic import atomic_path, atomic_write_json
from model_tailor.io.checkpoint import INDEX_NAME, CheckpointReader, CheckpointWriter, check_compatible


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.layers.0.mlp.up_proj.weight": torch.randn(8, 4, generator=g),
        "model.layers.0.input_layernorm.weight": torch.ones(4, dtype=torch.bfloat16),
        "model.embed_tokens.weight": torch.randn(16, 4, generator=g).to(torch.float16),
    }


def _write_dir(path, tensors, max_shard_bytes=10**9):
    with CheckpointWriter(path, max_shard_bytes=max_shard_bytes) as writer:
        for name, t in tensors.items():
            writer.add(name, t)
        writer.write_json("config.json", {"model_type": "llama"})
    return path


def test_single_shard_round_trip(tmp_path):
    tensors = _tensors()
    out = _write_dir(tmp_path / "ckpt", tensors)
    assert (out / "model.safetensors").is_file() and not (out / INDEX_NAME).exists()
    reader = CheckpointReader(out)
    assert reader.names() == sorted(tensors)
    for name, t in tensors.items():
        assert reader.shape(name) == tuple(t.shape)
        assert reader.dtype(name) == t.dtype
        assert torch.equal(reader.get(name), t)
    assert reader.config() == {"model_type": "llama"}
    assert [p.name for p in reader.extra_files()] == ["config.json"]


def test_sharded_write_has_index_and_reads_back(tmp_path):
    tensors = _tensors()
    out = _write_dir(tmp_path / "ckpt", tensors, max_shard_bytes=1)
    index = json.loads((out / INDEX_NAME).read_text())
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert len(set(index["weight_map"].values())) == len(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    reader = CheckpointReader(out)
    for name, t in tensors.items():
        assert torch.equal(reader.get(name), t)


def test_reader_releases_its_shard_maps_every_n_reads(tmp_path):
    class Counting(CheckpointReader):
        releases = 0

        def release(self) -> None:
            self.releases += 1
            super().release()

    tensors = _tensors()
    out = _write_dir(tmp_path / "ckpt", tensors, max_shard_bytes=1)
    reader = Counting(out, release_every=3)
    names = reader.names() * 3  # 9 reads -> released before the 3rd, 6th and 9th
    for name in names:
        assert torch.equal(reader.get(name), tensors[name])  # a released map reopens on the next read
    assert reader.releases == 3
    never = Counting(out, release_every=0)
    for name in names:
        never.get(name)
    assert never.releases == 0


def test_single_file_and_plain_shards_without_index(tmp_path):
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "one.safetensors"))
    assert CheckpointReader(tmp_path / "one.safetensors").names() == sorted(tensors)
    folder = tmp_path / "plain"
    folder.mkdir()
    names = sorted(tensors)
    save_file({names[0]: tensors[names[0]]}, str(folder / "a.safetensors"))
    save_file({n: tensors[n] for n in names[1:]}, str(folder / "b.safetensors"))
    assert CheckpointReader(folder).names() == names


def test_tied_and_view_tensors_are_written(tmp_path):
    weight = torch.randn(4, 4)
    out = _write_dir(tmp_path / "tied", {"a": weight, "b": weight, "c": weight[:2]})
    reader = CheckpointReader(out)
    assert torch.equal(reader.get("b"), weight) and torch.equal(reader.get("c"), weight[:2])


def test_reader_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        CheckpointReader(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="pickled weights are not read"):
        CheckpointReader(empty)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        CheckpointReader(corrupt)
    good = _write_dir(tmp_path / "good", _tensors())
    with pytest.raises(CheckpointError, match="'missing.weight' is missing"):
        CheckpointReader(good).get("missing.weight")


def test_missing_shard_in_index(tmp_path):
    out = _write_dir(tmp_path / "ckpt", _tensors(), max_shard_bytes=1)
    (out / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
        CheckpointReader(out)


def test_writer_refuses_existing_output_and_aborts_cleanly(tmp_path):
    out = _write_dir(tmp_path / "ckpt", _tensors())
    with pytest.raises(CheckpointError, match="already exists"):
        CheckpointWriter(out)
    target = tmp_path / "never"
    with pytest.raises(RuntimeError), CheckpointWriter(target, max_shard_bytes=1) as writer:
        writer.add("x", torch.ones(3))
        raise RuntimeError("interrupted")
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp folder left behind


def test_overwrite_replaces_only_at_commit(tmp_path):
    out = _write_dir(tmp_path / "ckpt", {"a": torch.zeros(2)})
    writer = CheckpointWriter(out, overwrite=True)
    writer.add("a", torch.ones(2))
    assert torch.equal(CheckpointReader(out).get("a"), torch.zeros(2))
    writer.commit()
    assert torch.equal(CheckpointReader(out).get("a"), torch.ones(2))


def test_check_compatible_lists_every_offender(tmp_path):
    base = _write_dir(tmp_path / "base", {"a": torch.zeros(2), "b": torch.zeros(2, 2), "c": torch.zeros(1)})
    ft = _write_dir(tmp_path / "ft", {"a": torch.zeros(3), "b": torch.zeros(2, 3), "d": torch.zeros(1)})
    with pytest.raises(CheckpointError) as info:
        check_compatible(CheckpointReader(base), CheckpointReader(ft))
    message = str(info.value)
    for part in ("missing in finetuned: c", "missing in base: d", "a (base [2] vs finetuned [3])", "b (base [2, 2]"):
        assert part in message
    ft2 = _write_dir(tmp_path / "ft2", {"a": torch.zeros(3), "b": torch.zeros(2, 2), "c": torch.zeros(1)})
    with pytest.raises(ShapeMismatchError):
        check_compatible(CheckpointReader(base), CheckpointReader(ft2))
    check_compatible(CheckpointReader(base), CheckpointReader(base))


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(ValueError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []
    atomic_write_json(target, {"b": 1, "a": [1, 2]})
    assert json.loads(target.read_text()) == {"a": [1, 2], "b": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_output_gets_default_permissions(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "p.json", {})
    finally:
        os.umask(umask)
    assert (tmp_path / "p.json").stat().st_mode & 0o777 == 0o644


def test_written_checkpoint_folder_gets_default_permissions(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        out = _write_dir(tmp_path / "ckpt", {"a": torch.zeros(2)})
    finally:
        os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o755
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o644
