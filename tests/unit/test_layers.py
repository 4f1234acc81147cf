"""The dependency direction of docs/ARCHITECTURE.md, read from the source with ``ast`` (nothing is imported).

kernel/ is pure tensors: it imports none of the outer layers and not transformers. patch/ is the artifact: it may
use the kernel and io/, never the model run (pipeline/), the bench, the CLI commands or transformers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import model_tailor

PACKAGE = Path(model_tailor.__file__).parent

FORBIDDEN = {
    "kernel": (
        "model_tailor.patch",
        "model_tailor.pipeline",
        "model_tailor.bench",
        "model_tailor.commands",
        "model_tailor.calibration",
        "transformers",
    ),
    "patch": ("model_tailor.pipeline", "model_tailor.bench", "model_tailor.commands", "transformers"),
}


def imported_modules(source: str, module: str) -> set[str]:
    """Absolute names of every module ``source`` imports (relative imports resolved against ``module``)."""
    names: set[str] = set()
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                prefix = f"{base}.{node.module}" if node.module else base
            else:
                prefix = node.module or ""
            names.add(prefix)
            names.update(f"{prefix}.{alias.name}" for alias in node.names)
    return names


def violations(layer: str) -> list[str]:
    found = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts)
        for name in sorted(imported_modules(path.read_text(encoding="utf-8"), module)):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[layer]):
                found.append(f"{module} imports {name}")
    return found


def test_imported_modules_reads_every_import_form() -> None:
    src = "import transformers.models\nfrom ..pipeline import run\nfrom . import masking\nfrom torch import nn\n"
    got = imported_modules(src, "model_tailor.kernel.tailor")
    assert {"transformers.models", "model_tailor.pipeline", "model_tailor.pipeline.run"} <= got
    assert {"model_tailor.kernel.masking", "torch.nn"} <= got


def test_a_forbidden_import_is_caught() -> None:
    # The checker itself must see a violation, or the layer tests below would pass vacuously.
    names = imported_modules("from model_tailor.pipeline.run import run_tailor\n", "model_tailor.kernel.x")
    assert any(n.startswith(FORBIDDEN["kernel"][1]) for n in names)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_point_inwards(layer: str) -> None:
    assert list((PACKAGE / layer).rglob("*.py")), f"{layer}/ has no modules"
    assert violations(layer) == []
