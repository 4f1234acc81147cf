"""TailorConfig: every option of ``model-tailor tailor``, validated once (pydantic v2, frozen, extra=forbid).

The defaults are the corrected method (see docs/METHOD.md): the OBS update with its proper sign, a zero (not
NaN) z-score on flat rows, exact keep counts, masks and positions applied while replaying calibration data,
and changed tensors outside the targets reset to base. YAML files hold the same fields as the CLI flags (the
``tailor`` flags are generated from these fields and their descriptions); an unknown key is an error, never
ignored.
The allowed values of choice options live in :mod:`model_tailor.options`, shared with the kernel. ``preset``
names a partial config (:data:`PRESETS`) applied under every explicit value, so the paper's method stays one
switch away when the defaults move.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from model_tailor.errors import ConfigError
from model_tailor.options import (
    DEFAULT_MAX_SHARD_BYTES,
    IMAGE_PROMPTS,
    SELF_PRESERVE_MODES,
    Compensation,
    DType,
    Granularity,
    MaskTiming,
    NonTargetPolicy,
    Preset,
    Salience,
    SalienceSource,
    Sensitivity,
    Structure,
    default_cache_dir,
)

__all__ = ["PRESETS", "TailorConfig", "first_compensated", "format_validation_error"]

# lambda of the preserve-aware objective; 0.3-1 worked at density 0.1 in the first measurements. One constant,
# so the default moves in one place once the bench grid settles it.
DEFAULT_PRESERVE_WEIGHT = 1.0

# Named partial configs, applied before explicit values (a YAML key or a flag wins over its preset). Values are
# written out, never read from the defaults: "paper" is Model Tailor as the paper describes it (docs/METHOD.md
# §2-§9, with the corrections of §16); tests/unit/test_config_preset.py pins it, and it stays so when the defaults
# change.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "density": 0.1,
        "alpha": 0.8,
        "granularity": "block",
        "compensation": "obs",
        "sensitivity": "weight",
        "mask_timing": "adaptive",
        "guard": True,
        "group_modules": True,
        "block_size": 128,
        "percdamp": 0.01,
        "samples": 128,
        "max_tokens": 512,
        "include": (),
        "exclude": (),
        "non_target_policy": "reset",
        "preserve": None,
        "structure": "sparse",
        "salience_from": "delta",
        "salience": "magnitude",
        "compensation_from": 0,
        "compensation_depth": 1.0,
    },
    # The best data-free method TailorBench has measured on both of its pairs (README, 2026-12-08): the base model's
    # own answers as preserve data, the patch fitted as low-rank factors at lambda 3 in the deepest 40% of the layers
    # and plain salience-only selection below. Its other options are the defaults.
    "self-lowrank": {
        "preserve": "self",
        "structure": "lowrank",
        "preserve_weight": 3.0,
        "compensation_depth": 0.4,
        "alpha": 1.0,
    },
}


def first_compensated(length: int, compensation_from: int = 0, compensation_depth: float = 1.0) -> int:
    """Index of the first compensated block of a block list of ``length`` blocks: the later of
    ``compensation_from`` and the start of its deepest ``ceil(compensation_depth * length)`` blocks (at least one).
    The product is rounded to 9 digits first, so 0.4 x 30 is 12 blocks, not 13."""
    deep = max(1, math.ceil(round(compensation_depth * length, 9)))
    return max(compensation_from, length - deep)


class TailorConfig(BaseModel):
    """Resolved options of one tailoring run. Paths are stored as given; the pipeline resolves them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    preset: Preset | None = Field(
        None,
        description="named option set applied under every explicit flag or config key: paper (the paper's method: "
        "sparse OBS-compensated patch, no preserve term), self-lowrank (the base model's own answers as preserve "
        "data, low-rank factors at lambda 3 in the deepest 40% of the layers, salience-only selection below; "
        "see README)",
    )
    base: Path = Field(description="pre-trained model folder")
    # Several fine-tunes of the base make one joint patch (docs/METHOD.md §12): a list, one calibration file each
    # (or one shared by all); a single value is the plain run.
    finetuned: Path | tuple[Path, ...] = Field(
        description="fine-tuned model folder (its tokenizer/processor render the calibration); several give one "
        "joint multi-task patch"
    )
    calibration: Path | tuple[Path, ...] | None = Field(
        None,
        description="JSONL of target-task records: text | prompt/response | messages (+image); with several "
        "fine-tunes one file each, in their order, or one shared by all",
    )
    out: Path | None = Field(
        None, description="patch file to write (.safetensors); the report goes to <out>.report.json"
    )
    save_model: Path | None = Field(None, description="also write the full tailored model to this folder")
    density: float = Field(0.1, gt=0, le=1, description="fraction of the delta kept in the patch, in (0, 1]")
    alpha: float = Field(
        0.8, ge=0, le=1, description="fusion weight of salience vs sensitivity (1 = salience only), in [0, 1]"
    )
    granularity: Granularity = Field(
        "block",
        description="group within which the kept fraction is exact: block (of block_size columns), row, tensor, "
        "or global (one threshold on salience over all targets)",
    )
    compensation: Compensation = Field(
        "obs",
        description="how kept weights absorb the reverted ones: obs (OBS sweep), official (the paper code's "
        "sign), none, exact (per-row solve)",
    )
    sensitivity: Sensitivity = Field(
        "weight", description="OBS cost scored: of the fine-tuned weight (weight) or of reverting it to base (revert)"
    )
    mask_timing: MaskTiming = Field(
        "adaptive", description="select the mask block by block as compensation moves weights, or all upfront"
    )
    guard: bool = Field(
        True,
        description="keep a tensor's plainly masked weights when they reconstruct its layer output better than the "
        "compensated ones",
    )
    group_modules: bool = Field(
        True,
        description="tailor modules that share one input (q/k/v, gate/up) with one factorisation and one sweep; "
        "the per-module result to fp32 rounding (sparse runs without preserve; others go one module at a time)",
    )
    block_size: int = Field(
        128, gt=0, description="column block width of the scores, the block granularity and the sweep"
    )
    percdamp: float = Field(0.01, ge=0, description="Hessian damping, as a fraction of its mean diagonal")
    # Counts are sequences, not batches, and tokens are capped explicitly (never max_position_embeddings).
    samples: int = Field(128, gt=0, description="calibration sequences used")
    max_tokens: int = Field(512, gt=0, description="token cap per calibration sequence")
    batch_size: int = Field(4, gt=0, description="sequences per forward pass")
    seed: int = Field(0, description="seed of calibration sampling and of 'self' generations")
    device: str = Field("cpu", description="cpu, cuda or cuda:N")
    dtype: DType = Field("float32", description="dtype of block forwards")
    include: tuple[str, ...] = Field((), description="glob over parameter names to target (repeatable)")
    exclude: tuple[str, ...] = Field((), description="glob over parameter names to leave out (repeatable)")
    non_target_policy: NonTargetPolicy = Field(
        "reset", description="what happens to changed tensors that are not targets: reset to base, keep, or tailor"
    )
    # Preserve-aware tailoring: lambda weighs ||(W - W_pre) X_o||^2 on original-ability inputs X_o.
    preserve: str | None = Field(
        None,
        description="original-ability data: a JSONL file (calibration record forms), 'self' (the base model "
        "answers the calibration inputs and shipped generic instructions) or 'self-generic' (the shipped "
        "instructions only); adds lambda ||(W - W_pre) X_o||^2 to each layer's objective",
    )
    preserve_weight: float = Field(
        DEFAULT_PRESERVE_WEIGHT, ge=0, allow_inf_nan=False, description="lambda of the preserve term, >= 0"
    )
    preserve_samples: int = Field(
        64, gt=0, description="preserve records used from a file; generic instructions answered for 'self'"
    )
    preserve_max_new_tokens: int = Field(48, gt=0, description="answer length the base generates for 'self'")
    preserve_calibration_records: int = Field(
        32, gt=0, description="calibration records (a seeded sample) whose inputs the base answers for 'self'"
    )
    preserve_image_prompts: int = Field(
        2,
        gt=0,
        le=len(IMAGE_PROMPTS),
        description=f"generic prompts the base answers about each calibration image for 'self' (a seeded choice "
        f"of {len(IMAGE_PROMPTS)} fixed ones)",
    )
    # One parameter budget (density * rows * cols; a rank-r pair costs r * (rows + cols)). Low-rank factors are
    # fitted in closed form whatever ``compensation`` says; it applies to the sparse part.
    structure: Structure = Field(
        "sparse",
        description="patch structure under one parameter budget (density * rows * cols parameters; a rank-r "
        "pair costs r * (rows + cols))",
    )
    salience_from: SalienceSource = Field(
        "delta", description="what salience ranks: |finetuned - base| or |target - base|"
    )
    salience: Salience = Field(
        "magnitude",
        description="how salience scores a change: magnitude |delta| (the paper) or fapm, "
        "|delta| - mean|W_pre|*|delta|/|W_pre| (a change large against its own pre-trained weight ranks lower)",
    )
    compensation_from: int = Field(
        0,
        ge=0,
        description="layer index (counted in each block list) where compensation starts; the layers before it are "
        "plain: a sparse patch of fine-tuned values (no compensation, preserve term or low-rank structure)",
    )
    compensation_depth: float = Field(
        1.0,
        gt=0,
        le=1,
        description="fraction of each block list's layers, the deepest ones, that are compensated (ceil(depth x "
        "layers) of them, at least one); the shallower ones are plain, as before compensation_from. 1: every "
        "layer. With compensation_from, a layer is compensated only where both allow it",
    )
    cache_dir: Path = Field(
        default_factory=default_cache_dir,
        description="cache of --preserve self (default $MODEL_TAILOR_CACHE or ~/.cache/model-tailor)",
    )
    max_shard_bytes: int = Field(
        DEFAULT_MAX_SHARD_BYTES, gt=0, description="--save-model shard size; saving holds about one shard in memory"
    )
    overwrite: bool = Field(False, description="replace an existing output")
    allow_outside_paths: bool = Field(
        False, description="let image paths in calibration/preserve files point outside the file's folder"
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        head, _, index = value.partition(":")
        if head not in ("cpu", "cuda") or (index and not index.isdigit()) or (head == "cpu" and index):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {value!r}")
        return value

    @field_validator("include", "exclude", mode="before")
    @classmethod
    def _as_tuple(cls, value: Any) -> Any:
        if isinstance(value, str):
            return (value,)
        return tuple(value) if isinstance(value, list) else value

    @field_validator("finetuned", "calibration", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        """A list of one is that one value (the plain run); two or more are a tuple (multi-task)."""
        if isinstance(value, (list, tuple)):
            if not value:
                raise ValueError("needs at least one path")
            return value[0] if len(value) == 1 else tuple(value)
        return value

    @model_validator(mode="after")
    def _check_tasks(self) -> TailorConfig:
        """Several fine-tunes: one calibration file each (or one shared), and only the options the joint objective
        defines (docs/METHOD.md §12)."""
        n_ft, calib = len(self.finetuned_paths), self.calibration
        n_cal = len(calib) if isinstance(calib, tuple) else 1
        if n_cal > 1 and n_cal != n_ft:
            raise ValueError(
                f"calibration: {n_cal} files for {n_ft} fine-tuned checkpoint(s); give one file per fine-tune, in "
                "the same order, or one file shared by all"
            )
        if n_ft == 1:
            return self
        refused = {
            "the data-free mode (alpha=1 with compensation=none)": self.data_free,
            "granularity 'global' (it ranks each delta before any Hessian)": self.granularity == "global",
            f"non_target_policy {self.non_target_policy!r} (it needs one fine-tuned value per tensor)": (
                self.non_target_policy != "reset"
            ),
            f"preserve {self.preserve!r} (it generates from one calibration file)": self.self_preserve,
        }
        for what, bad in refused.items():
            if bad:
                raise ValueError(f"several fine-tuned checkpoints (a joint patch) cannot use {what}")
        return self

    @property
    def finetuned_paths(self) -> tuple[Path, ...]:
        """Every fine-tuned checkpoint, in task order (one for the plain run)."""
        return self.finetuned if isinstance(self.finetuned, tuple) else (self.finetuned,)

    @property
    def calibration_paths(self) -> tuple[Path | None, ...]:
        """The calibration file of each fine-tune, in task order (a shared file repeated)."""
        calib = self.calibration
        return calib if isinstance(calib, tuple) else (calib,) * len(self.finetuned_paths)

    @property
    def multitask(self) -> bool:
        """Several fine-tunes, one joint patch (docs/METHOD.md §12)."""
        return isinstance(self.finetuned, tuple)

    @model_validator(mode="after")
    def _check_combination(self) -> TailorConfig:
        if self.calibration is None and not self.data_free:
            raise ValueError(
                "calibration data is required; only the data-free mode (alpha=1 with compensation=none) runs without it"
            )
        if self.data_free and self.preserve is not None:
            raise ValueError(
                "preserve needs the per-layer Hessians of calibration data; the data-free mode (alpha=1 with "
                "compensation=none) has none: drop preserve or pass calibration data with another alpha"
            )
        if self.data_free and self.structure != "sparse":
            raise ValueError(
                f"structure {self.structure!r} fits its low-rank factors to the calibration Hessian; the "
                "data-free mode has none: use structure=sparse"
            )
        if self.granularity == "global" and self.structure != "sparse":
            raise ValueError(
                f"granularity 'global' fixes a sparse mask per tensor before tailoring; it cannot share a budget "
                f"with low-rank factors (structure {self.structure!r}): use granularity block/row/tensor"
            )
        return self

    @field_validator("preserve")
    @classmethod
    def _check_preserve(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("preserve must be a JSONL file path, 'self' or 'self-generic', got an empty string")
        return value

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        """Preset values fill the fields the caller did not give; an unknown name is left to the Literal check."""
        if isinstance(data, dict) and data.get("preset") in PRESETS:
            return {**PRESETS[data["preset"]], **data}
        return data

    @property
    def self_preserve(self) -> bool:
        """``preserve`` is ``self`` or ``self-generic``: the base model generates the preserve data."""
        return self.preserve in SELF_PRESERVE_MODES

    @property
    def data_free(self) -> bool:
        """Salience-only, uncompensated tailoring needs no calibration data (a baseline, not Model Tailor)."""
        return self.alpha == 1.0 and self.compensation == "none"

    @classmethod
    def build(cls, **fields: Any) -> TailorConfig:
        """Validate ``fields``; a failure becomes a one-line :class:`ConfigError` naming the field."""
        try:
            return cls(**fields)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err)) from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], **overrides: Any) -> TailorConfig:
        """Read ``path`` (a YAML mapping of fields); ``overrides`` (e.g. CLI flags) win over the file."""
        import yaml

        file = Path(path)
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except OSError as err:
            raise ConfigError(f"config file {str(file)!r} cannot be read ({err.strerror})") from None
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"config file {str(file)!r} is not UTF-8 text (byte {err.start}); save it as UTF-8 YAML"
            ) from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(file)!r} is not valid YAML ({' '.join(str(err).split())})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(file)!r} must hold a mapping of option: value")
        data = {str(k).replace("-", "_"): v for k, v in data.items()}
        for key in ("base", "finetuned", "calibration", "out", "save_model", "preserve", "cache_dir"):
            # Relative paths in a YAML file resolve against the file's folder, not the working directory.
            if key == "preserve" and data.get(key) in SELF_PRESERVE_MODES:
                continue
            if isinstance(data.get(key), str) and not Path(data[key]).is_absolute():
                data[key] = str(file.parent / data[key])
            elif isinstance(data.get(key), list):  # several fine-tunes / calibration files
                data[key] = [_beside(file, v) for v in data[key]]
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.build(**data)

    def fingerprint(self) -> str:
        """Hash of every option that changes the patch (not output paths): keys the resume work dir."""
        fields = self.model_dump(
            mode="json", exclude={"out", "save_model", "overwrite", "max_shard_bytes", "cache_dir", "preset"}
        )
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _beside(file: Path, value: Any) -> Any:
    """A relative path string of a YAML file, resolved against the file's folder."""
    return str(file.parent / value) if isinstance(value, str) and not Path(value).is_absolute() else value


def format_validation_error(err: ValidationError) -> str:
    """One line: ``field: problem; field: problem``."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown option (allowed: {', '.join(sorted(TailorConfig.model_fields))})"
        parts.append(f"{loc}: {msg}")
    return "invalid tailor config: " + "; ".join(parts)
