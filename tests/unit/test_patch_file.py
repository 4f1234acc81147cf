"""Patch file format v1/v2: golden bytes, lossless round trips, and one clear error per kind of damage."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from model_tailor.errors import ConfigError, PatchFormatError
from model_tailor.patch.format import FORMAT_NAME, _index_dtype, load_patch, save_patch
from model_tailor.patch.model import PatchMetadata, SparsePatch, TensorPatch

GOLDEN_SHA256 = "d22cc6b8b0484726116b12fbc9aaca5d5e792b5125dc879a6af65bc39027728e"
# sha256 of b"indices/w\tI32\t[2]\n" + int32 [0, 3] + b"values/w\tF32\t[2]\n" + fp32 [0.5, -1.0] (recomputed
# from scratch in test_checksum_is_sha256_of_names_dtypes_shapes_and_bytes_in_sorted_order).
GOLDEN_PAYLOAD = "6db63b8ef2ff0254daaf3dd802e9b31d9df1d903446c927c581c1383ab9abde3"
GOLDEN_HEADER = (
    '{"__metadata__":{"base_dtypes":"{\\"w\\":\\"bfloat16\\"}","base_fingerprint":"{\\"algorithm\\":\\"sha256\\",'
    '\\"content\\":{},\\"num_tensors\\":1,\\"structure\\":\\"' + "ab" * 32 + '\\"}","config":"{\\"density\\":0.5}",'
    '"created":"2024-01-01T00:00:00+00:00","format":"model-tailor-patch","format_version":"1",'
    '"payload_sha256":"'
    + GOLDEN_PAYLOAD
    + '","reset_params":"[]","shapes":"{\\"w\\":[2,2]}","stats":"{\\"w\\":{\\"density\\":0.5}}",'
    '"versions":"{\\"model-tailor\\":\\"0.1.0\\"}"},'
    '"indices/w":{"dtype":"I32","shape":[2],"data_offsets":[0,8]},'
    '"values/w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}      '
)
GOLDEN_DATA = "00000000030000000000003f000080bf"  # int32 [0, 3] then fp32 [0.5, -1.0], little-endian


def _golden_patch() -> SparsePatch:
    meta = PatchMetadata(
        base_dtypes={"w": "bfloat16"},
        base_fingerprint={"algorithm": "sha256", "structure": "ab" * 32, "num_tensors": 1, "content": {}},
        config={"density": 0.5},
        versions={"model-tailor": "0.1.0"},
        stats={"w": {"density": 0.5}},
        reset_params=[],
        created="2024-01-01T00:00:00+00:00",
    )
    return SparsePatch({"w": TensorPatch("w", (2, 2), torch.tensor([0, 3]), torch.tensor([0.5, -1.0]))}, meta)


def test_golden_bytes_freeze_v1(tmp_path):
    path = save_patch(_golden_patch(), tmp_path / "golden.safetensors")
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    assert raw[8 : 8 + n].decode() == GOLDEN_HEADER
    assert raw[8 + n :].hex() == GOLDEN_DATA
    assert hashlib.sha256(raw).hexdigest() == GOLDEN_SHA256


def _random_patch(seed: int = 0, lowrank: bool = False) -> SparsePatch:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in [
        ("model.layers.0.mlp.up_proj.weight", (8, 6)),
        ("model.layers.1.o_proj.weight", (5, 7)),
    ]:
        delta = torch.randn(*shape, generator=g)
        mask = torch.rand(*shape, generator=g) < 0.3
        tp = TensorPatch.from_dense(name, delta, mask)
        if lowrank:
            tp = TensorPatch(name, shape, tp.indices, tp.values, (torch.randn(shape[0], 2), torch.randn(2, shape[1])))
        tensors[name] = tp
    tensors["empty.weight"] = TensorPatch("empty.weight", (3, 3), torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    meta = PatchMetadata(config={"density": 0.3}, stats={"x": {"error": 1.5}}, reset_params=["model.norm.weight"])
    return SparsePatch(tensors, meta)


def test_round_trip_is_lossless_and_deterministic(tmp_path):
    patch = _random_patch()
    save_patch(patch, tmp_path / "a.safetensors")
    loaded = load_patch(tmp_path / "a.safetensors")
    assert loaded.equal(patch)
    assert loaded.metadata.config == {"density": 0.3} and loaded.metadata.reset_params == ["model.norm.weight"]
    assert loaded.metadata.format_version == "1" and loaded.metadata.versions["model-tailor"]
    save_patch(loaded, tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_bf16_values_on_request(tmp_path):
    patch = _random_patch()
    save_patch(patch, tmp_path / "p.safetensors", value_dtype=torch.bfloat16)
    loaded = load_patch(tmp_path / "p.safetensors")
    for name, tp in patch.tensors.items():
        assert torch.equal(loaded.tensors[name].values, tp.values.to(torch.bfloat16).float())
    with pytest.raises(ConfigError, match="value_dtype"):
        save_patch(patch, tmp_path / "q.safetensors", value_dtype=torch.int8)
    assert not (tmp_path / "q.safetensors").exists()


def test_lowrank_writes_v2_and_round_trips(tmp_path):
    patch = _random_patch(lowrank=True)
    save_patch(patch, tmp_path / "p.safetensors")
    loaded = load_patch(tmp_path / "p.safetensors")
    assert loaded.metadata.format_version == "2" and loaded.equal(patch)


def test_index_dtype_switches_at_2_pow_31():
    assert _index_dtype(2**31 - 1) == torch.int32 and _index_dtype(2**31) == torch.int64


def test_failed_save_leaves_no_file(tmp_path):
    patch = _random_patch()
    patch.metadata.config = {"bad": object()}
    with pytest.raises(PatchFormatError, match="JSON"):
        save_patch(patch, tmp_path / "p.safetensors")
    assert list(tmp_path.iterdir()) == []


# -- damaged files ------------------------------------------------------------------------------------------
def _meta(**over) -> dict[str, str]:
    meta = {"format": FORMAT_NAME, "format_version": "1", "shapes": json.dumps({"w": [2, 3]})}
    meta.update(over)
    return {k: v for k, v in meta.items() if v is not None}


def _write(path, tensors=None, **meta_over):
    if tensors is None:
        tensors = {"indices/w": torch.tensor([0, 4], dtype=torch.int32), "values/w": torch.tensor([1.0, 2.0])}
    save_file(tensors, str(path), metadata=_meta(**meta_over))
    return path


def test_valid_handmade_file_loads(tmp_path):
    patch = load_patch(_write(tmp_path / "p.safetensors"))
    assert patch.tensors["w"].to_dense().tolist() == [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]


def _idx(values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype)


@pytest.mark.parametrize(
    ("tensors", "meta", "match"),
    [
        (None, {"format": "something-else"}, "not a patch file"),
        (None, {"format": None}, "not a patch file"),
        (None, {"format_version": "3"}, "format version 3 is not supported"),
        (None, {"format_version": "x"}, "not a version number"),
        (None, {"shapes": None}, "no 'shapes' entry"),
        (None, {"shapes": "{not json"}, "'shapes' is not valid JSON"),
        (None, {"shapes": json.dumps({"other": [2, 3]})}, "'w' has no entry in metadata 'shapes'"),
        ({"indices/w": _idx([4, 0]), "values/w": torch.ones(2)}, {}, "not sorted"),
        ({"indices/w": _idx([1, 1]), "values/w": torch.ones(2)}, {}, "not unique"),
        ({"indices/w": _idx([0, 6]), "values/w": torch.ones(2)}, {}, "out of range"),
        ({"indices/w": _idx([[0, 1]]), "values/w": torch.ones(1, 2)}, {}, "must be 1-D"),
        ({"indices/w": _idx([0, 1]), "values/w": torch.ones(3)}, {}, "2 indices but 3 values"),
        ({"indices/w": torch.tensor([0.0, 1.0]), "values/w": torch.ones(2)}, {}, "expected int32 or int64"),
        ({"indices/w": _idx([0, 1]), "values/w": torch.tensor([1.0, float("nan")])}, {}, "NaN/Inf"),
        ({"indices/w": _idx([0, 1]), "values/w": torch.tensor([float("inf"), 1.0])}, {}, "NaN/Inf"),
        ({"indices/w": _idx([0, 1])}, {}, "no 'values/w' entry"),
        (
            {"indices/w": _idx([0]), "values/w": torch.ones(1), "extra": torch.ones(1)},
            {},
            "unexpected tensor",
        ),
        (
            {"indices/w": _idx([0]), "values/w": torch.ones(1), "lowrank_a/w": torch.ones(2, 1)},
            {},
            "need format version 2",
        ),
    ],
)
def test_damaged_files_raise_one_line_naming_the_problem(tmp_path, tensors, meta, match):
    path = _write(tmp_path / "p.safetensors", tensors, **meta)
    with pytest.raises(PatchFormatError, match=match) as info:
        load_patch(path)
    assert "\n" not in str(info.value) and "p.safetensors" in str(info.value)


def test_missing_garbage_and_truncated_files(tmp_path):
    with pytest.raises(PatchFormatError, match="does not exist"):
        load_patch(tmp_path / "nope.safetensors")
    (tmp_path / "garbage.safetensors").write_text("hello, I am not a patch")
    with pytest.raises(PatchFormatError, match="not a safetensors file"):
        load_patch(tmp_path / "garbage.safetensors")
    good = save_patch(_random_patch(), tmp_path / "good.safetensors").read_bytes()
    for cut in (4, 40, len(good) - 3):
        (tmp_path / "cut.safetensors").write_bytes(good[:cut])
        with pytest.raises(PatchFormatError, match="truncated"):
            load_patch(tmp_path / "cut.safetensors")


def test_unknown_metadata_keys_warn_and_are_kept(tmp_path):
    path = _write(tmp_path / "p.safetensors", future_key="42", format_version="1.3")
    with pytest.warns(UserWarning, match="future_key"):
        patch = load_patch(path)
    assert patch.metadata.extra == {"future_key": "42"}


# -- payload checksum ---------------------------------------------------------------------------------------
def _data_start(raw: bytes) -> int:
    (n,) = struct.unpack("<Q", raw[:8])
    return 8 + n


def test_every_tensor_data_byte_flip_is_refused(tmp_path):
    """1-3 flipped bytes anywhere in the tensor data change the payload checksum: none loads."""
    good = save_patch(_random_patch(lowrank=True), tmp_path / "good.safetensors").read_bytes()
    start = _data_start(good)
    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        raw = bytearray(good)
        for _ in range(1 + trial % 3):
            pos = start + int(torch.randint(len(good) - start, (1,), generator=g))
            raw[pos] ^= 1 << int(torch.randint(8, (1,), generator=g))
        if bytes(raw) == good:  # two flips of the same bit cancel
            continue
        (tmp_path / "bad.safetensors").write_bytes(bytes(raw))
        with pytest.raises(PatchFormatError, match="checksum") as info:
            load_patch(tmp_path / "bad.safetensors")
        assert "bad.safetensors" in str(info.value) and "\n" not in str(info.value)


def test_checksum_is_sha256_of_names_dtypes_shapes_and_bytes_in_sorted_order(tmp_path):
    path = save_patch(_golden_patch(), tmp_path / "g.safetensors")
    stream = (
        b"indices/w\tI32\t[2]\n" + bytes.fromhex("0000000003000000") + b"values/w\tF32\t[2]\n"
        + bytes.fromhex("0000003f000080bf")
    )  # fmt: skip
    raw = path.read_bytes()
    header = json.loads(raw[8 : _data_start(raw)])
    assert header["__metadata__"]["payload_sha256"] == hashlib.sha256(stream).hexdigest()


def test_old_file_without_checksum_loads_with_a_note(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="model_tailor.patch.format"):
        patch = load_patch(_write(tmp_path / "old.safetensors"))
    assert patch.tensors["w"].nnz == 2
    assert "no payload checksum" in caplog.text and "old.safetensors" in caplog.text


def test_a_valid_checksum_of_other_data_is_refused(tmp_path):
    tensors = {"indices/w": _idx([0, 4]), "values/w": torch.tensor([1.0, 2.0])}
    with pytest.raises(PatchFormatError, match="checksum"):
        load_patch(_write(tmp_path / "p.safetensors", tensors, payload_sha256="0" * 64))


# -- metadata of the wrong type -----------------------------------------------------------------------------
_DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    ("meta", "field"),
    [
        ({"format_version": "²"}, "format_version"),
        ({"format_version": "1" * 5000}, "format_version"),
        ({"format_version": "1..2"}, "format_version"),
        ({"base_fingerprint": "[1, 2]"}, "base_fingerprint"),
        ({"base_fingerprint": '"abc"'}, "base_fingerprint"),
        ({"base_fingerprint": '{"content": [1]}'}, "base_fingerprint"),
        ({"base_fingerprint": '{"content": {"w": 3}}'}, "base_fingerprint"),
        ({"base_fingerprint": '{"structure": 5}'}, "base_fingerprint"),
        ({"base_fingerprint": '{"algorithm": null}'}, "base_fingerprint"),
        ({"base_fingerprint": '{"num_tensors": "two"}'}, "base_fingerprint"),
        ({"base_fingerprint": '{"num_tensors": true}'}, "base_fingerprint"),
        ({"base_fingerprint": '{"forced_across_bases": "yes"}'}, "base_fingerprint"),
        ({"base_dtypes": "[]"}, "base_dtypes"),
        ({"base_dtypes": '{"w": 16}'}, "base_dtypes"),
        ({"versions": "3"}, "versions"),
        ({"versions": '{"torch": [2]}'}, "versions"),
        ({"reset_params": "5"}, "reset_params"),
        ({"reset_params": "[1, 2]"}, "reset_params"),
        ({"reset_params": '"model.norm.weight"'}, "reset_params"),
        ({"config": "[]"}, "config"),
        ({"config": '{"density": NaN}'}, "config"),
        ({"stats": "0.5"}, "stats"),
        ({"stats": _DEEP}, "stats"),
        ({"shapes": json.dumps({"w": [2, True]})}, "shapes"),
        ({"shapes": json.dumps({"w": [2, 2**70]})}, "shapes"),
        ({"payload_sha256": "xyz"}, "payload_sha256"),
    ],
)
def test_metadata_of_the_wrong_type_is_refused_naming_the_field(tmp_path, meta, field):
    path = _write(tmp_path / "p.safetensors", **meta)
    with pytest.raises(PatchFormatError, match=field) as info:
        load_patch(path)
    assert "\n" not in str(info.value) and "p.safetensors" in str(info.value)


def test_metadata_of_the_right_types_loads(tmp_path):
    fp = {"algorithm": "sha256", "structure": "ab" * 32, "num_tensors": 1, "content": {"w": "cd" * 32}}
    path = _write(
        tmp_path / "p.safetensors",
        base_fingerprint=json.dumps(fp),
        base_dtypes='{"w": "bfloat16"}',
        versions='{"torch": "2.13.0"}',
        reset_params='{"model.norm.weight": "tuned"}',
        config='{"density": 0.5, "nested": [1, {"a": null}]}',
        stats='{"w": {"kept": 2}}',
    )
    meta = load_patch(path).metadata
    assert meta.base_fingerprint == fp and meta.reset_params == {"model.norm.weight": "tuned"}
    assert meta.config["nested"] == [1, {"a": None}] and meta.versions == {"torch": "2.13.0"}
