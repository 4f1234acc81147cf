"""Seeded fuzz of the patch loader: every mutant of a valid patch file either loads (with the original tensor
data) or is refused with ``PatchFormatError``; none crashes or hangs, and ``apply`` never writes from a refused
one.

Mutants: 1-3 byte flips anywhere in the file, truncations, every metadata field deleted or set to a value of
every JSON type (and nested fields of the wrong type), non-string metadata, and tensor header edits.
"""

from __future__ import annotations

import json
import random
import signal
import struct
import time
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import save_file

from model_tailor.cli import main
from model_tailor.errors import ModelTailorError, PatchFormatError
from model_tailor.io.checkpoint import CheckpointReader
from model_tailor.patch.apply import apply_patches
from model_tailor.patch.combine import combine_patches
from model_tailor.patch.fingerprint import fingerprint
from model_tailor.patch.format import KNOWN_KEYS, load_patch, save_patch
from model_tailor.patch.model import PatchMetadata, SparsePatch, TensorPatch, dtype_name

SEED = 20240611
NAMES = ("model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.o_proj.weight", "model.norm.weight")
ANY_TYPE = ["", "x", "²", '"text"', "null", "true", "0", "-1", "1.5", "1e400", "NaN", "[]", "[1, 2]", '["a"]',
            "{}", '{"a": 1}', '{"a": [null]}', "[" * 5000 + "]" * 5000, "{not json", "9" * 5000]  # fmt: skip
NESTED = {  # field -> (path inside the JSON object, wrong-typed replacements)
    "base_fingerprint": [("content", ["[]", '"x"', '{"a": 1}']), ("structure", ["5", "null"]),
                         ("num_tensors", ['"3"', "true", "-4"]), ("forced_across_bases", ['"yes"', "[1]"])],
    "shapes": [(NAMES[0], ['"6x4"', "[6]", "[6, -4]", "[6, 4.0]", "[true, 4]", "[4611686018427387904, 4]"])],
    "base_dtypes": [(NAMES[0], ["16", "null", '"float99"'])],
    "versions": [("torch", ["2", "[2]"])],
}  # fmt: skip


def _header(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _pack(header: dict, data: bytes) -> bytes:
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + data


def _base() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = {name: torch.randn(6, 4, generator=g).to(torch.bfloat16) for name in NAMES[:2]}
    base[NAMES[2]] = torch.ones(4, dtype=torch.bfloat16)
    return base


def _patch(base: dict[str, torch.Tensor]) -> SparsePatch:
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for name, t in base.items():
        tailored = (t.float() + 0.1 * torch.randn(t.shape, generator=g)).to(t.dtype)
        keep = torch.rand(t.shape, generator=g) < 0.5
        tensors[name] = TensorPatch.from_weights(name, t, torch.where(keep, tailored, t), keep)
    lr = tensors[NAMES[1]]
    factors = (0.01 * torch.randn(6, 1, generator=g), torch.randn(1, 4, generator=g))
    tensors[NAMES[1]] = TensorPatch(lr.name, lr.shape, lr.indices, lr.values, factors)
    meta = PatchMetadata(
        base_dtypes={n: dtype_name(t.dtype) for n, t in base.items()},
        base_fingerprint=fingerprint(base, content_names=list(base)),
        config={"density": 0.5, "structure": "sparse+lowrank"},
        stats={NAMES[0]: {"kept": 12, "error": 0.25}},
        reset_params={"model.embed_tokens.weight": "tuned"},
    )
    return SparsePatch(tensors, meta)


def _metadata_mutants(header: dict, data: bytes):
    meta = header["__metadata__"]
    for key in sorted(KNOWN_KEYS) + ["future_key"]:
        yield f"delete {key}", _pack({**header, "__metadata__": {k: v for k, v in meta.items() if k != key}}, data)
        for value in ANY_TYPE:
            yield f"{key}={value[:20]!r}", _pack({**header, "__metadata__": {**meta, key: value}}, data)
    for key, edits in NESTED.items():
        for inner, values in edits:
            for value in values:
                obj = json.loads(meta[key])
                obj[inner] = json.loads(value)
                mutated = {**meta, key: json.dumps(obj)}
                yield f"{key}.{inner}={value[:20]}", _pack({**header, "__metadata__": mutated}, data)
    yield "metadata not strings", _pack({**header, "__metadata__": {**meta, "config": {"a": 1}}}, data)
    yield "metadata a list", _pack({**header, "__metadata__": [1, 2]}, data)


def _header_mutants(header: dict, data: bytes, rng: random.Random):
    keys = sorted(k for k in header if k != "__metadata__")
    for key in rng.sample(keys, 4):
        entry = header[key]
        for field, value in (("dtype", "F16"), ("dtype", "I64"), ("dtype", "BOOL"), ("shape", [1, 1]),
                             ("data_offsets", [0, 4])):  # fmt: skip
            yield f"{key}.{field}={value}", _pack({**header, key: {**entry, field: value}}, data)
    yield "extra tensor", _pack({**header, "extra/x": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}}, data)


def _mutants(good: bytes):
    rng = random.Random(SEED)
    header, data = _header(good)
    for i in range(150):
        raw = bytearray(good)
        for _ in range(1 + i % 3):
            pos = rng.randrange(len(raw))
            raw[pos] ^= 1 << rng.randrange(8)
        yield f"flip #{i}", bytes(raw)
    for cut in [0, 7, 8, 9, len(good) - len(data), len(good) - 1] + rng.sample(range(len(good)), 20):
        yield f"truncate {cut}", good[:cut]
    yield from _metadata_mutants(header, data)
    yield from _header_mutants(header, data, rng)


@contextmanager
def _deadline(seconds: int):
    """Turn a hang into a test failure (SIGALRM; a no-op where it does not exist)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def _raise(*_):
        raise TimeoutError(f"took over {seconds} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _same_data(a: SparsePatch, b: SparsePatch) -> bool:
    if set(a.tensors) != set(b.tensors):
        return False
    for name, tp in a.tensors.items():
        other = b.tensors[name]
        if not (torch.equal(tp.indices, other.indices) and torch.equal(tp.values, other.values)):
            return False
        if (tp.lowrank is None) != (other.lowrank is None):
            return False
        if tp.lowrank is not None and not all(map(torch.equal, tp.lowrank, other.lowrank)):  # type: ignore[arg-type]
            return False
    return True


def _check_apply(base_dir, mutant, out, original: SparsePatch | None) -> None:
    """``apply`` from a mutant: refused cleanly, or a finite model equal to base + the original patch."""
    if original is None:  # load_patch refused it
        with pytest.raises(PatchFormatError):
            apply_patches(base_dir, [mutant], out)
        assert not out.exists()
        return
    try:
        apply_patches(base_dir, [mutant], out)
    except ModelTailorError:  # e.g. edited shapes or fingerprint: refused against this base
        assert not out.exists()
        return
    with CheckpointReader(out) as reader:
        written = {n: reader.get(n) for n in reader.names()}
    expected = original.apply_to_state_dict(_base())
    assert all(torch.equal(written[n], expected[n]) for n in expected)


@pytest.mark.filterwarnings("ignore:patch .* has metadata keys unknown")
def test_every_mutant_loads_intact_or_is_refused(tmp_path, capsys):
    base = _base()
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    save_file(base, str(base_dir / "model.safetensors"))
    original = _patch(base)
    good = save_patch(original, tmp_path / "good.safetensors").read_bytes()
    crashed, loaded, refused = [], [], []
    started = time.perf_counter()
    for i, (what, raw) in enumerate(_mutants(good)):
        path = tmp_path / f"m{i}.safetensors"
        path.write_bytes(raw)
        try:
            with _deadline(10):
                patch = load_patch(path)
                patch.summary()
                assert main(["inspect", str(path), "--json"]) == 0
                combine_patches([patch, original], policy="sum", force=True)
        except PatchFormatError as err:
            assert "\n" not in str(err) and str(path) in str(err), (what, str(err))
            refused.append((what, path))
        except Exception as err:  # noqa: BLE001 - the point: nothing else may escape
            crashed.append(f"{what}: {type(err).__name__}: {str(err)[:120]}")
        else:
            assert _same_data(patch, original), f"{what} loaded other tensor data"
            loaded.append((what, path))
    capsys.readouterr()
    assert crashed == []
    assert len(loaded) + len(refused) > 300 and len(refused) > 200 and len(loaded) > 20
    for j, (_, path) in enumerate(refused):
        _check_apply(base_dir, path, tmp_path / f"out-r{j}", None)
    for j, (_, path) in enumerate(random.Random(SEED).sample(loaded, 8)):
        _check_apply(base_dir, path, tmp_path / f"out-l{j}", original)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "temp files left behind"
    assert time.perf_counter() - started < 60
