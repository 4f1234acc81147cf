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
