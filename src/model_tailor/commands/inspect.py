"""`model-tailor inspect`: show a patch file's format, provenance, density and size (thin wrapper)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from model_tailor.patch.format import FORMAT_NAME, load_patch


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show a patch file's provenance, density and size")
    p.add_argument("file", help="patch file (.safetensors)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=run)


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB"


def _share(part: int, whole: int) -> str:
    return f"{part} of {whole} ({part / whole:.1%})" if whole else f"{part} of 0"


def _task_lines(multitask: dict[str, Any]) -> list[str]:
    """A joint patch's tasks (docs/METHOD.md §12): files, records, and which tasks changed the kept entries."""
    if not multitask:
        return []
    kept, tasks = multitask["kept"], multitask["tasks"]
    lines = [
        f"joint patch of {len(tasks)} tasks; kept entries changed by 2+ tasks: {_share(multitask['shared'], kept)}"
    ]
    for i, task in enumerate(tasks, start=1):
        records = "?" if task.get("records") is None else task["records"]
        changed = "?" if task.get("kept_with_delta") is None else _share(task["kept_with_delta"], kept)
        lines.append(
            f"task {i} {task['name']}: {task['finetuned']}, calibration {task.get('calibration')} ({records} "
            f"records); kept entries it changed: {changed}"
        )
    return lines


def _count(value: Any) -> int:
    """A count from free-form stats (provenance a hand-edited file may have spoiled): 0 unless an int."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _source_lines(config: dict[str, Any], stats: dict[str, Any]) -> list[str]:
    """A combined patch's sources and where its union entries came from (``combine``, docs/METHOD.md §12)."""
    combine = config.get("combine")
    if not isinstance(combine, dict) or not isinstance(combine.get("sources"), list):
        return []
    rows = [s for s in stats.values() if isinstance(s, dict)]
    union = sum(_count(s.get("union")) for s in rows)
    per_patch = [s["per_patch"] for s in rows if isinstance(s.get("per_patch"), list)]
    how = f"{combine.get('policy')}{', re-decorated' if combine.get('redecorated') else ''}"
    lines = [
        f"combined from {len(combine['sources'])} patches ({how}); union entries covered by 2+ patches: "
        f"{_share(sum(_count(s.get('overlap')) for s in rows), union)}"
    ]
    for i, source in enumerate(combine["sources"]):
        covered = sum(_count(p[i]) for p in per_patch if len(p) > i)
        name = source.get("finetuned") if isinstance(source, dict) else None
        lines.append(f"patch {i + 1} ({name or 'unknown fine-tune'}): covers {_share(covered, union)} union entries")
    return lines


def run(args: argparse.Namespace) -> int:
    path = Path(args.file)
    patch = load_patch(path)
    meta, summary = patch.metadata, patch.summary()
    info: dict[str, Any] = {
        "file": str(path),
        "file_bytes": path.stat().st_size,
        "format": FORMAT_NAME,
        "format_version": meta.format_version,
        "created": meta.created,
        "versions": meta.versions,
        "base_fingerprint": meta.base_fingerprint,
        "config": meta.config,
        "reset_params": meta.reset_params,
        "summary": asdict(summary),
    }
    if meta.multitask:
        info["multitask"] = meta.multitask
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True, default=str))
        return 0
    print(f"{path}: {FORMAT_NAME} v{meta.format_version}, created {meta.created or '?'}")
    print("versions: " + (", ".join(f"{k} {v}" for k, v in sorted(meta.versions.items())) or "?"))
    structure = str(meta.base_fingerprint.get("structure", "none"))[:16]
    print(f"base fingerprint: {structure} ({len(meta.base_fingerprint.get('content') or {})} content hashes)")
    forced = meta.base_fingerprint.get("forced_across_bases") or []
    if forced:
        print(f"combined with --force across bases ({'; '.join(forced[:3])}): apply refuses it without --force")
    if meta.config:
        print(f"config: {json.dumps(meta.config, sort_keys=True, default=str)}")
    if meta.reset_params:
        print(f"reset to base: {len(meta.reset_params)} parameter(s)")
    for line in _task_lines(meta.multitask) + _source_lines(meta.config, meta.stats):
        print(line)
    for title, rows in (("tensor", summary.per_tensor), ("layer", summary.per_layer)):
        width = max((len(n) for n in rows), default=len(title))
        print(f"\n{title:<{width}}  {'kept':>12}  {'numel':>12}  {'density':>8}")
        for name, row in rows.items():
            print(f"{name:<{width}}  {row['nnz']:>12}  {row['numel']:>12}  {row['density']:>8.2%}")
    ratio = summary.patch_bytes / summary.dense_bytes if summary.dense_bytes else 0.0
    print(
        f"\ntotal: {summary.nnz} of {summary.numel} entries kept ({summary.density:.2%}); "
        f"patch {_mb(summary.patch_bytes)} (file {_mb(info['file_bytes'])}) vs dense delta "
        f"{_mb(summary.dense_bytes)} ({ratio:.1%})"
    )
    return 0
