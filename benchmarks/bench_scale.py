"""Peak memory and seconds per block of ``model-tailor tailor --save-model`` on random 7B-shaped Llama pairs.

A script, not a test. For each N in ``--layers`` it builds a random Llama pair with N decoder layers from a
``LlamaConfig`` (no downloads; default shapes are Llama-2-7B's: hidden 4096, MLP 11008, 32 heads, vocab 32000),
base weights random and fine-tuned = base + a small random delta on every decoder linear, saved as bf16
safetensors one shard per layer so that building never holds more than one layer (~0.4 GB in bf16 at 7B
shapes) and one embedding matrix. It then runs the real CLI in a child process and reads the child's peak RSS
(``os.wait4``), its peak GPU memory (``--device cuda``, from ``torch.cuda.max_memory_allocated``) and the
per-block seconds of its report JSON. The table is printed and written as JSON (``--out``).

    python benchmarks/bench_scale.py --layers 1 2                     # 7B shapes: ~1 GB disk per layer, slow
    python benchmarks/bench_scale.py --layers 1 --hidden 256 --intermediate 688 --heads 4 --vocab 1000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"
_WORDS = [f"w{i}" for i in range(500)]
_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
# Runs the CLI in the child and records what only the child can see: its peak GPU memory.
_CHILD = (
    "import json, sys, torch\n"
    "from model_tailor.cli import main\n"
    "rc = main(sys.argv[2:])\n"
    "peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None\n"
    "json.dump({'rc': rc, 'peak_gpu_bytes': peak}, open(sys.argv[1], 'w'))\n"
    "sys.exit(rc)\n"
)


@dataclass(frozen=True)
class Shape:
    """The model shape; defaults are Llama-2-7B's."""

    hidden: int = 4096
    intermediate: int = 11008
    heads: int = 32
    vocab: int = 32000


@dataclass(frozen=True)
class ScaleRow:
    layers: int
    checkpoint_gb: float
    peak_rss_gb: float
    peak_anon_gb: float  # peak anonymous memory (RssAnon, sampled): RSS without the reclaimable mapped checkpoints
    peak_gpu_gb: float | None
    seconds_per_block: float
    seconds_total: float
    blocks: int


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*_SPECIALS, *_WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def _config(shape: Shape, layers: int):
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def _layer_shapes(shape: Shape, i: int) -> dict[str, tuple[int, ...]]:
    h, m, p = shape.hidden, shape.intermediate, f"model.layers.{i}."
    out: dict[str, tuple[int, ...]] = {f"{p}self_attn.{x}_proj.weight": (h, h) for x in "qkvo"}
    out.update(
        {f"{p}mlp.gate_proj.weight": (m, h), f"{p}mlp.up_proj.weight": (m, h), f"{p}mlp.down_proj.weight": (h, m)}
    )
    out.update({f"{p}input_layernorm.weight": (h,), f"{p}post_attention_layernorm.weight": (h,)})
    return out


def _shards(shape: Shape, layers: int, changed: int | None) -> list[tuple[str, dict[str, tuple[int, ...]], bool]]:
    """``(file, name -> shape, changed)`` per shard: the last ``changed`` decoder layers (all for None) change,
    embeddings and head do not."""
    outer = {"model.embed_tokens.weight": (shape.vocab, shape.hidden), "model.norm.weight": (shape.hidden,)}
    first = 0 if changed is None else layers - changed
    shards = [("embed.safetensors", outer, False)]
    shards += [(f"layer-{i:03d}.safetensors", _layer_shapes(shape, i), i >= first) for i in range(layers)]
    return [*shards, ("head.safetensors", {"lm_head.weight": (shape.vocab, shape.hidden)}, False)]


def write_pair(
    root: Path, shape: Shape, layers: int, *, seed: int = 0, delta: float = 0.002, changed: int | None = None
) -> tuple[Path, Path]:
    """Write ``root/base`` and ``root/finetuned`` (bf16, one shard at a time); returns both folders. The linears
    of the last ``changed`` decoder layers differ (every decoder layer for None)."""
    from safetensors.torch import save_file

    folders = root / "base", root / "finetuned"
    cfg, tok = _config(shape, layers), _tokenizer()
    for folder in folders:
        folder.mkdir(parents=True)
        cfg.save_pretrained(folder)
        tok.save_pretrained(folder)
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    sizes = [0, 0]
    for file, names, tuned in _shards(shape, layers, changed):
        base, ft = {}, {}
        for name, dims in names.items():
            if len(dims) == 1:
                b = torch.ones(dims)
            else:
                b = torch.randn(dims, generator=gen).mul_(dims[1] ** -0.5)
            base[name] = b.to(torch.bfloat16)
            linear = tuned and len(dims) == 2  # the decoder linears change; norms, embeddings and head do not
            ft[name] = (b.add_(torch.randn(dims, generator=gen), alpha=delta) if linear else b).to(torch.bfloat16)
            weight_map[name] = file
            del b
        for k, (folder, tensors) in enumerate(zip(folders, (base, ft), strict=True)):
            save_file(tensors, str(folder / file), metadata={"format": "pt"})
            sizes[k] += sum(t.numel() * t.element_size() for t in tensors.values())
        del base, ft
    for folder, size in zip(folders, sizes, strict=True):
        index = {"metadata": {"total_size": size}, "weight_map": weight_map}
        (folder / INDEX).write_text(json.dumps(index, indent=1))
    return folders


def write_calibration(path: Path, texts: int, words: int, seed: int = 0) -> Path:
    gen = torch.Generator().manual_seed(seed)
    with path.open("w") as fh:
        for _ in range(texts):
            ids = torch.randint(len(_WORDS), (words,), generator=gen).tolist()
            fh.write(json.dumps({"text": " ".join(_WORDS[i] for i in ids)}) + "\n")
    return path


def _anon_bytes(pid: int) -> int:
    """The process's current anonymous resident memory (``RssAnon``); 0 where /proc does not say."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_tailor(
    base: Path, ft: Path, calib: Path, work: Path, args: argparse.Namespace
) -> tuple[dict, dict, float, float]:
    """Run the CLI in a child; returns ``(child record, report JSON, peak RSS, peak anonymous memory)`` in bytes.

    Peak RSS counts the memory-mapped checkpoint pages, which the kernel reclaims under pressure; the anonymous
    peak (sampled every 0.1 s) is what the run itself must hold."""
    record = work / "child.json"
    argv = [sys.executable, "-c", _CHILD, str(record), "tailor", "--base", str(base), "--finetuned", str(ft)]
    argv += ["--calibration", str(calib), "--out", str(work / "patch.safetensors")]
    argv += ["--save-model", str(work / "model"), "--samples", str(args.texts), "--max-tokens", str(args.words)]
    argv += ["--device", args.device, "--dtype", args.dtype, "--quiet"]
    proc = subprocess.Popen(argv)
    anon = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        anon = max(anon, _anon_bytes(proc.pid))
        time.sleep(0.1)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"bench_scale: tailor exited {proc.returncode}")
    report = json.loads((work / "patch.safetensors.report.json").read_text())
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # Linux reports KiB
    return json.loads(record.read_text()), report, float(rss), float(anon)


def measure(n: int, shape: Shape, args: argparse.Namespace, root: Path) -> ScaleRow:
    """Build one N-layer pair under ``root``, tailor it, and return its row (the pair is deleted after)."""
    import shutil

    folder = root / f"n{n}"
    base, ft = write_pair(folder, shape, n, seed=args.seed)
    calib = write_calibration(folder / "calib.jsonl", args.texts, args.words, seed=args.seed)
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    t0 = time.perf_counter()
    child, report, rss, anon = run_tailor(base, ft, calib, folder, args)
    total = time.perf_counter() - t0
    per_block = [sum(layer["seconds"].values()) for layer in report["layers"]]
    shutil.rmtree(folder, ignore_errors=True)
    gpu = child.get("peak_gpu_bytes")
    return ScaleRow(
        layers=n,
        checkpoint_gb=size / 1e9,
        peak_rss_gb=rss / 1e9,
        peak_anon_gb=anon / 1e9,
        peak_gpu_gb=None if gpu is None else gpu / 1e9,
        seconds_per_block=statistics.mean(per_block) if per_block else 0.0,
        seconds_total=total,
        blocks=len(per_block),
    )


def table(rows: list[ScaleRow]) -> str:
    lines = ["layers  checkpoint GB  peak RSS GB  peak anon GB  peak GPU GB  s/block  total s"]
    for r in rows:
        gpu = "-" if r.peak_gpu_gb is None else f"{r.peak_gpu_gb:.2f}"
        lines.append(
            f"{r.layers:>6}  {r.checkpoint_gb:>13.2f}  {r.peak_rss_gb:>11.2f}  {r.peak_anon_gb:>12.2f}  {gpu:>11}  "
            f"{r.seconds_per_block:>7.1f}  {r.seconds_total:>7.1f}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    """Measure every N and write the JSON; returns what was written."""
    shape = Shape(args.hidden, args.intermediate, args.heads, args.vocab)
    if args.tmp:
        Path(args.tmp).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=args.tmp) as tmp:
        rows = [measure(n, shape, args, Path(tmp)) for n in args.layers]
    result = {
        "shape": asdict(shape),
        "device": args.device,
        "dtype": args.dtype,
        "texts": args.texts,
        "words": args.words,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}",
        "load_average": list(os.getloadavg()),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "rows": [asdict(r) for r in rows],
    }
    if args.out:
        from model_tailor.io.atomic import atomic_write_json

        atomic_write_json(args.out, result)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2], help="decoder layer counts N to measure")
    p.add_argument("--hidden", type=int, default=Shape.hidden)
    p.add_argument("--intermediate", type=int, default=Shape.intermediate)
    p.add_argument("--heads", type=int, default=Shape.heads)
    p.add_argument("--vocab", type=int, default=Shape.vocab)
    p.add_argument("--texts", type=int, default=32, help="calibration texts (--samples of the run)")
    p.add_argument("--words", type=int, default=128, help="words per text (= tokens; also --max-tokens)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="block forwards")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmp", default=None, help="where the pairs are built (default: the system temp folder)")
    p.add_argument("--out", default=None, help="JSON file for the table")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    result = run(parse_args(argv))
    print(f"{result['machine']}, device {result['device']}, load average {result['load_average'][0]:.1f}")
    print(f"shape {result['shape']}, {result['texts']} texts x {result['words']} tokens")
    print(table([ScaleRow(**r) for r in result["rows"]]))


if __name__ == "__main__":
    main()
