"""What a training run encodes once per item and keeps on disk: the clip's VAE posterior and its conditions.

Per item, with the pipeline's own stages (the same numbers as at inference):

    clip --audio.load_audio--> 16 kHz mono --audio.log_mel--> (frames, 64), the original's front end
         --VAE encoder (posterior)--> mean, logvar (8, frames / 4, 16): a fresh latent is drawn from them
                                      each time the item is used (``objective.draw``)
    caption (+ transcription) --conditioning.encode_prompt, with guidance--> rows [unconditional,
         conditional] of the T5 (speech: VITS) states, their mask and GPT-2's states: exactly what the
         pipeline makes for this prompt and the empty negative prompt at inference

``frames`` is the training length's (``--length``, 10.24 s: 1024), or the clip's own when longer (then each
use crops it at random in latent frames); a shorter clip is padded as the original's ``pad_wav``.

An entry is a safetensors file named by a key of its content: the clip's bytes, the caption and
transcription, the frames, and the model (its source, and each encoding component's files by name, size and
modification time), so it is reused by every run and epoch that needs the same numbers and never by one
that does not. Entries are written atomically; under torchrun each rank encodes its share (items r, r + n,
...) of those missing, then all read all of them.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..audio import load_audio, log_mel, mel_frames
from ..conditioning import encode_prompt
from ..errors import UsageError
from ..outputs import write_atomic
from ..pipeline import TEXT_COMPONENTS
from .data import Clip, TrainItem

__all__ = [
    "VERSION",
    "Entry",
    "model_identity",
    "item_key",
    "encode_conditions",
    "encode_item",
    "read_entry",
    "fill",
]

VERSION = "1"  # of the entries' recipe: a change here makes new keys
ENCODERS = (*TEXT_COMPONENTS, "vae")  # what an entry's numbers come from


@dataclass(frozen=True)
class Entry:
    """An item's encodings (float32, CPU)."""

    mean: Tensor  # (C, t, F) the VAE posterior over unscaled latents
    logvar: Tensor  # (C, t, F)
    t5: Tensor  # (2, L, d) rows [unconditional, conditional]
    mask: Tensor  # (2, L)
    loa: Tensor  # (2, n, 768)


def model_identity(ckpt) -> dict[str, Any]:
    """The encoding components of a checkpoint as a cache key sees them: the source, and each file by name,
    size and modification time (a hub snapshot's folder name is its commit)."""
    files = {}
    for component in ENCODERS:
        folder = ckpt.folder(component)
        files[component] = sorted(
            [p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in folder.iterdir() if p.is_file()
        )
    return {"source": str(ckpt.root.resolve()), "files": files}


def item_key(item: TrainItem, clip: Clip, frames: int, identity: dict[str, Any], phonemes: bool) -> str:
    """The key of an item's entry: sha256 of everything its numbers depend on."""
    content = {
        "version": VERSION,
        "audio": clip.sha256,
        "prompt": item.prompt,
        "transcription": item.transcription,
        "phonemes": phonemes,
        "frames": frames,
        "model": identity,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


@torch.no_grad()
def encode_conditions(pipe, prompt: str, transcription: str | None, phonemes: bool) -> tuple[Tensor, ...]:
    """(t5, mask, loa), rows [unconditional, conditional], as the pipeline encodes ``prompt`` with guidance and
    no negative prompt (``conditioning.encode_prompt``)."""
    return encode_prompt(pipe.text_stack(), prompt, pipe.device, 1, True, None, transcription=transcription,
                         transcription_is_phonemes=phonemes)  # fmt: skip


@torch.no_grad()
def encode_item(pipe, item: TrainItem, frames: int, phonemes: bool) -> dict[str, Tensor]:
    """An item's entry: the posterior of its clip's log-mel over ``frames`` mel frames (more when the clip is
    longer: its own, rounded up to a latent frame), and its conditions."""
    wave = load_audio(item.audio)
    scale = pipe.vae_config.scale_factor
    mel = log_mel(wave, max(frames, mel_frames(wave.shape[0], scale)))  # (frames', 64)
    encoder = pipe.vae_encoder
    posterior = encoder.posterior(mel[None, None].to(pipe.device, next(encoder.parameters()).dtype))
    t5, mask, loa = encode_conditions(pipe, item.prompt, item.transcription, phonemes)
    tensors = dict(mean=posterior.mean[0], logvar=posterior.logvar[0], t5=t5, mask=mask, loa=loa)
    return {
        k: v.detach().to("cpu", torch.int64 if k == "mask" else torch.float32).contiguous()
        for k, v in tensors.items()
    }


def read_entry(path: Path) -> Entry:
    from safetensors.torch import load_file

    return Entry(**load_file(path))


def fill(pipe, items: list[TrainItem], keys: dict[str, str], folder: Path, frames: int, phonemes: bool,
         rank: int = 0, world: int = 1, quiet: bool = False) -> int:  # fmt: skip
    """Encode this rank's share of the items whose entry is missing (a progress bar over them); returns how
    many it encoded. A clip that cannot be decoded is an error naming it and its line."""
    from safetensors.torch import save
    from tqdm import tqdm

    missing = [it for it in items if not (folder / f"{keys[it.id]}.safetensors").is_file()]
    mine = missing[rank::world]
    if not mine:
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    desc = "encoding clips" + (f" (rank {rank}/{world})" if world > 1 else "")
    for item in tqdm(mine, desc=desc, unit="clip", file=sys.stderr, disable=quiet, position=rank):
        try:
            tensors = encode_item(pipe, item, frames, phonemes)
        except ValueError as e:  # audio.load_audio's: a file whose header was read but not its samples
            raise UsageError(f"{item.where}: {e}") from e
        write_atomic(folder / f"{keys[item.id]}.safetensors", save(tensors))
    return len(mine)
