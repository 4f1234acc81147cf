"""The speed floor of tailoring one Llama pair, beside ``model-tailor tailor --save-model`` and mergekit's TIES.

A script, not a test. It builds one random Llama pair with bench_scale's builder (seeded, bf16, one shard per
layer; the linears of the last ``--changed`` decoder layers differ) and its calibration texts, caches both in a
folder under ``--tmp`` keyed by every size and the seed (built once, reused by later runs), and times three things
on it, wall clock, each ``--repeats`` times (the median is reported). All three read the checkpoints warm from
the page cache.

* **floor**: the work no layer-sequential tailoring of this pair can skip, in this process with every library
  imported. (1) *read*: open every safetensors file of both checkpoints and read each tensor
  (``safe_open(...).get_tensor``, then a sum over it, so every byte is touched). (2) *forward*: the calibration
  batches the tailor run uses (``model_tailor.calibration.build_calibration``, same texts, samples, token cap,
  batch size and seed) through the fine-tuned model's decoder (``LlamaModel``: embeddings, every block, final
  norm; not the LM head, which a tailoring run never runs), on ``--device`` in ``--dtype``, under ``no_grad``,
  every tuned block run twice (a forward hook calls its ``forward`` again on the same arguments: the Hessian pass
  and the replay through the tailored block) and every other block once. Not timed: building the model object,
  loading the weights into it, tokenising, Python and library start-up, writing anything.
* **tailor**: ``python -m model_tailor tailor --out P --save-model M`` in a child process, start-up and writing
  included, with the same density, samples, token cap, batch size, seed, device and dtype.
* **mergekit TIES** (when mergekit is importable): mergekit's ``mergekit-yaml`` entry point in a child process,
  ``ties`` at the same density, weight 1, lambda 1 (``model_tailor.bench.peers.merge_parameters``), base_model =
  the base, fp32 maths (``dtype``, as the bench's peers run it), written in the checkpoints' bf16 (``out_dtype``),
  CPU, ``--quiet``, other options mergekit's defaults.

Printed as a table (floor, tailor, tailor / floor, mergekit TIES, tailor / TIES) and written as JSON (``--out``).

    python benchmarks/bench_floor.py --out floor.json          # 88M parameters: 12 blocks, 6 changed
    python benchmarks/bench_floor.py --layers 2 --changed 1 --hidden 64 --intermediate 96 --heads 4 --vocab 600
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_scale  # noqa: E402 - the pair builder lives beside this script

_MERGEKIT = "import sys; from mergekit.scripts.run_yaml import main; sys.argv[0] = 'mergekit-yaml'; sys.exit(main())"


@dataclass(frozen=True)
class Pair:
    """The cached pair: both folders and the calibration file."""

    base: Path
    finetuned: Path
    calibration: Path


def cached_pair(args: argparse.Namespace) -> Pair:
    """The pair for ``args``' sizes and seed under ``args.tmp``; built into a temporary sibling, then renamed."""
    shape = _shape(args)
    spec = {"shape": asdict(shape), "layers": args.layers, "changed": args.changed, "seed": args.seed}
    spec.update(texts=args.texts, tokens=args.tokens)
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(args.tmp or tempfile.gettempdir()) / "model-tailor-bench-floor"
    folder = root / key
    if not (folder / "spec.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        try:
            bench_scale.write_pair(partial, shape, args.layers, seed=args.seed, changed=args.changed)
            bench_scale.write_calibration(partial / "calib.jsonl", args.texts, args.tokens, seed=args.seed)
            (partial / "spec.json").write_text(json.dumps(spec, indent=1))
            os.rename(partial, folder)  # a concurrent builder that won the race leaves ours to clean up
        except OSError:
            if not (folder / "spec.json").exists():
                raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return Pair(folder / "base", folder / "finetuned", folder / "calib.jsonl")


def read_both(pair: Pair) -> tuple[float, dict[str, torch.Tensor]]:
    """Seconds to read every tensor of both checkpoints (each summed, so every byte is touched); returns the
    fine-tuned tensors too."""
    from safetensors import safe_open

    t0 = time.perf_counter()
    finetuned: dict[str, torch.Tensor] = {}
    total = torch.zeros((), dtype=torch.float64)
    for folder in (pair.base, pair.finetuned):
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                    t = fh.get_tensor(name)
                    total += t.sum(dtype=torch.float64)
                    if folder == pair.finetuned:
                        finetuned[name] = t
    seconds = time.perf_counter() - t0
    if not torch.isfinite(total):
        raise SystemExit("bench_floor: a checkpoint holds NaN or Inf")
    return seconds, finetuned


def forward_floor(pair: Pair, state: dict[str, torch.Tensor], args: argparse.Namespace) -> float:
    """Seconds of the calibration set through the decoder, tuned blocks twice, the others once (see the module
    docstring)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from model_tailor.calibration.data import build_calibration

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config = AutoConfig.from_pretrained(pair.finetuned)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    model.to(device).eval()
    calib = build_calibration(
        pair.calibration,
        pair.finetuned,
        samples=args.texts,
        max_tokens=args.tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        model_cls=type(model),
    )
    blocks = model.model.layers
    tuned = range(len(blocks) - args.changed, len(blocks))

    def again(module: torch.nn.Module, hook_args: tuple, kwargs: dict, output: object) -> None:
        module.forward(*hook_args, **kwargs)  # forward() itself: no hooks, so no recursion

    handles = [blocks[i].register_forward_hook(again, with_kwargs=True) for i in tuned]
    try:
        with torch.no_grad():
            _sync(device)
            t0 = time.perf_counter()
            for batch in calib.batches:
                model.model(**{k: v.to(device) for k, v in batch.inputs.items()}, use_cache=False)
            _sync(device)
            return time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _child(argv: list[str], what: str) -> float:
    """Wall seconds of a child process; its output is kept out of the table, shown only on failure."""
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"bench_floor: {what} exited {proc.returncode}")
    return seconds


def tailor_seconds(pair: Pair, work: Path, args: argparse.Namespace) -> float:
    """Wall seconds of ``model-tailor tailor --save-model`` in a child; its outputs are removed afterwards."""
    argv = [sys.executable, "-m", "model_tailor", "tailor", "--base", str(pair.base), "--finetuned"]
    argv += [str(pair.finetuned), "--calibration", str(pair.calibration), "--out", str(work / "patch.safetensors")]
    argv += ["--save-model", str(work / "model"), "--density", str(args.density), "--samples", str(args.texts)]
    argv += ["--max-tokens", str(args.tokens), "--batch-size", str(args.batch_size), "--seed", str(args.seed)]
    argv += ["--device", args.device, "--dtype", args.dtype, "--quiet"]
    try:
        return _child(argv, "model-tailor tailor")
    finally:
        for p in work.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def mergekit_seconds(pair: Pair, work: Path, args: argparse.Namespace) -> float:
    """Wall seconds of mergekit's TIES merge of the pair at ``args.density`` in a child (``mergekit-yaml``)."""
    import yaml

    from model_tailor.bench.peers import merge_parameters

    model_params, global_params = merge_parameters("ties", density=args.density, weight=1.0, lam=1.0)
    config = {
        "merge_method": "ties",
        "base_model": str(pair.base),
        "models": [{"model": str(pair.finetuned), "parameters": model_params}],
        "parameters": global_params,
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    (work / "ties.yaml").write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-c", _MERGEKIT, str(work / "ties.yaml"), str(work / "merged"), "--quiet"]
    argv += ["--random-seed", str(args.seed)]
    try:
        return _child(argv, "mergekit-yaml (ties)")
    finally:
        for p in work.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def measure(args: argparse.Namespace) -> dict:
    """Every column, ``args.repeats`` times each, on the cached pair."""
    from model_tailor.bench.peers import is_available, mergekit_version

    pair = cached_pair(args)
    reads, forwards, tailors, merges, params = [], [], [], [], 0
    use_mergekit = is_available() and not args.no_mergekit
    with tempfile.TemporaryDirectory(prefix="bench-floor-", dir=args.tmp) as tmp:
        work = Path(tmp)
        for _ in range(args.repeats):
            seconds, state = read_both(pair)
            reads.append(seconds)
            params = sum(t.numel() for t in state.values())
            forwards.append(forward_floor(pair, state, args))
            del state
            tailors.append(tailor_seconds(pair, work, args))
            if use_mergekit:
                merges.append(mergekit_seconds(pair, work, args))
    read, forward, tailor = _median(reads), _median(forwards), _median(tailors)
    floor = read + forward
    ties = _median(merges) if merges else None
    return {
        "floor_seconds": floor,
        "read_seconds": read,
        "forward_seconds": forward,
        "tailor_seconds": tailor,
        "tailor_over_floor": tailor / floor,
        "mergekit_ties_seconds": ties,
        "tailor_over_ties": None if ties is None else tailor / ties,
        "mergekit": mergekit_version() if use_mergekit else None,
        "runs": {"read": reads, "forward": forwards, "tailor": tailors, "mergekit_ties": merges},
        "params": params,
        "checkpoint_bytes": sum(f.stat().st_size for f in pair.base.glob("*.safetensors")),
        "pair": str(pair.base.parent),
    }


def _shape(args: argparse.Namespace) -> bench_scale.Shape:
    return bench_scale.Shape(args.hidden, args.intermediate, args.heads, args.vocab)


def run(args: argparse.Namespace) -> dict:
    """Measure and write the JSON (``args.out``); returns what was written."""
    if not 0 < args.changed <= args.layers:
        raise SystemExit(f"bench_floor: --changed must be in [1, --layers={args.layers}], got {args.changed}")
    result = {
        "shape": asdict(_shape(args)),
        "layers": args.layers,
        "changed": args.changed,
        "texts": args.texts,
        "tokens": args.tokens,
        "batch_size": args.batch_size,
        "density": args.density,
        "device": args.device,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}",
        "load_average": list(os.getloadavg()),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        **measure(args),
    }
    if args.out:
        from model_tailor.io.atomic import atomic_write_json

        atomic_write_json(args.out, result)
    return result


def table(result: dict) -> str:
    ties, ratio = result["mergekit_ties_seconds"], result["tailor_over_ties"]
    cells = [
        f"{result['floor_seconds']:.2f}",
        f"{result['tailor_seconds']:.2f}",
        f"{result['tailor_over_floor']:.2f}",
        "-" if ties is None else f"{ties:.2f}",
        "-" if ratio is None else f"{ratio:.2f}",
    ]
    head = ["floor s", "tailor s", "tailor/floor", "mergekit TIES s", "tailor/TIES"]
    widths = [max(len(h), len(c)) for h, c in zip(head, cells, strict=True)]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(row, widths, strict=True)) for row in (head, cells))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12, help="decoder layers")
    p.add_argument("--changed", type=int, default=6, help="the last N decoder layers are fine-tuned")
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1728)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--texts", type=int, default=128, help="calibration texts (--samples of the run)")
    p.add_argument("--tokens", type=int, default=64, help="tokens per text (one word each; also --max-tokens)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass (the run's default)")
    p.add_argument("--density", type=float, default=0.1, help="density of the patch and of TIES")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="block forwards")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="measure each column this many times (median)")
    p.add_argument("--no-mergekit", action="store_true", help="skip the mergekit column")
    p.add_argument("--tmp", default=None, help="cache of the pairs and scratch space (default: system temp)")
    p.add_argument("--out", default=None, help="JSON file for the result")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    r = run(parse_args(argv))
    print(f"{r['machine']}, device {r['device']}, load average {r['load_average'][0]:.1f}")
    print(f"{r['params'] / 1e6:.1f}M parameters, {r['layers']} blocks ({r['changed']} changed), shape {r['shape']}")
    print(f"{r['texts']} texts x {r['tokens']} tokens, density {r['density']}, median of {r['repeats']}")
    print(f"floor = read {r['read_seconds']:.2f} s + forward {r['forward_seconds']:.2f} s")
    print(table(r))


if __name__ == "__main__":
    main()
