"""``model-tailor tailor``: base + fine-tuned + calibration JSONL -> patch (+ report, + optional tailored
model).

Its option flags are generated from :class:`~model_tailor.config.TailorConfig`'s fields: one flag per field,
spelled ``--field-name``, with the field's description as help and its ``Literal`` values as choices, so a new
option is written once, in the config, and the CLI cannot drift from it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from model_tailor.commands.common import add_overwrite_option
from model_tailor.config import TailorConfig

logger = logging.getLogger(__name__)

# Fields whose flag is shared with other subcommands (one spelling, one help text everywhere).
_SHARED_FLAGS = {"overwrite": add_overwrite_option}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tailor",
        help="make a Model Tailor patch from a base and a fine-tuned checkpoint",
        description="Keep the base weights and graft back a small compensated patch of the fine-tuned delta "
        "(Model Tailor, ICML 2024). Flags override --config.",
    )
    p.add_argument("--config", help="YAML file with the same fields as the flags (unknown keys are an error)")
    add_config_flags(p)
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit before any heavy work")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no summary")
    p.set_defaults(func=run)


def flag_name(field: str) -> str:
    """``save_model`` -> ``--save-model``."""
    return "--" + field.replace("_", "-")


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per config field; every default is None ("not given") so a ``--config`` file is not overridden."""
    for name, info in TailorConfig.model_fields.items():
        if name in _SHARED_FLAGS:
            _SHARED_FLAGS[name](p, default=None)
            continue
        p.add_argument(flag_name(name), dest=name, default=None, help=_help(info), **flag_kwargs(info.annotation))


def flag_kwargs(annotation: Any) -> dict[str, Any]:
    """argparse keywords for a field type: Literal -> choices, bool -> --x/--no-x, tuple -> repeatable,
    ``X | tuple[X, ...]`` -> one or more values after the flag (one is the plain value, the config decides)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        present = [a for a in args if a is not type(None)]
        if len(present) == 1:  # ``X | None``: None is the flag's "not given"
            return flag_kwargs(present[0])
        one, many = present if len(present) == 2 else (None, None)
        if get_origin(many) is tuple and get_args(many) == (one, Ellipsis):
            return {**flag_kwargs(one), "nargs": "+"}
    elif origin is Literal:
        kinds = {type(a) for a in args}
        if len(kinds) == 1:
            return {"choices": args, "type": kinds.pop()}
    elif annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    elif annotation in (int, float, str):
        return {"type": annotation}
    elif annotation is Path:
        return {"type": str, "metavar": "PATH"}
    elif origin is tuple and len(args) == 2 and args[1] is Ellipsis and args[0] in (int, float, str):
        return {"action": "append", "type": args[0]}
    raise TypeError(f"config field type {annotation!r} has no CLI flag form; extend flag_kwargs")


def _help(info: FieldInfo) -> str:
    text = info.description or ""
    default = info.default
    if default is not PydanticUndefined and default not in (None, ()):
        text += f" (default {default})"
    return text.replace("%", "%%")  # argparse %-formats help strings


def build_config(args: argparse.Namespace) -> TailorConfig:
    given: dict[str, Any] = {
        f: getattr(args, f) for f in TailorConfig.model_fields if getattr(args, f, None) is not None
    }
    if args.config:
        return TailorConfig.from_yaml(args.config, **given)
    return TailorConfig.build(**given)


def run(args: argparse.Namespace) -> int:
    from model_tailor.errors import ConfigError
    from model_tailor.pipeline.distributed import is_primary
    from model_tailor.pipeline.run import plan_tailor, run_tailor

    cfg = build_config(args)
    speaks = is_primary()  # under torchrun, rank 0 alone prints
    if args.dry_run:
        if speaks:
            print(plan_tailor(cfg).to_text())
        return 0
    if cfg.out is None and cfg.save_model is None:
        raise ConfigError("nothing to write: pass --out PATCH (and/or --save-model DIR)")
    result = run_tailor(cfg, progress=not args.quiet and sys.stderr.isatty())
    if not args.quiet and speaks:
        print(result.report.to_text())
    return 0
