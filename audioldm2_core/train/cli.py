"""``audioldm2-train --data items.jsonl -o run/`` (also ``python -m audioldm2_core.train``): fine-tune AudioLDM 2.

    audioldm2-train --model cvssp/audioldm2 --data items.jsonl -o run/ --steps 2000 --batch-size 8 --lr 1e-4
    torchrun --nproc_per_node 4 -m audioldm2_core.train ...      # the same weights, four processes

Everything that can be checked is checked before a weight is read: the flags (``TrainOptions.check``), the
output folder, every line of the dataset and every clip's header, the model's configs (the clips' length, a
speech checkpoint's transcriptions, ``--init-lora``'s fit), and an existing run folder's settings. A failure
there is one line and exit 2, and nothing is written; a failure after it is one line and exit 1 (``--debug``:
the traceback). Rerunning the same command resumes the run (``train/state.py``). docs/fine-tuning.md.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import MissingDependencyError, UsageError
from ..frontend import (
    DEFAULT_MODEL,
    Layout,
    OneLineParser,
    check_writable,
    device_line,
    fail,
    layout_from_env,
    load_pipeline,
    rank_device,
    rank_prefix,
    resolve_device_and_dtype,
)
from ..request import LoadOptions
from .options import CFG_DROPOUT_STYLES, LR_SCHEDULES, MIXED_PRECISION, REPORTERS, TrainOptions

__all__ = ["FLAGS", "main", "options_from", "checked"]

PROG = "audioldm2-train"
DESCRIPTION = (
    "Fine-tune AudioLDM 2 (a LoRA of the UNet, or the whole UNet) on your clips; resumable, torchrun-aware."
)

# (flag names, argparse keywords); ``dest`` is the TrainOptions field the flag sets.
FLAGS: list[tuple[tuple[str, ...], dict[str, Any]]] = [
    (("--data",), dict(type=Path, required=True, help="JSON Lines of {\"audio\", \"prompt\"} items, an audiofolder "
                       "(metadata.csv / metadata.jsonl), or a dataset-synthesis folder or manifest.jsonl")),
    (("-o", "--output"), dict(type=Path, required=True, help="the run folder (rerun the same command to resume)")),
    (("--model",), dict(default=DEFAULT_MODEL, help="hub repo id or local pipeline folder (default: %(default)s)")),
    (("--revision",), dict(default=None, help="hub revision of --model")),
    (("--steps",), dict(type=int, default=2000, help="optimizer steps (default: %(default)s)")),
    (("--batch-size",), dict(type=int, default=8, help="items per optimizer step, over all processes")),
    (("--micro-batch-size",), dict(type=int, default=None, help="items per forward on one process (default: its "
                                   "whole share of the batch); the same weights whatever it is")),
    (("--lr",), dict(type=float, default=1e-4, help="AdamW's learning rate (default: %(default)s)")),
    (("--lr-warmup",), dict(type=int, default=0, help="steps of linear warmup from 0 (default: %(default)s)")),
    (("--lr-schedule",), dict(default="constant", choices=LR_SCHEDULES, help="after the warmup (default: constant)")),
    (("--weight-decay",), dict(type=float, default=1e-2, help="AdamW's weight decay (default: %(default)s)")),
    (("--max-grad-norm",), dict(type=float, default=1.0, help="gradient clipping; 0: none (default: %(default)s)")),
    (("--seed",), dict(type=int, default=0, help="every random draw of the run derives from it")),
    (("--full",), dict(action="store_true", help="train every UNet weight (writes run/pipeline/) instead of a LoRA")),
    (("--lora-rank",), dict(type=int, default=4, help="LoRA rank (default: %(default)s)")),
    (("--lora-alpha",), dict(type=float, default=None, help="LoRA alpha (default: the rank, a scale of 1)")),
    (("--lora-targets",), dict(default="to_q,to_k,to_v,to_out.0", help="linears to adapt, by name ending, "
                               "comma-separated (default: %(default)s, every attention)")),
    (("--init-lora",), dict(type=Path, default=None, help="start the LoRA from this file or run folder")),
    (("--ema",), dict(type=float, default=None, metavar="DECAY", help="keep an EMA of the trained weights "
                      "(e.g. 0.9999); the outputs hold it")),
    (("--snr-gamma",), dict(type=float, default=None, help="Min-SNR loss weighting (Hang et al. 2023), e.g. 5")),
    (("--noise-offset",), dict(type=float, default=0.0, help="offset noise per channel (default: 0, off)")),
    (("--cfg-dropout",), dict(type=float, default=0.1, help="probability of the unconditional conditions "
                              "(classifier-free guidance; default: %(default)s)")),
    (("--cfg-dropout-style",), dict(default="inference", choices=CFG_DROPOUT_STYLES, help="inference: per item, "
                                    "the pipeline's own conditions for the empty negative prompt (default); "
                                    "original: per batch, zeros for GPT-2's states, as the original code")),
    (("--length",), dict(type=float, default=None, help="seconds per training crop (default: the model's, 10.24)")),
    (("--mixed-precision",), dict(default="no", choices=MIXED_PRECISION, help="autocast the forward (the trained "
                                  "weights stay float32; fp16 on CUDA only)")),
    (("--gradient-checkpointing",), dict(action="store_true", help="recompute the UNet blocks' activations in the "
                                         "backward: less memory, ~30%% more time")),
    (("--device",), dict(default="auto", help="auto (CUDA: cuda:LOCAL_RANK under torchrun; else MPS, CPU), cpu, "
                         "cuda, ...")),
    (("--save-every",), dict(type=int, default=500, help="steps between checkpoints (default: %(default)s)")),
    (("--keep-checkpoints",), dict(type=int, default=2, help="checkpoints kept (default: %(default)s)")),
    (("--validate-every",), dict(type=int, default=0, help="steps between validations (default: only at the end)")),
    (("--validation-prompt",), dict(action="append", default=[], dest="validation_prompts", help="a prompt to "
                                    "generate at each validation (repeat the flag for several)")),
    (("--validation-transcription",), dict(action="append", default=[], dest="validation_transcriptions",
                                           help="speech checkpoints: the words of each validation prompt")),
    (("--validation-steps",), dict(type=int, default=25, help="sampler steps of a validation (default: 25)")),
    (("--validation-sampler",), dict(default="dpmpp-2m", help="sampler of a validation (default: %(default)s)")),
    (("--validation-guidance",), dict(type=float, default=3.5, help="guidance scale of a validation")),
    (("--report-to",), dict(default="none", choices=REPORTERS, help="also log to TensorBoard (run/tensorboard/)")),
    (("--cache-dir",), dict(type=Path, default=None, help="where the clips' encodings are kept (default: "
                            "~/.cache/audioldm2_core/train-cache, shared by runs)")),
    (("--caption-column",), dict(default=None, help="an audiofolder's caption column (default: prompt, text or "
                                 "caption)")),
    (("--phonemes",), dict(action="store_true", help="transcriptions are IPA phonemes already (no espeak-ng)")),
    (("--quiet",), dict(action="store_true", help="no progress bars")),
    (("--debug",), dict(action="store_true", help="on an error, show the traceback too")),
]  # fmt: skip
# TrainOptions field -> the flag that sets it ("lora": what a LoRA file's reader names, read for --init-lora)
FLAG_OF = {kw.get("dest", names[-1].lstrip("-").replace("-", "_")): names[-1] for names, kw in FLAGS}
FLAG_OF |= {
    "data": "--data",
    "output": "--output",
    "validation_prompts": "--validation-prompt",
    "lora": "--init-lora",
}


def parse(argv: list[str] | None):
    p = OneLineParser(prog=PROG, description=DESCRIPTION, allow_abbrev=False)
    for names, kwargs in FLAGS:
        p.add_argument(*names, **kwargs)
    return p.parse_args(argv)


def options_from(args) -> TrainOptions:
    """The run the flags ask for (not yet checked)."""
    fields = {k: v for k, v in vars(args).items() if k != "debug"}
    fields["lora_targets"] = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    fields["validation_prompts"] = tuple(args.validation_prompts)
    fields["validation_transcriptions"] = tuple(args.validation_transcriptions)
    return TrainOptions(**fields)


def _check_output(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise UsageError(f"output {output} is a file; give a folder for the run", field="output")
    check_writable(output if output.is_dir() else output.parent)


def _check_speech(plan_items, options: TrainOptions, speech: bool) -> None:
    """A speech checkpoint needs every item's transcription (and every validation prompt's); any other refuses
    them."""
    for item in plan_items:
        if speech and item.transcription is None:
            raise UsageError(
                f"{item.where}: this speech checkpoint needs the clip's words: give a 'transcription'"
            )
        if not speech and item.transcription is not None:
            raise UsageError(
                f"{item.where}: 'transcription' is for the speech checkpoints; this model has none"
            )
    if speech and len(options.validation_transcriptions) != len(options.validation_prompts):
        raise UsageError(
            "this speech checkpoint needs one --validation-transcription per --validation-prompt"
        )
    if not speech and options.validation_transcriptions:
        raise UsageError(
            "--validation-transcription is for the speech checkpoints", field="validation_transcriptions"
        )


def _fingerprint(items, clips) -> str:
    rows = [[it.id, it.prompt, it.transcription, clips[it.id].sha256] for it in items]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def checked(options: TrainOptions, layout: Layout):
    """Everything checked before a weight is read (see the module docstring): the run's ``loop.Plan``."""
    from .. import lora
    from ..pipeline import audio_shape
    from .cache import item_key, model_identity
    from .data import check_clips, check_lengths, read_items
    from .loop import Plan
    from .state import check_settings

    options.check()
    _check_output(options.output)
    if options.report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError as e:
            raise MissingDependencyError(
                "--report-to tensorboard needs tensorboard: pip install tensorboard"
            ) from e
    if not options.full:
        lora.require_peft()
    items = read_items(options.data, options.caption_column)
    clips = check_clips(items)  # before the model: a bad clip fails before a download
    device, _ = resolve_device_and_dtype(rank_device(options.device, layout), "float32")
    if options.mixed_precision == "fp16" and not device.startswith("cuda"):
        raise UsageError("fp16 needs a CUDA device; use bf16", field="mixed_precision")
    pipe = load_pipeline(
        PROG, LoadOptions(options.model, options.revision, device, "float32", True, fast=False)
    )
    check_lengths(items, clips, pipe.default_length)
    _check_speech(items, options, pipe.ckpt.is_speech)
    seconds = options.length if options.length is not None else pipe.default_length
    if not pipe.min_length <= seconds <= pipe.default_length + 1e-9:
        raise UsageError(f"length must be in [{pipe.min_length:g}, {pipe.default_length:g}] s for this model, "
                         f"got {seconds:g}", field="length")  # fmt: skip
    frames = audio_shape(seconds, pipe.seconds_per_frame, pipe.vae_config.scale_factor, pipe.sample_rate)[0]
    if options.init_lora is not None:
        lora.check_fits(lora.read_lora(options.init_lora), lora.meta_unet(pipe.unet_config))
    identity = model_identity(pipe.ckpt)
    keys = {it.id: item_key(it, clips[it.id], frames, identity, options.phonemes) for it in items}
    settings = options.settings() | {"data": _fingerprint(items, clips)}
    check_settings(options.output, settings)
    return Plan(options, items, clips, pipe, frames, keys, settings)


def _start_processes(plan, layout: Layout) -> None:
    """Join torchrun's process group (NCCL on CUDA, gloo elsewhere)."""
    if layout.world == 1:
        return
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if plan.pipe.device.type == "cuda":
        torch.cuda.set_device(plan.pipe.device)
    backend = "nccl" if plan.pipe.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(hours=2))  # encoding a large dataset takes a while


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    layout = None
    try:
        layout = layout_from_env(None)
        options = options_from(args)
        if layout.world > 1 and options.quiet is False and layout.rank != 0:
            options = replace(options, quiet=True)  # one progress bar
        plan = checked(options, layout)
    except Exception as e:
        return fail(PROG, e, args.debug, 2, rank_prefix(layout), FLAG_OF)
    if not options.quiet:
        mixed = options.mixed_precision
        autocast = "" if mixed == "no" else f"; the forward under {mixed} autocast"
        print(f"{PROG}: {device_line(plan.pipe.options)}{autocast}", file=sys.stderr)
    from .loop import run

    try:
        _start_processes(plan, layout)
        run(plan, layout)
    except KeyboardInterrupt:
        print(
            f"{PROG}: error: {rank_prefix(layout)}interrupted (rerun the same command to resume)",
            file=sys.stderr,
        )
        return 130
    except Exception as e:
        return fail(PROG, e, args.debug, 1, rank_prefix(layout), FLAG_OF)
    finally:
        _stop_processes(layout)
    return 0


def _stop_processes(layout: Layout | None) -> None:
    if layout is not None and layout.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
