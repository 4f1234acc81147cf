"""The bench's ``--engine inmemory`` fallback: Hessians from one hooked pass, then the kernel per linear.

Simpler than the project pipeline on purpose (no layer-sequential replay, docs/METHOD.md, D17:
one hooked pass instead): the inputs of every decoder linear in the tuned layers are caught with forward hooks while the
fine-tuned model reads the calibration set once, teacher-forced on prompt + response with padding excluded.
It exists to measure the bench before the pipeline lands and as a cross-check afterwards.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from model_tailor.bench.data import Example, PixelCache, collate_train
from model_tailor.bench.models import load_model
from model_tailor.config import first_compensated
from model_tailor.kernel.hessian import HessianAccumulator
from model_tailor.kernel.tailor import tailor_weight

log = logging.getLogger(__name__)

_LAYER = re.compile(r"^model\.language_model\.layers\.(\d+)\.")


def _layer_of(name: str) -> int | None:
    """The decoder layer index of a module or parameter name; None outside the decoder layers."""
    m = _LAYER.match(name)
    return None if m is None else int(m.group(1))


def read_calibration(path: Path, limit: int | None = None) -> list[Example]:
    """Prompt/response/image JSONL records (calibration or preserve data) as examples; the first ``limit``."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [
        Example(r["prompt"], path.parent / r["image"] if r.get("image") else None, r["response"]) for r in rows[:limit]
    ]


@dataclass
class InMemoryTailor:
    hessians: dict[str, torch.Tensor]  # weight name -> (cols, cols) fp32
    seconds: float
    layers: int  # decoder layers of the model (compensation_depth counts from its last)

    @classmethod
    def collect(cls, inputs: object, batch_size: int = 8) -> InMemoryTailor:
        t0 = time.perf_counter()
        model, processor = load_model(inputs.finetuned, inputs.device)
        image_tokens = model.config.image_seq_length
        accs: dict[str, HessianAccumulator] = {}
        mask_box: dict[str, torch.Tensor] = {}
        handles = []
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and _layer_of(name) in inputs.tuned_layers:
                acc = accs[f"{name}.weight"] = HessianAccumulator(module.in_features, name=f"{name}.weight")

                def hook(_mod, args, _out, acc=acc):
                    acc.add(args[0].detach(), mask_box["mask"])

                handles.append(module.register_forward_hook(hook))
        examples = read_calibration(inputs.calibration, inputs.num_samples)
        pixels = PixelCache(processor.image_processor)
        try:
            with torch.no_grad():
                for start in tqdm(
                    range(0, len(examples), batch_size), desc="calibration (in-memory)", unit="batch", leave=False
                ):
                    batch = collate_train(
                        processor.tokenizer, examples[start : start + batch_size], pixels, image_tokens
                    )
                    batch = {k: v.to(inputs.device) for k, v in batch.items()}
                    mask_box["mask"] = batch["attention_mask"].bool()
                    model.model(
                        input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"],
                        pixel_values=batch.get("pixel_values"),
                    )
        finally:
            for h in handles:
                h.remove()
        hessians = {n: a.hessian.clone() for n, a in accs.items()}
        seconds = time.perf_counter() - t0
        log.info("in-memory calibration: %d linears, %.1f s", len(hessians), seconds)
        return cls(hessians, seconds, model.config.text_config.num_hidden_layers)

    def tailor(
        self,
        base: Mapping[str, torch.Tensor],
        finetuned: Mapping[str, torch.Tensor],
        *,
        density: float,
        alpha: float,
        compensation: str,
        sensitivity: str = "weight",
        guard: bool = True,
        salience: str = "magnitude",
        compensation_from: int = 0,
        compensation_depth: float = 1.0,
    ) -> tuple[dict[str, torch.Tensor], dict]:
        """Tailored weights of every hooked linear, and a summary (kept entries, reconstruction errors).
        ``compensation_from``, ``compensation_depth``: the layers before ``config.first_compensated`` of the
        decoder's ``self.layers`` are not compensated, as in the pipeline."""
        first = first_compensated(self.layers, compensation_from, compensation_depth)
        out: dict[str, torch.Tensor] = {}
        kept = numel = 0
        err_masked = err_comp = 0.0
        for name in tqdm(sorted(self.hessians), desc=f"tailor {density:g}", unit="linear", leave=False):
            layer = _layer_of(name)
            assert layer is not None, name  # every hooked linear is in a decoder layer
            tw = tailor_weight(
                base[name],
                finetuned[name],
                self.hessians[name],
                density=density,
                alpha=alpha,
                compensation=compensation if layer >= first else "none",
                sensitivity=sensitivity,
                guard=guard,
                salience=salience,
                name=name,
            )
            out[name] = tw.weight
            kept += tw.stats.kept
            numel += tw.stats.numel
            err_masked += tw.stats.error_masked or 0.0
            err_comp += tw.stats.error_compensated or 0.0
        summary = {
            "tensors": len(out),
            "kept": kept,
            "numel": numel,
            "density": kept / max(1, numel),
            "error_masked": err_masked,
            "error_compensated": err_comp,
        }
        return out, summary
