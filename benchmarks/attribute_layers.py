"""Where does TailorBench's forgetting live? Graft one slice of a delta onto the pre-trained model at a time.

A script, not a test. For each tuned decoder layer, the projector, and the attention / MLP halves of all tuned
layers, it evaluates ``base + delta restricted to that slice`` on the bench's tasks and reports retention and
target ratio against the pre-trained and fine-tuned anchors, like the bench. ``delta`` is the full fine-tune
(``finetuned - base``) and, with ``--patch FILE``, also a Model Tailor patch's delta (``apply(base, patch) -
base``), so one run shows which layers carry the new task, which carry the forgetting, and where a patch pays
retention for its target gain. Uses the bench's cached models (built on first use, like ``model-tailor bench``).

    python benchmarks/attribute_layers.py --out DIR                     # quick subsets, full fine-tune delta
    python benchmarks/attribute_layers.py --patch P.safetensors --out DIR
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from model_tailor.bench.assets import resolve_cache_dir
from model_tailor.bench.data import PixelCache
from model_tailor.bench.models import BuildConfig, build_models, load_model
from model_tailor.bench.runner import harmonic
from model_tailor.bench.tasks import ORIGINAL_TASKS, TARGET_TASKS, EvalConfig, build_tasks, evaluate
from model_tailor.io.checkpoint import CheckpointReader
from model_tailor.patch.format import load_patch
from model_tailor.pipeline.architectures import checkpoint_names

LAYER = re.compile(r"\.layers\.(\d+)\.")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def slices(names: list[str]) -> dict[str, list[str]]:
    """Slice label -> the changed tensor names it covers (each tuned layer, the projector, attention, MLP)."""
    out: dict[str, list[str]] = {}
    for n in names:
        if (m := LAYER.search(n)) and "language_model" in n:
            out.setdefault(f"layer {int(m.group(1)):02d}", []).append(n)
        elif "multi_modal_projector" in n:
            out.setdefault("projector", []).append(n)
    out = dict(sorted(out.items()))
    out["attention (all tuned layers)"] = [n for n in names if any(f".{k}." in n for k in ATTENTION)]
    out["mlp (all tuned layers)"] = [n for n in names if any(f".{k}." in n for k in MLP)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--patch", type=Path, default=None, help="also attribute this Model Tailor patch's delta")
    parser.add_argument("--full", action="store_true", help="the bench's full test subsets (default: quick)")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    t_start = time.perf_counter()
    built = build_models(BuildConfig(), resolve_cache_dir(args.cache_dir), args.device)
    ecfg = EvalConfig() if args.full else EvalConfig.quick()
    tasks = build_tasks(ecfg)
    model, processor = load_model(built.pretrained, args.device)
    pixels = PixelCache(processor.image_processor)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ft_model, _ = load_model(built.finetuned, "cpu")
    finetuned = {k: v.detach().to(args.device) for k, v in ft_model.state_dict().items()}
    del ft_model
    names = sorted(n for n in base if n in finetuned and not torch.equal(base[n], finetuned[n]))
    deltas = {"finetune": {n: finetuned[n] - base[n] for n in names}}
    if args.patch is not None:
        with CheckpointReader(built.pretrained) as reader:
            to_ckpt = checkpoint_names(model, names, set(reader.names()))
        patched = load_patch(args.patch).apply_to_state_dict({to_ckpt[n]: base[n] for n in names})
        deltas["patch"] = {n: patched[to_ckpt[n]].to(args.device) - base[n] for n in names}

    def score(overrides: dict[str, torch.Tensor], label: str) -> dict:
        model.load_state_dict(overrides, strict=False)
        result = evaluate(model, processor, tasks, pixels, ecfg, model.config.image_seq_length, label=label)
        model.load_state_dict({n: base[n] for n in names}, strict=False)
        return {
            "original": sum(result.scores[t] for t in ORIGINAL_TASKS) / len(ORIGINAL_TASKS),
            "target": sum(result.scores[t] for t in TARGET_TASKS) / len(TARGET_TASKS),
            "scores": result.scores,
        }

    pre = score({n: base[n] for n in names}, "pretrained")
    ft = score({n: finetuned[n] for n in names}, "finetuned")
    rows = []
    for source, delta in deltas.items():
        for label, covered in [("all", names), *slices(names).items()]:
            r = score({n: base[n] + delta[n] for n in covered}, f"{source} {label}")
            retention, ratio = r["original"] / pre["original"], r["target"] / ft["target"]
            energy = sum(d.pow(2).sum().item() for d in delta.values())
            share = sum(delta[n].pow(2).sum().item() for n in covered) / energy
            rows.append(
                {
                    "delta": source,
                    "slice": label,
                    "tensors": len(covered),
                    "delta_energy_share": share,
                    "retention": retention,
                    "target_ratio": ratio,
                    "h": harmonic(retention, ratio),
                    **r,
                }
            )
            print(
                f"{source:8s} {label:30s} energy {share:.3f}  retention {retention:.3f}  target {ratio:.3f}", flush=True
            )
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "device": args.device,
        "eval": ecfg.__dict__,
        "patch": None if args.patch is None else str(args.patch),
        "build_key": BuildConfig().key(),
        "anchors": {"pretrained": pre, "finetuned": ft},
        "seconds": time.perf_counter() - t_start,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attribution.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "| delta | slice | tensors | share of ‖delta‖² | retention | target ratio | H |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['delta']} | {r['slice']} | {r['tensors']} | {r['delta_energy_share']:.3f} "
        f"| {r['retention']:.3f} | {r['target_ratio']:.3f} | {r['h']:.3f} |"
        for r in rows
    ]
    (args.out / "attribution.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
