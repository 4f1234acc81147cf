"""`model-tailor bench`: run TailorBench and write results.json, results.md, pareto.png and items/.

The quick variant (``make demo``) uses the same cached models as the full one; it only evaluates fewer
test items and fewer methods. The full variant runs its headline rows (``bench.pairs.HEADLINE``); ``--extended``
runs every row of the catalogue. The table is printed on stdout (the only place the bench prints).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from model_tailor.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run TailorBench (mini-LLaVA forgetting benchmark) and write a report")
    p.add_argument("--out", required=True, type=Path, help="output folder (results.json, results.md, pareto.png)")
    p.add_argument("--quick", action="store_true", help="fewer test items and methods (same cached models)")
    p.add_argument(
        "--extended",
        action="store_true",
        help="every row the bench has (ablations, density grids, every baseline, the preserve ablations) instead of "
        "the full variant's headline rows",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument(
        "--cache-dir", default=None, help="model/data cache (default $MODEL_TAILOR_CACHE or ~/.cache/model-tailor)"
    )
    p.add_argument(
        "--engine",
        choices=("pipeline", "inmemory"),
        default="pipeline",
        help="Model Tailor engine: the project pipeline (default) or the in-memory kernel fallback",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice); 1 is far faster on an oversubscribed CPU",
    )
    p.add_argument("--no-eval-cache", action="store_true", help="re-evaluate every row instead of reusing results")
    p.add_argument(
        "--resamples",
        type=int,
        default=2000,
        help="paired bootstrap resamples of the test items for the 95%% intervals (default 2000)",
    )
    p.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap resamples (default 0)")
    p.add_argument(
        "--methods",
        nargs="+",
        default=(),
        metavar="GLOB",
        help="only rows whose method or label matches (e.g. 'model_tailor*', or '*preserve=self*' for one "
        "setting; labels are method@density[params] as results.json lists them); pretrained/finetuned always run",
    )
    p.add_argument(
        "--pairs",
        nargs="+",
        default=(),
        metavar="PAIR",
        help="only rows of these pairs (main, lora_r16, all_layers, multitask; full variant) and the anchors they "
        "need (default: main and every pair with a row --methods picks; multitask only when named)",
    )
    p.add_argument(
        "--densities",
        nargs="+",
        type=float,
        default=(),
        metavar="D",
        help="only rows at these densities (rows without one, such as dense merges, stay)",
    )
    p.add_argument(
        "--ft-seed",
        type=int,
        default=0,
        metavar="N",
        help="seed of the fine-tunes' draws (default 0, the cached builds'): another value builds another fine-tune "
        "of the same pre-trained model, to see whether a row's result holds on it",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from model_tailor.bench.assets import resolve_cache_dir
    from model_tailor.bench.models import BuildConfig
    from model_tailor.bench.report import markdown_table, write_outputs
    from model_tailor.bench.runner import BenchConfig, run_bench

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device} was asked for but CUDA is not available; use --device cpu")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.resamples < 1:
        raise ConfigError(f"--resamples must be >= 1, got {args.resamples}")
    if args.quick and args.extended:
        raise ConfigError("--extended lists every row of the full-size bench; drop --quick or --extended")
    if args.ft_seed < 0:
        raise ConfigError(f"--ft-seed must be >= 0, got {args.ft_seed}")
    cfg = BenchConfig(
        build=BuildConfig(ft_seed=args.ft_seed),
        quick=args.quick,
        extended=args.extended,
        device=args.device,
        cache_dir=resolve_cache_dir(args.cache_dir),
        engine=args.engine,
        reuse_evals=not args.no_eval_cache,
        only=tuple(args.methods),
        pairs=tuple(args.pairs),
        densities=tuple(args.densities),
        resamples=args.resamples,
        bootstrap_seed=args.bootstrap_seed,
    )
    result = run_bench(cfg)
    paths = write_outputs(result, args.out)
    print(markdown_table(result))
    for note in result.meta.get("notes", []):
        print(f"note: {note}")
    print(f"wrote {paths['json']}, {paths['md']}, {paths['png']} in {result.meta['total_seconds']:.0f} s")
    return 0
