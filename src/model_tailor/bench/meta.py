"""TailorBench run metadata: versions, machine, the builds and pairs a run used, and the report's notes."""

from __future__ import annotations

import platform
from dataclasses import asdict
from datetime import datetime, timezone

import torch

from model_tailor import __version__
from model_tailor.bench import methods as M
from model_tailor.bench import pairs as P
from model_tailor.bench import peers
from model_tailor.bench.results import Row


def versions() -> dict[str, str]:
    import transformers

    out = {
        "model_tailor": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    if peers.is_available():
        out["mergekit"] = peers.mergekit_version()
    try:
        import peft

        out["peft"] = peft.__version__
    except ImportError:
        pass
    return out


def peer_notes(quick: bool, specs: list[M.MethodSpec]) -> list[str]:
    """The report's line about the mergekit peer rows (none when they ran or were left out by ``--methods``)."""
    if not peers.is_available():
        return [f"peers not run: mergekit is not installed ({peers.INSTALL_HINT})"]
    if quick:
        return ["peers not run: the mergekit rows run with --extended"]
    ran = sorted({s.method for s in specs if M.is_peer(s)})
    return [f"peers: {', '.join(ran)} run by mergekit {peers.mergekit_version()} on the same pair"] if ran else []


def machine(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_meta(cfg, specs: list[M.MethodSpec], rows: list[Row], builds: dict[str, dict], seconds: float) -> dict:
    """``results.json``'s ``meta``: ``build`` is the first build's (the main one unless ``--pairs`` left it out),
    ``preserve_data`` the first written, ``builds`` every build's, ``pairs`` what each pair of the rows measures."""
    notes = peer_notes(cfg.quick, specs)
    same = [
        f"{M.MethodSpec(r.method, r.density, r.params, r.pair).label} = {r.extra['same_weights_as']}"
        for r in rows
        if "same_weights_as" in r.extra and "copy_of" not in r.extra
    ]
    if same:
        notes.append("bit-identical weights, evaluated once: " + "; ".join(same))
    first = next(iter(builds.values()))
    used = dict.fromkeys(r.pair for r in rows)
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(cfg.device),
        "versions": versions(),
        "engine": cfg.engine,
        "build": first["build"],
        "builds": {
            name: {
                **b["build"],
                "preserve_data": b["preserve_data"],
                **({"second_task": b["second_task"]} if "second_task" in b else {}),
            }
            for name, b in builds.items()
        },
        "pairs": {
            name: {
                "build": P.PAIRS[name].build,
                "finetuned_anchor": P.PAIRS[name].finetuned,
                "description": P.PAIRS[name].description,
                **({"task_anchors": dict(P.PAIRS[name].task_anchors)} if P.PAIRS[name].task_anchors else {}),
                "tuned_layers": builds.get(P.PAIRS[name].build, {}).get("build", {}).get("tuned_layers"),
            }
            for name in used
        },
        "eval": asdict(cfg.eval_config()),
        "task_sizes": first["task_sizes"],
        "bootstrap": {"resamples": cfg.resamples, "seed": cfg.bootstrap_seed, "level": 0.95, "paired": True},
        "preserve_data": next((b["preserve_data"] for b in builds.values() if b["preserve_data"]), None),
        "notes": notes,
        "total_seconds": seconds,
    }
