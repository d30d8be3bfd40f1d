"""What a training run may be: ``TrainOptions``, frozen, with its limits and one ``check()`` (no torch here).

The command line (``train/cli.py``) builds one from its flags; a failed check raises ``errors.UsageError``
carrying the field, which the command line names by its flag. ``settings()`` are the fields that define the
run's result: a rerun into the same folder must repeat them (``train/state.py``), while the others (where
and how fast it runs, how often it saves or validates) may change between reruns.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import UsageError, UsageTypeError
from ..request import SAMPLERS

__all__ = ["TrainOptions", "MIXED_PRECISION", "LR_SCHEDULES", "CFG_DROPOUT_STYLES", "default_cache_dir"]

MIXED_PRECISION = ("no", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine")
# "inference": an item's unconditional conditions are those the pipeline pairs with its prompt at inference
# (encode_prompt's negative rows for ""), decided per item; "original": the original code's (zeros for the
# GPT-2 stream, T5 of ""), decided once per batch.
CFG_DROPOUT_STYLES = ("inference", "original")
REPORTERS = ("none", "tensorboard")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/audioldm2_core/train-cache`` (``~/.cache/...``): shared by every run, so that a run on
    the same clips with the same model reuses their encodings."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "audioldm2_core" / "train-cache"


@dataclass(frozen=True)
class TrainOptions:
    """A fine-tuning run, as ``audioldm2-train`` takes it (docs/fine-tuning.md)."""

    data: Path  # JSON Lines, an audiofolder (metadata.csv / .jsonl), or a dataset-synthesis manifest
    output: Path  # the run folder
    model: str = "cvssp/audioldm2"
    revision: str | None = None
    steps: int = 2000  # optimizer steps
    batch_size: int = 8  # items per optimizer step, over all processes
    micro_batch_size: int | None = None  # items per forward on one process (None: all of its share)
    lr: float = 1e-4
    lr_warmup: int = 0  # steps of linear warmup from 0
    lr_schedule: str = "constant"  # after the warmup: "constant" or "cosine" (to 0 at --steps)
    weight_decay: float = 1e-2  # AdamW's (diffusers' scripts)
    max_grad_norm: float = 1.0  # gradient clipping; 0: none
    seed: int = 0
    full: bool = False  # every UNet weight, instead of a LoRA
    lora_rank: int = 4
    lora_alpha: float | None = None  # None: the rank (scale 1)
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    init_lora: Path | None = None  # start the LoRA from this file's (its rank and alpha)
    ema: float | None = None  # EMA decay of the trained weights (e.g. 0.9999); the outputs hold the EMA
    snr_gamma: float | None = None  # Min-SNR weighting (Hang et al. 2023), e.g. 5
    noise_offset: float = 0.0
    cfg_dropout: float = 0.1  # probability of the unconditional conditions
    cfg_dropout_style: str = "inference"
    length: float | None = None  # seconds per training crop; None: the model's (10.24)
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    device: str = "auto"
    save_every: int = 500  # steps between checkpoints
    keep_checkpoints: int = 2
    validate_every: int = 0  # steps between validations (0: only at the end, when prompts are given)
    validation_prompts: tuple[str, ...] = ()
    validation_transcriptions: tuple[str, ...] = ()  # speech checkpoints: one per validation prompt
    validation_steps: int = 25
    validation_sampler: str = "dpmpp-2m"
    validation_guidance: float = 3.5
    report_to: str = "none"
    cache_dir: Path | None = None  # None: default_cache_dir()
    caption_column: str | None = None  # an audiofolder's text column (default: prompt, text or caption)
    phonemes: bool = False  # transcriptions are IPA already
    quiet: bool = False

    def check(self) -> None:
        """Raise the clear error of the first setting that cannot run."""
        for name in (
            "steps",
            "batch_size",
            "lora_rank",
            "save_every",
            "keep_checkpoints",
            "validation_steps",
        ):
            _positive_int(self, name)
        for name in ("lr_warmup", "validate_every", "seed"):
            _int_at_least(self, name, 0)
        if self.micro_batch_size is not None:
            _positive_int(self, "micro_batch_size")
        for name in ("lr", "max_grad_norm", "weight_decay", "noise_offset", "validation_guidance"):
            _number_at_least(self, name, 0.0, strict=name == "lr")
        for name in ("lora_alpha", "snr_gamma", "length"):
            if getattr(self, name) is not None:
                _number_at_least(self, name, 0.0, strict=True)
        if self.ema is not None and not (_is_number(self.ema) and 0 < self.ema < 1):
            raise UsageError(f"ema must be a decay in (0, 1), e.g. 0.9999, got {self.ema!r}", field="ema")
        if not (_is_number(self.cfg_dropout) and 0 <= self.cfg_dropout < 1):
            raise UsageError(f"cfg_dropout must be in [0, 1), got {self.cfg_dropout!r}", field="cfg_dropout")
        _choice(self, "lr_schedule", LR_SCHEDULES)
        _choice(self, "mixed_precision", MIXED_PRECISION)
        _choice(self, "cfg_dropout_style", CFG_DROPOUT_STYLES)
        _choice(self, "report_to", REPORTERS)
        _choice(self, "validation_sampler", tuple(SAMPLERS))
        if self.lr_warmup >= self.steps and self.lr_schedule == "cosine":
            raise UsageError(
                f"lr_warmup ({self.lr_warmup}) must be shorter than steps ({self.steps})", "lr_warmup"
            )
        if not self.lora_targets or not all(isinstance(t, str) and t for t in self.lora_targets):
            raise UsageError(
                "lora_targets must name at least one module (e.g. to_q,to_k)", field="lora_targets"
            )
        if self.full and self.init_lora is not None:
            raise UsageError("init_lora starts a LoRA: not with full fine-tuning (full)", field="init_lora")
        if self.validation_transcriptions and len(self.validation_transcriptions) != len(
            self.validation_prompts
        ):
            raise UsageError(
                f"{len(self.validation_transcriptions)} validation transcriptions for "
                f"{len(self.validation_prompts)} validation prompts: give one per prompt",
                field="validation_transcriptions",
            )
        if self.validate_every and not self.validation_prompts:
            raise UsageError("validate_every needs validation prompts", field="validate_every")

    def settings(self) -> dict[str, Any]:
        """The fields a rerun into the same folder must repeat (``steps`` only where the schedule depends on
        it: a constant schedule may be extended by asking for more steps)."""
        result = {f.name: getattr(self, f.name) for f in fields(self) if f.name in _RESULT_FIELDS}
        if self.lr_schedule == "cosine":
            result["steps"] = self.steps
        result["lora_targets"] = list(self.lora_targets)
        result["init_lora"] = None if self.init_lora is None else str(self.init_lora)
        return result

    @property
    def cache(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else default_cache_dir()


_RESULT_FIELDS = {
    "model", "revision", "batch_size", "lr", "lr_warmup", "lr_schedule", "weight_decay", "max_grad_norm", "seed",
    "full", "lora_rank", "lora_alpha", "lora_targets", "init_lora", "ema", "snr_gamma", "noise_offset",
    "cfg_dropout", "cfg_dropout_style", "length", "mixed_precision", "caption_column", "phonemes",
}  # fmt: skip


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive_int(options: TrainOptions, name: str) -> None:
    _int_at_least(options, name, 1)


def _int_at_least(options: TrainOptions, name: str, low: int) -> None:
    value = getattr(options, name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise UsageTypeError(f"{name} must be an integer, got {value!r}", field=name)
    if value < low:
        raise UsageError(f"{name} must be at least {low}, got {value}", field=name)


def _number_at_least(options: TrainOptions, name: str, low: float, strict: bool = False) -> None:
    value = getattr(options, name)
    if not _is_number(value) or value < low or (strict and value == low):
        raise UsageError(
            f"{name} must be a number {'>' if strict else '>='} {low:g}, got {value!r}", field=name
        )


def _choice(options: TrainOptions, name: str, choices: tuple[str, ...]) -> None:
    if getattr(options, name) not in choices:
        raise UsageError(
            f"{name} must be one of {', '.join(choices)}, got {getattr(options, name)!r}", field=name
        )
