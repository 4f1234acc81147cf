"""Lazy, per-tensor checkpoint I/O: read HF safetensors (single file or sharded index), write atomically.

Reading never loads a whole model: each ``get`` maps one tensor from its shard (mergekit-style lazy
loading). Writing fills shards one at a time inside a temporary folder that is renamed into place at
``commit``, so an interrupted run never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model_tailor.errors import CheckpointError, ShapeMismatchError
from model_tailor.options import DEFAULT_MAX_SHARD_BYTES

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
RELEASE_EVERY = 16  # tensors read between unmappings of the shard files
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


def trim_heap() -> None:
    """glibc keeps freed block-sized buffers in its arenas (RSS grew ~3x the patch per block without this)."""
    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # musl or another libc: nothing to do
        pass


class CheckpointReader:
    """Read-only, lazy view of a Hugging Face checkpoint folder or one ``.safetensors`` file.

    Pages read through a memory map count as resident memory until the map is closed, so the reader
    releases its own handles every ``release_every`` reads: a streaming pass over a whole checkpoint stays
    at a few tensors of resident memory without release calls at every loop.

    Args:
        path: a folder holding ``model.safetensors``, ``model.safetensors.index.json`` with its shards,
            or other ``*.safetensors`` files; or a single ``.safetensors`` file.
        release_every: reads between releases (:meth:`release`); 0 never releases on its own.
    """

    def __init__(self, path: str | os.PathLike[str], *, release_every: int = RELEASE_EVERY) -> None:
        self.path = Path(path)
        self.release_every = release_every
        self._reads = 0
        if not self.path.exists():
            raise CheckpointError(
                f"checkpoint {str(self.path)!r} does not exist; pass a model folder or a .safetensors file"
            )
        self.config_dir = self.path if self.path.is_dir() else self.path.parent
        self._where = self._locate_tensors()
        self._handles: dict[Path, Any] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}

    def _locate_tensors(self) -> dict[str, Path]:
        if self.path.is_file():
            return {name: self.path for name in self._keys_of(self.path)}
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as err:
                raise CheckpointError(f"{index}: unreadable shard index ({err}); re-save the checkpoint") from None
            where = {name: self.path / shard for name, shard in weight_map.items()}
            missing = sorted({str(p.name) for p in where.values() if not p.is_file()})
            if missing:
                raise CheckpointError(f"{self.path}: shard(s) listed in {INDEX_NAME} are missing: {', '.join(missing)}")
            return where
        shards = sorted(self.path.glob("*.safetensors"))
        if not shards:
            pickled = [p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
            hint = (
                f" (found {', '.join(sorted(pickled))}: pickled weights are not read; re-save with "
                "save_pretrained(..., safe_serialization=True))"
                if pickled
                else ""
            )
            raise CheckpointError(f"{self.path}: no .safetensors weights found{hint}")
        where: dict[str, Path] = {}
        for shard in shards:
            for name in self._keys_of(shard):
                if name in where:
                    raise CheckpointError(
                        f"{self.path}: tensor {name!r} appears in {where[name].name} and {shard.name}"
                    )
                where[name] = shard
        return where

    @staticmethod
    def _keys_of(file: Path) -> list[str]:
        try:
            with safe_open(file, framework="pt") as handle:
                return list(handle.keys())
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from None

    def _handle(self, file: Path) -> Any:
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(file, framework="pt")
            except Exception as err:
                raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from None
        return self._handles[file]

    def names(self) -> list[str]:
        """All tensor names, sorted."""
        return sorted(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __len__(self) -> int:
        return len(self._where)

    def _info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        if name not in self._meta:
            sl = self._handle(self._file_of(name)).get_slice(name)
            dtype = _DTYPES.get(sl.get_dtype())
            if dtype is None:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {sl.get_dtype()}")
            self._meta[name] = (tuple(sl.get_shape()), dtype)
        return self._meta[name]

    def _file_of(self, name: str) -> Path:
        try:
            return self._where[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name)[0]

    def dtype(self, name: str) -> torch.dtype:
        return self._info(name)[1]

    def numel(self, name: str) -> int:
        n = 1
        for dim in self.shape(name):
            n *= dim
        return n

    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """Read one tensor (a fresh copy, not a view of the memory map); every ``release_every``-th read
        first releases the shard maps."""
        self._reads += 1
        if self.release_every and self._reads % self.release_every == 0:
            self.release()
        tensor = self._handle(self._file_of(name)).get_tensor(name)
        return tensor.to(device) if str(device) != "cpu" else tensor

    def iter_tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names() if names is None else names:
            yield name, self.get(name)

    def config(self) -> dict[str, Any]:
        """The folder's ``config.json`` (empty dict when there is none)."""
        cfg = self.config_dir / "config.json"
        if not cfg.is_file():
            return {}
        try:
            return json.loads(cfg.read_text())
        except ValueError as err:
            raise CheckpointError(f"{cfg}: invalid JSON ({err})") from None

    def extra_files(self) -> list[Path]:
        """Non-weight files of the folder (config, tokenizer, processor, chat template, ...), to copy along."""
        if not self.path.is_dir():
            return []
        return sorted(
            p
            for p in self.path.iterdir()
            if p.is_file() and p.suffix not in _WEIGHT_SUFFIXES and p.name != INDEX_NAME and not p.name.startswith(".")
        )

    def close(self) -> None:
        self._handles.clear()

    def release(self) -> None:
        """Unmap the shards and hand freed heap pages back to the OS; later reads reopen what they need."""
        self.close()
        trim_heap()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_compatible(base: CheckpointReader, finetuned: CheckpointReader) -> None:
    """Raise one error listing every tensor missing on either side and every shape mismatch.

    Dtypes may differ (a fine-tune saved in fp32 over a bf16 base is common): maths runs in fp32 and the
    result is cast to the base dtype.
    """
    base_names, ft_names = set(base.names()), set(finetuned.names())
    problems: list[str] = []
    only_base = sorted(base_names - ft_names)
    only_ft = sorted(ft_names - base_names)
    if only_base:
        problems.append(f"missing in finetuned: {', '.join(only_base)}")
    if only_ft:
        problems.append(f"missing in base: {', '.join(only_ft)}")
    shape_errors = [
        f"{n} (base {list(base.shape(n))} vs finetuned {list(finetuned.shape(n))})"
        for n in sorted(base_names & ft_names)
        if base.shape(n) != finetuned.shape(n)
    ]
    if shape_errors:
        problems.append(f"shape mismatch: {', '.join(shape_errors)}")
    if problems:
        cls = ShapeMismatchError if shape_errors and not (only_base or only_ft) else CheckpointError
        raise cls(
            f"base {str(base.path)!r} and finetuned {str(finetuned.path)!r} do not match "
            f"({'; '.join(problems)}); both must be the same architecture"
        )


class CheckpointWriter:
    """Write a Hugging Face checkpoint shard by shard into a temporary folder, then rename it into place.

    Args:
        out_dir: final folder. It must not exist unless ``overwrite``.
        max_shard_bytes: a shard is flushed once it holds at least this many bytes.
        overwrite: replace an existing ``out_dir`` (only at commit, never before).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        overwrite: bool = False,
    ) -> None:
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            raise CheckpointError(f"output {str(self.out_dir)!r} already exists; choose a new folder or remove it")
        if max_shard_bytes <= 0:
            raise ValueError("max_shard_bytes must be positive")
        self.overwrite = overwrite
        self.max_shard_bytes = max_shard_bytes
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.", suffix=".tmp", dir=self.out_dir.parent))
        # mkdtemp creates 0700; the finished checkpoint gets what a plain mkdir would give (0777 & ~umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self._tmp, 0o777 & ~umask)
        self._file_mode = 0o666 & ~umask  # safetensors writes shards 0600; give them a plain file's mode
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[list[str]] = []
        self._seen: set[str] = set()
        self.total_bytes = 0
        self._done = False
        self._finished = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; a full shard is written to disk immediately."""
        if self._done:
            raise CheckpointError("writer already committed or aborted")
        if name in self._seen:
            raise CheckpointError(f"tensor {name!r} written twice")
        self._seen.add(name)
        t = tensor.detach().to("cpu").contiguous()
        # Views and tied weights share storage, which safetensors refuses: give each entry its own.
        if t.untyped_storage().nbytes() != t.numel() * t.element_size() or any(
            t.untyped_storage().data_ptr() == o.untyped_storage().data_ptr() for o in self._buffer.values()
        ):
            t = t.clone()
        self._buffer[name] = t
        size = t.numel() * t.element_size()
        self._buffer_bytes += size
        self.total_bytes += size
        if self._buffer_bytes >= self.max_shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        index = len(self._shards)
        save_file(self._buffer, str(self._tmp / f"shard-{index:05d}.part"), metadata={"format": "pt"})
        self._shards.append(sorted(self._buffer))
        self._buffer = {}
        self._buffer_bytes = 0

    def copy_files(self, paths: Iterable[str | os.PathLike[str]]) -> None:
        """Copy side files (config, tokenizer, processor, chat template) into the checkpoint."""
        for path in paths:
            src = Path(path)
            if src.suffix == ".safetensors" or src.name == INDEX_NAME:
                continue
            shutil.copy2(src, self._tmp / src.name)

    def write_json(self, name: str, obj: Any) -> None:
        (self._tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")

    def commit(self) -> Path:
        """Finish the last shard, write the index, fsync and rename the folder into place."""
        self.finish()
        return self.install()

    def finish(self) -> Path:
        """Write the last shard and the index and fsync them; the folder stays a temporary (``install`` moves
        it), so a caller can stage other outputs before anything looks complete."""
        if self._done or self._finished:
            raise CheckpointError("writer already committed or aborted")
        try:
            self._flush()
            n = len(self._shards)
            weight_map: dict[str, str] = {}
            for i, names in enumerate(self._shards):
                final = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                os.replace(self._tmp / f"shard-{i:05d}.part", self._tmp / final)
                weight_map.update(dict.fromkeys(names, final))
            if n > 1:
                index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
                (self._tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            for file in self._tmp.iterdir():
                os.chmod(file, self._file_mode)
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        except BaseException:
            self.abort()
            raise
        self._finished = True
        return self._tmp

    def install(self) -> Path:
        """Rename the finished folder onto ``out_dir`` (the previous one, with ``overwrite``, is removed)."""
        if self._done or not self._finished:
            raise CheckpointError("writer not finished, or already committed or aborted")
        try:
            if self.out_dir.exists():
                if not self.overwrite:
                    raise CheckpointError(f"output {str(self.out_dir)!r} appeared while writing; nothing replaced")
                old = self.out_dir.with_name(f".{self.out_dir.name}.old")
                os.replace(self.out_dir, old)
                os.replace(self._tmp, self.out_dir)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(self._tmp, self.out_dir)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.out_dir

    def abort(self) -> None:
        """Delete everything written so far; ``out_dir`` is left as it was."""
        self._done = True
        self._buffer = {}
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._done:
            return
        if exc_type is None:
            self.commit()
        else:
            self.abort()
