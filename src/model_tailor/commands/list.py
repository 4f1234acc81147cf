"""`model-tailor list`: show what users can pick by name (combine policies, scores, baselines, suites)."""

from __future__ import annotations

import argparse
import importlib
import json

from model_tailor.registry import Registry

# Modules that define registries.
MODULES = ("patch.combine", "kernel.scoring", "kernel.baselines")


def _registries() -> list[Registry]:
    found: list[Registry] = []
    for module in MODULES:
        try:
            mod = importlib.import_module(f"model_tailor.{module}")
        except ImportError:
            continue
        found.extend(obj for obj in vars(mod).values() if isinstance(obj, Registry) and obj not in found)
    return found


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list combine policies, scores, baselines and suites")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    registries = _registries()
    if args.json:
        data = {
            r.kind: [{"name": e.name, "reference": e.reference, "summary": e.summary} for e in r] for r in registries
        }
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    for registry in registries:
        print(f"{registry.kind}:")
        entries = list(registry)
        width = max((len(e.name) for e in entries), default=0)
        for e in entries:
            ref = f"  [{e.reference}]" if e.reference else ""
            print(f"  {e.name:<{width}}  {e.summary}{ref}")
    return 0
