"""TailorConfig: every option of ``model-tailor tailor``, validated once (pydantic v2, frozen, extra=forbid).

Defaults are the corrected behaviour of METHOD.md §16 (OBS sign, z = 0 on flat rows, exact keep counts,
masks and positions during replay, reset of non-target tuned tensors). YAML files hold the same fields as the
CLI flags; an unknown key is an error, never ignored (STYLE.md §8).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from model_tailor.errors import ConfigError

__all__ = ["TailorConfig", "format_validation_error"]

Granularity = Literal["block", "row", "tensor", "global"]
Compensation = Literal["obs", "official", "none", "exact"]
NonTargetPolicy = Literal["reset", "keep", "tailor"]
DType = Literal["float32", "bfloat16", "float16"]
Structure = Literal["sparse", "lowrank", "sparse+lowrank"]

# lambda of the preserve-aware objective (PILOT.md: 0.3-1 measured at density 0.1). One constant, so the default
# can move once the bench grid is in.
DEFAULT_PRESERVE_WEIGHT = 1.0


def default_cache_dir() -> Path:
    """``$MODEL_TAILOR_CACHE`` or ``~/.cache/model-tailor``: where ``--preserve self`` caches generations."""
    env = os.environ.get("MODEL_TAILOR_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "model-tailor"


class TailorConfig(BaseModel):
    """Resolved options of one tailoring run. Paths are stored as given; the pipeline resolves them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base: Path
    finetuned: Path
    calibration: Path | None = None
    out: Path | None = None
    save_model: Path | None = None
    # METHOD §7/§16 D6, D8, D10: fraction kept, fusion weight, selection group
    density: float = Field(0.1, gt=0, le=1)
    alpha: float = Field(0.8, ge=0, le=1)
    granularity: Granularity = "block"
    compensation: Compensation = "obs"
    sensitivity: Literal["weight", "revert"] = "weight"
    mask_timing: Literal["adaptive", "upfront"] = "adaptive"
    guard: bool = True
    block_size: int = Field(128, gt=0)
    percdamp: float = Field(0.01, ge=0)
    # METHOD §10 / D15: sequences, not batches; a token cap, never max_position_embeddings
    samples: int = Field(128, gt=0)
    max_tokens: int = Field(512, gt=0)
    batch_size: int = Field(4, gt=0)
    seed: int = 0
    device: str = "cpu"
    dtype: DType = "float32"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    non_target_policy: NonTargetPolicy = "reset"
    # Issue 5, PILOT.md: preserve-aware tailoring. ``preserve`` is a JSONL file (calibration record forms) or
    # "self" (the base model answers shipped generic instructions); lambda weighs ||(W - W_pre) X_o||^2.
    preserve: str | None = None
    preserve_weight: float = Field(DEFAULT_PRESERVE_WEIGHT, ge=0, allow_inf_nan=False)
    preserve_samples: int = Field(64, gt=0)
    preserve_max_new_tokens: int = Field(48, gt=0)
    # Patch structure under one parameter budget (density * rows * cols; a rank-r pair costs r * (rows + cols)).
    # Low-rank factors are fitted in closed form, whatever ``compensation`` says; it applies to the sparse part.
    structure: Structure = "sparse"
    salience_from: Literal["delta", "target"] = "delta"
    cache_dir: Path = Field(default_factory=default_cache_dir)
    max_shard_bytes: int = Field(2_000_000_000, gt=0)
    overwrite: bool = False

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

    @model_validator(mode="after")
    def _check_combination(self) -> TailorConfig:
        if self.calibration is None and not self.data_free:
            raise ValueError(
                "calibration data is required; only the data-free mode (alpha=1 with compensation=none, "
                "METHOD §10) runs without it"
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
            raise ValueError("preserve must be a JSONL file path or 'self', got an empty string")
        return value

    @property
    def data_free(self) -> bool:
        """Salience-only, uncompensated tailoring needs no calibration data (METHOD §10, not Model Tailor)."""
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
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(file)!r} is not valid YAML ({' '.join(str(err).split())})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(file)!r} must hold a mapping of option: value")
        data = {str(k).replace("-", "_"): v for k, v in data.items()}
        for key in ("base", "finetuned", "calibration", "out", "save_model", "preserve", "cache_dir"):
            # Relative paths in a YAML file resolve against the file's folder, not the working directory.
            if key == "preserve" and data.get(key) == "self":
                continue
            if isinstance(data.get(key), str) and not Path(data[key]).is_absolute():
                data[key] = str(file.parent / data[key])
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.build(**data)

    def fingerprint(self) -> str:
        """Hash of every option that changes the patch (not output paths): keys the resume work dir."""
        fields = self.model_dump(
            mode="json", exclude={"out", "save_model", "overwrite", "max_shard_bytes", "cache_dir"}
        )
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


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
