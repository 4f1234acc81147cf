"""`model-tailor baseline`: build a baseline model (magnitude, DARE, TIES, task arithmetic, WiSE-FT, FAPM, LiNeS,
truncated SVD, reverting the first k tuned layers).

Streams tensor by tensor: one base and one fine-tuned tensor are in memory at a time, read lazily from the
two checkpoints, and the output is committed atomically. Tensors equal in both models are copied as-is. The
layer-aware baselines read each tensor's block index from its name; the model depth (LiNeS) is the number of
numbered blocks in the checkpoint (the deepest block list's length), and the tuned layers (revert_first_k) are
the blocks whose tensors differ, found by a first, read-only pass.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from model_tailor.commands.common import add_overwrite_option
from model_tailor.errors import ConfigError, ShapeMismatchError


def add_parser(sub: argparse._SubParsersAction) -> None:
    from model_tailor.kernel.baselines import BASELINES

    p = sub.add_parser("baseline", help="merge base + a baseline of the fine-tuned delta into a new checkpoint")
    p.add_argument("--method", required=True, choices=BASELINES.names())
    p.add_argument("--base", required=True, type=Path, help="pre-trained HF folder or safetensors file")
    p.add_argument("--finetuned", required=True, type=Path, help="fine-tuned HF folder or safetensors file")
    p.add_argument("--out", required=True, type=Path, help="output folder (written atomically)")
    p.add_argument("--density", type=float, default=None, help="fraction of each delta KEPT (sparse methods)")
    p.add_argument("--scale", type=float, default=None, help="task-arithmetic scale or WiSE-FT alpha")
    p.add_argument("--seed", type=int, default=0, help="seed for DARE / random")
    p.add_argument(
        "--k", type=int, default=None, help="revert_first_k: how many of the shallowest tuned layers to revert"
    )
    p.add_argument("--alpha", type=float, default=0.0, help="lines: scale of the first layer's delta")
    p.add_argument("--beta", type=float, default=1.0, help="lines: scale of the last layer's delta")
    add_overwrite_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from model_tailor.io.checkpoint import CheckpointReader, CheckpointWriter
    from model_tailor.kernel.baselines import BASELINES, BaselineParams, layer_index

    fn = BASELINES.get(args.method)
    if args.method == "revert_first_k" and args.k is None:  # before any tensor is read or a bar is drawn
        raise ConfigError("baseline 'revert_first_k' needs k: pass --k N (the shallowest tuned layers reverted)")
    gen = torch.Generator().manual_seed(args.seed)
    with CheckpointReader(args.base) as base, CheckpointReader(args.finetuned) as ft:
        missing = sorted(set(base.names()) ^ set(ft.names()))
        if missing:
            raise ShapeMismatchError(
                f"base and fine-tuned differ in tensor names: {missing[:10]} "
                f"({len(missing)} in all); pass two checkpoints of the same architecture"
            )
        layers = [i for i in map(layer_index, base.names()) if i is not None]
        tuned: tuple[int, ...] = ()
        if args.method == "revert_first_k":
            tuned = _tuned_layers(base, ft)
        common = dict(density=args.density, scale=args.scale, seed=args.seed, k=args.k, alpha=args.alpha)
        common.update(beta=args.beta, num_layers=max(layers) + 1 if layers else None, tuned_layers=tuned)
        changed = 0
        with CheckpointWriter(args.out, overwrite=args.overwrite) as writer:
            for name in tqdm(sorted(base.names()), desc=f"baseline {args.method}", unit="tensor"):
                b, f = base.get(name), ft.get(name)
                if b.shape != f.shape:
                    raise ShapeMismatchError(f"{name}: base shape {tuple(b.shape)} != fine-tuned {tuple(f.shape)}")
                if torch.equal(b, f) or not b.is_floating_point():
                    writer.add(name, f)
                    continue
                params = BaselineParams(name=name, base=b.float(), **common)
                merged = b.float() + fn([f.float() - b.float()], params, gen).float()
                writer.add(name, merged.to(b.dtype))
                changed += 1
            writer.copy_files(ft.extra_files())
    print(f"wrote {args.out} ({changed} changed tensors merged with {args.method})")
    return 0


def _tuned_layers(base, ft) -> tuple[int, ...]:  # noqa: ANN001 - two CheckpointReaders
    """Block indices holding at least one tensor that differs between the two checkpoints (read-only pass)."""
    import torch

    from model_tailor.kernel.baselines import layer_index

    tuned = set()
    for name in base.names():
        layer = layer_index(name)
        if layer is not None and layer not in tuned and not torch.equal(base.get(name), ft.get(name)):
            tuned.add(layer)
    return tuple(sorted(tuned))
