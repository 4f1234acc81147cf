"""TailorBench peers: the same base / fine-tuned pair merged by mergekit itself (optional extra ``peers``).

``merge_pair`` runs mergekit's ``ties``, ``dare_ties`` or ``task_arithmetic`` through its Python API
(``MergeConfiguration`` + ``run_merge``, CPU, no downloads, no tokenizer copy, no model card) in a temporary
folder under ``work_dir`` that is removed afterwards, and returns ``{state_dict_name: tensor}`` overrides for
the tensors the fine-tune changed, exactly like the project's own baselines (``methods.baseline_overrides``).
mergekit is imported only inside the functions: without it, :func:`is_available` is False and nothing here
raises at import time.

What each method reduces to for ONE fine-tuned model over ``base_model`` (mergekit 0.1.5,
``merge_methods/generalized_task_arithmetic.py`` and ``sparsify.py``; checked by
``tests/unit/test_bench_peers.py`` on a pico LLaVA pair), with ``delta = finetuned - base``:

* ``task_arithmetic`` (weight ``w``, ``lambda`` 1, normalize off): ``base + w·delta``; the bench's
  ``scale`` is mergekit's ``weight``, so it equals the project's ``task_arithmetic`` baseline (atol 1e-6).
* ``ties`` (density ``d``, normalize on, rescale off): ``base + lambda·topk(delta)``, the top
  ``k = max(1, int(d·numel))`` entries of ``|delta|`` per tensor. Sign election is trivial (every kept entry
  agrees with itself) and the normalisation divides ``w·delta`` by ``w``, so any nonzero weight has no effect. It
  equals the project's ``magnitude`` / ``ties`` baselines up to rounding and ties: the project keeps
  ``int(d·numel + 1e-9)`` (0.29·100 keeps 29), mergekit ``int(d·numel)`` (0.29·100 = 28.999… keeps 28) and
  at least one entry (0.01·32 keeps 1, the project 0); and mergekit's ``argsort`` is not stable, while the
  project breaks equal ``|delta|`` by position. Equal magnitudes do occur (Adam steps are quantised): on the
  bench's SmolLM2 pair at density 0.05, 20 of the 112 changed tensors keep one different entry of the same
  ``|delta|`` at the threshold; the other 92 are identical, and every kept count is the same.
* ``dare_ties`` (density ``d``, rescale on, normalize off): ``base + w·lambda·m⊙delta·‖delta‖₁/‖m⊙delta‖₁``
  with ``m ~ Bernoulli(d)`` i.i.d. per entry: the kept count is random (about ``d·numel``, not exactly
  ``⌊d·numel⌋`` like the project's ``dare``), and kept entries are rescaled to restore the tensor's L1 norm,
  not by ``1/d`` (the two agree only in expectation). Sign election is trivial again.

Seeding: ``MergeOptions.random_seed`` makes ``run_merge`` call ``transformers.trainer_utils.set_seed``, which
seeds ``random``, NumPy and torch's global generator; the Bernoulli masks come from ``torch.bernoulli`` on
that global generator, drawn tensor by tensor in mergekit's schedule (sorted by tensor name, one thread). So
a given (pair, changed-tensor set, seed) always gives the same masks (also across ``torch.set_num_threads``).
The caller's RNG states (torch, ``random``, NumPy) are saved and restored around the merge.

Why the pair is staged: mergekit 0.1.5 has no LLaVA definition and infers the architecture from the
transformers-5 module names (``model.language_model.layers.N…``), reading checkpoints through transformers'
``model_type``-level conversion table only. transformers 5 still *saves* LLaVA in the legacy layout
(``language_model.model.layers.N…``, ``multi_modal_projector.…``, ``vision_tower.…``; tied ``lm_head`` not
written), and the nested ``LlavaModel`` rename (``^language_model.model`` → ``language_model``) is scoped to
the sub-model, which mergekit does not apply. The vision tower and projector come through, but every
language-model tensor is marked optional and silently left out of the merged model. So ``merge_pair`` writes,
for each side, a folder with the original ``config.json`` and one ``model.safetensors`` holding only the
changed tensors under their state-dict names (read through ``to_ckpt``, the runner's checkpoint-name
mapping); mergekit then finds every tensor under the name it expects. Unchanged tensors would merge to base
with all three methods (a zero delta stays zero), so leaving them out changes nothing but the position of
``dare_ties``'s draws in the RNG stream. Any changed tensor missing from mergekit's output is an error.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import random
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from model_tailor.errors import CheckpointError, ConfigError

__all__ = ["INSTALL_HINT", "PEER_METHODS", "PeerMerge", "is_available", "merge_pair", "mergekit_version"]

PEER_METHODS = ("ties", "dare_ties", "task_arithmetic")
SPARSE_PEERS = frozenset({"ties", "dare_ties"})
INSTALL_HINT = 'pip install -e ".[peers]"'


def is_available() -> bool:
    """True when mergekit can be imported (the optional extra ``peers`` is installed)."""
    return importlib.util.find_spec("mergekit") is not None


def mergekit_version() -> str | None:
    """The installed mergekit version, or None."""
    try:
        return importlib.metadata.version("mergekit")
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass
class PeerMerge:
    """One merge: the overrides of the changed tensors, the seconds it took (staging, merge, reading back),
    and what was run (``info``: mergekit version, method, its parameters, seconds per stage)."""

    overrides: dict[str, torch.Tensor]
    seconds: float
    info: dict = field(default_factory=dict)


def merge_parameters(method: str, *, density: float | None, weight: float, lam: float) -> tuple[dict, dict]:
    """(per-model parameters, global parameters) of one mergekit method for a single fine-tuned model.

    Everything not named here is mergekit's default (``normalize``, ``rescale``, ``int8_mask``)."""
    if method not in PEER_METHODS:
        raise ConfigError(f"unknown mergekit peer {method!r}; choose one of {', '.join(PEER_METHODS)}")
    model = {"weight": float(weight)}
    if method in SPARSE_PEERS:
        if density is None or not 0.0 < density <= 1.0:
            raise ConfigError(f"mergekit {method} needs a density in (0, 1], got {density}")
        model["density"] = float(density)
    elif density is not None:
        raise ConfigError(f"mergekit {method} is dense; it takes a weight (scale), not a density")
    return model, {"lambda": float(lam)}


def _stage(src: Path, dst: Path, names: Sequence[str], to_ckpt: Mapping[str, str]) -> None:
    """``dst``: ``src``'s config.json and the changed tensors under their state-dict names."""
    from safetensors.torch import save_file

    from model_tailor.io.checkpoint import CheckpointReader

    unmapped = [n for n in names if n not in to_ckpt]
    if unmapped:
        raise CheckpointError(f"no checkpoint name for changed tensors {unmapped[:5]}; cannot stage them for mergekit")
    dst.mkdir(parents=True)
    shutil.copyfile(src / "config.json", dst / "config.json")
    with CheckpointReader(src) as reader:
        tensors = {n: reader.get(to_ckpt[n]).contiguous() for n in names}
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})


def _forget_loaders(root: Path) -> None:
    """Drop mergekit's cached loaders of the temporary folders (its ``LoaderCache`` is process-wide)."""
    from mergekit.io.tasks import LoaderCache

    cache = LoaderCache()
    for ref in [r for r in cache.loaders if Path(r.model.path).is_relative_to(root)]:
        cache.loaders.pop(ref).flush()


def _run_mergekit(
    method: str, tmp: Path, model_params: dict, global_params: dict, seed: int, models: Sequence[str] = ("finetuned",)
) -> None:
    """mergekit's ``run_merge`` of the ``tmp/<models>`` folders into ``tmp/base`` -> ``tmp/merged`` (CPU, fp32, no
    tokenizer copy nor model card), the caller's RNG states (torch, ``random``, NumPy) saved and restored around it;
    every model gets ``model_params``."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = MergeConfiguration.model_validate(
        {
            "merge_method": method,
            "base_model": str(tmp / "base"),
            "models": [{"model": str(tmp / m), "parameters": model_params} for m in models],
            "parameters": global_params,
            "dtype": "float32",
        }
    )
    options = MergeOptions(
        device="cpu",
        cuda=False,
        copy_tokenizer=False,
        write_model_card=False,
        random_seed=seed,
        quiet=True,
        lazy_unpickle=False,
        low_cpu_memory=False,
        trust_remote_code=False,
        safe_serialization=True,
    )
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            run_merge(config, str(tmp / "merged"), options)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        _forget_loaders(tmp)


def merge_pair(
    base: Path,
    finetuned: Path | Sequence[Path],
    method: str,
    *,
    names: Sequence[str],
    to_ckpt: Mapping[str, str],
    density: float | None = None,
    weight: float = 1.0,
    lam: float = 1.0,
    seed: int = 0,
    work_dir: Path,
) -> PeerMerge:
    """Merge ``finetuned`` into ``base`` (``save_pretrained`` folders) with mergekit's ``method``.

    Args:
        finetuned: one fine-tuned folder, or several fine-tunes of ``base`` merged together, each with the same
            per-model parameters (the multitask pair: mergekit's ``ties`` over two tasks' fine-tunes).
        names: state-dict names of the tensors the fine-tune changed (the overrides returned).
        to_ckpt: state-dict name -> checkpoint tensor name (``architectures.checkpoint_names``).
        density: fraction kept, for ``ties`` / ``dare_ties``; None for ``task_arithmetic``.
        weight: mergekit's per-model ``weight`` (the scale of ``task_arithmetic``; no effect on single-model
            ``ties``, a plain factor on ``dare_ties``).
        lam: mergekit's ``lambda`` (a final factor on the merged delta; 1 = off).
        seed: ``MergeOptions.random_seed`` (``dare_ties``'s masks; see the module docstring).
        work_dir: where the temporary folder lives (removed afterwards, also on errors).
    """
    if not is_available():
        raise ConfigError(f"mergekit is not installed; {INSTALL_HINT}")
    from model_tailor.io.checkpoint import CheckpointReader

    model_params, global_params = merge_parameters(method, density=density, weight=weight, lam=lam)
    names = list(names)
    work_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f"mergekit-{method}-", dir=work_dir))
    try:
        folders = [Path(finetuned)] if isinstance(finetuned, (str, Path)) else [Path(f) for f in finetuned]
        models = ["finetuned"] if len(folders) == 1 else [f"finetuned-{i}" for i in range(len(folders))]
        _stage(Path(base), tmp / "base", names, to_ckpt)
        for folder, model in zip(folders, models, strict=True):
            _stage(folder, tmp / model, names, to_ckpt)
        t_staged = time.perf_counter()
        _run_mergekit(method, tmp, model_params, global_params, seed, models)
        t_merged = time.perf_counter()
        with CheckpointReader(tmp / "merged") as reader:
            written = set(reader.names())
            missing = [n for n in names if n not in written and to_ckpt.get(n) not in written]
            if missing:
                raise CheckpointError(
                    f"mergekit {method} wrote no value for {len(missing)} changed tensor(s), "
                    f"e.g. {missing[:3]}; its architecture inference lost them"
                )
            overrides = {n: reader.get(n if n in written else to_ckpt[n]).clone() for n in names}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t0
    info = {
        "mergekit": mergekit_version(),
        "method": method,
        "parameters": {**model_params, **global_params},
        "seed": seed,
        "models": len(folders),
        "tensors": len(names),
        "stage_seconds": t_staged - t0,
        "merge_seconds": t_merged - t_staged,
        "read_seconds": seconds - (t_merged - t0),
    }
    return PeerMerge(overrides, seconds, info)
