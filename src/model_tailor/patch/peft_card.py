"""The README.md model card of an exported PEFT adapter: what was tailored, density, calibration, config."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from model_tailor.patch.model import SparsePatch

if TYPE_CHECKING:  # pragma: no cover
    from model_tailor.patch.export import ExportResult

__all__ = ["adapter_card"]

_CARD = """---
{front}
---

# Model Tailor patch as a PEFT {kind} adapter

A sparse patch made by [model-tailor](https://github.com/) (Model Tailor, ICML 2024) from the fine-tuned
model `{finetuned}` against the base `{base}`, exported as a stock PEFT adapter: load it with
`peft.PeftModel.from_pretrained(base_model, "<this folder>")`. The loaded model equals
`model-tailor apply --base {base} --patch <patch>`.

## What was tailored

- patched tensors: {n_tensors} ({nnz} of {numel} entries kept, density {density:.4f})
- adapted modules ({kind}): {n_modules}{shira}
- modules stored whole (`modules_to_save`): {saved}
- tensors reset to base (nothing stored): {n_reset}
- calibration data: {calibration}

| module | {col} |
| --- | --- |
{rows}

## Configuration

The tailoring configuration recorded in the patch:

```yaml
{config}
```
"""


def adapter_card(patch: SparsePatch, result: ExportResult, base_dir: Path) -> str:
    """README.md of the adapter: provenance, density, calibration and the config, like mergekit's cards."""
    import yaml

    cfg = patch.metadata.config or {}
    summary = patch.summary()
    kind = result.peft_type
    front = yaml.safe_dump(
        {"base_model": str(base_dir), "library_name": "peft", "tags": ["model-tailor", kind.lower()]},
        sort_keys=False,
    ).strip()
    per = result.ranks or result.entries
    calib = cfg.get("calibration") or ("data-free" if cfg.get("data_free") else "not recorded")
    samples = f", {cfg['samples']} samples, seed {cfg.get('seed')}" if cfg.get("samples") else ""
    return _CARD.format(
        front=front,
        kind=kind,
        finetuned=cfg.get("finetuned", "unknown"),
        base=cfg.get("base", base_dir),
        n_tensors=len(patch.tensors),
        nnz=summary.nnz,
        numel=summary.numel,
        density=summary.density,
        n_modules=len(per),
        shira=f" (SHiRA r={result.shira_r}, zero-padded to r * (rows + cols) entries)" if result.shira_r else "",
        saved=", ".join(result.modules_to_save) or "none",
        n_reset=len(result.reset),
        calibration=f"`{calib}`{samples}",
        col="LoRA rank" if result.ranks else "sparse entries",
        rows="\n".join(f"| `{m}` | {k} |" for m, k in sorted(per.items())),
        config=yaml.safe_dump(cfg, sort_keys=True).strip() or "{}",
    )
