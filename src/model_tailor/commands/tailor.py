"""``model-tailor tailor``: base + fine-tuned + calibration JSONL -> patch (+ report, + optional tailored
model)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from model_tailor.config import TailorConfig
from model_tailor.pipeline.run import plan_tailor, run_tailor

logger = logging.getLogger(__name__)

# flag -> config field; None defaults mean "not given" so a --config file is not overridden.
_FIELDS = (
    "base",
    "finetuned",
    "calibration",
    "out",
    "save_model",
    "density",
    "alpha",
    "granularity",
    "compensation",
    "sensitivity",
    "mask_timing",
    "block_size",
    "percdamp",
    "samples",
    "max_tokens",
    "batch_size",
    "seed",
    "device",
    "dtype",
    "include",
    "exclude",
    "non_target_policy",
    "overwrite",
    "max_shard_bytes",
    "preserve",
    "preserve_weight",
    "preserve_samples",
    "preserve_max_new_tokens",
    "structure",
    "salience_from",
    "cache_dir",
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tailor",
        help="make a Model Tailor patch from a base and a fine-tuned checkpoint",
        description="Keep the base weights and graft back a small compensated patch of the fine-tuned delta "
        "(Model Tailor, ICML 2024). Flags override --config.",
    )
    p.add_argument("--config", help="YAML file with the same fields as the flags (unknown keys are an error)")
    p.add_argument("--base", help="pre-trained model folder")
    p.add_argument("--finetuned", help="fine-tuned model folder (its tokenizer/processor render the calibration)")
    p.add_argument("--calibration", help="JSONL of target-task records: text | prompt/response | messages (+image)")
    p.add_argument("--out", help="patch file to write (.safetensors); the report goes to <out>.report.json")
    p.add_argument("--save-model", dest="save_model", help="also write the full tailored model to this folder")
    p.add_argument("--density", type=float, help="fraction of the delta kept (default 0.1)")
    p.add_argument("--alpha", type=float, help="fusion weight of salience vs sensitivity (default 0.8)")
    p.add_argument("--granularity", choices=("block", "row", "tensor", "global"))
    p.add_argument("--compensation", choices=("obs", "official", "none", "exact"))
    p.add_argument("--sensitivity", choices=("weight", "revert"))
    p.add_argument("--mask-timing", dest="mask_timing", choices=("adaptive", "upfront"))
    p.add_argument("--block-size", dest="block_size", type=int)
    p.add_argument("--percdamp", type=float)
    p.add_argument("--samples", type=int, help="calibration sequences (default 128)")
    p.add_argument("--max-tokens", dest="max_tokens", type=int, help="token cap per sequence (default 512)")
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="dtype of block forwards")
    p.add_argument("--include", action="append", help="glob over parameter names to target (repeatable)")
    p.add_argument("--exclude", action="append", help="glob over parameter names to leave out (repeatable)")
    p.add_argument("--non-target-policy", dest="non_target_policy", choices=("reset", "keep", "tailor"))
    p.add_argument(
        "--preserve",
        help="original-ability data: a JSONL file (calibration record forms) or 'self' (the base model answers "
        "shipped generic instructions); adds lambda ||(W - W_pre) X_o||^2 to each layer's objective",
    )
    p.add_argument("--preserve-weight", dest="preserve_weight", type=float, help="lambda >= 0 (default 1.0)")
    p.add_argument("--preserve-samples", dest="preserve_samples", type=int, help="preserve records (default 64)")
    p.add_argument(
        "--preserve-max-new-tokens", dest="preserve_max_new_tokens", type=int, help="answer length for 'self'"
    )
    p.add_argument(
        "--structure",  # no argparse choices: the config validates it and fails with one line
        help="sparse | lowrank | sparse+lowrank: patch structure under one parameter budget "
        "(density * rows * cols parameters; a rank-r pair costs r * (rows + cols))",
    )
    p.add_argument("--salience-from", dest="salience_from", help="delta | target: what salience ranks")
    p.add_argument("--cache-dir", dest="cache_dir", help="cache of --preserve self ($MODEL_TAILOR_CACHE)")
    p.add_argument(
        "--max-shard-bytes",
        dest="max_shard_bytes",
        type=int,
        help="--save-model shard size; peak memory while saving holds one shard (default 2e9)",
    )
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing --save-model folder")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit before any heavy work")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no summary")
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> TailorConfig:
    given: dict[str, Any] = {f: getattr(args, f) for f in _FIELDS if getattr(args, f, None) is not None}
    if args.config:
        return TailorConfig.from_yaml(args.config, **given)
    return TailorConfig.build(**given)


def run(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    if args.dry_run:
        print(plan_tailor(cfg).to_text())
        return 0
    if cfg.out is None and cfg.save_model is None:
        from model_tailor.errors import ConfigError

        raise ConfigError("nothing to write: pass --out PATCH (and/or --save-model DIR)")
    result = run_tailor(cfg, progress=not args.quiet and sys.stderr.isatty())
    if not args.quiet:
        print(result.report.to_text())
    return 0
