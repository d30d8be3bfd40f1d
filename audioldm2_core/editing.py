"""Audio in, audio out: the starts and the masking of style transfer, inpainting and super-resolution.

The pipeline encodes the input to latents z0 (``AudioLDM2.encode_audio``: ``scaling_factor * mean(E(mel))``,
(1, 8, t, 16)) and then runs one of the samplers of ``samplers.py`` from a later step, possibly with a mask:

    style transfer (SDEdit, Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with SDEs"):
        init = min(int(steps * strength), steps); start = steps - init      (diffusers img2img's get_timesteps)
        noise = randn(z0.shape, generator)                                  (before any other draw)
        x = add_noise(sampler, z0, noise, start)                            (the scheduler's own add_noise)
        x0 = sampler(model, x, start=start)                                 (the usual guided loop, kept steps)

    inpainting / super-resolution (RePaint-style masking: AudioLDM's ``generate_batch_masked``, Lugmayr et al.
    2022, "RePaint"): the same start (strength 1 by default: from noise), and before every step the kept
    region (mask False) is replaced by z0 noised to that step's level with fresh noise, as the original
    AudioLDM's DDIM ``ddim_sampling(mask=, x0=)`` does with ``q_sample(x0, t)``; after the last step the kept
    region is z0 itself (the original leaves the model's prediction there; here the kept latents are the
    input's, exactly).

``repaint_callback`` does the masking over any sampler function through its ``callback``: after step i it
writes, in place into the sampler's own ``x``, the known latents at the level of step i + 1 (``add_noise`` at
index i + 1: VP or VE scale as that sampler keeps x), so step i + 1 starts from them; "before step i + 1" and
"after step i" are the same point of every loop. The model stays behind the pipeline's denoiser closure.
Quirks: a two-call step (Heun, KDPM2) sees its intermediate point unmasked, as diffusers' inpainting
pipelines do; UniPC's corrector redoes step i at the start of step i + 1, so its kept region is the
corrected value, not the replaced one, from then on (the model saw the replaced one; the end result is z0).

``super_resolution_cutoff`` reads the input's own sample rate (a file's header, or the array's rate): audio
recorded at 8 kHz has nothing above 4 kHz, which is the band to regenerate.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .audio import F_MAX, HOP_LENGTH, N_MELS, SAMPLE_RATE, latent_mask
from .config import SchedulerConfig, VAEConfig, VocoderConfig
from .errors import UsageError, UsageTypeError
from .noise import Generators, randn
from .request import AudioEdit
from .samplers import Callback, SamplerFn, add_noise, schedule

__all__ = [
    "check_model",
    "latent_mask_of",
    "repaint_callback",
    "source_sample_rate",
    "super_resolution_cutoff",
]


def check_model(vocoder: VocoderConfig, vae: VAEConfig) -> None:
    """Audio in needs the model the front end (``audio.log_mel``) was made for: 16 kHz, 64 mel bins, hop 160."""
    if (vocoder.sampling_rate, vocoder.hop_length, vocoder.model_in_dim, vae.in_channels) != (
        SAMPLE_RATE, HOP_LENGTH, N_MELS, 1,
    ):  # fmt: skip
        raise UsageError(
            f"audio input needs a 16 kHz model with 64 mel bins and a hop of 160 samples; this checkpoint has "
            f"{vocoder.sampling_rate} Hz, {vocoder.model_in_dim} bins, a hop of {vocoder.hop_length}"
        )


def latent_mask_of(edit: AudioEdit, frames: int, scale: int) -> Tensor | None:
    """An edit's latent mask (frames / scale, 16), True = regenerate: its spans and bands, and above the
    super-resolution cutoff (``audio.latent_mask``); None for style transfer."""
    bands = list(edit.bands_hz)
    if edit.super_resolution:
        rate = source_sample_rate(edit.audio, edit.sample_rate)
        bands.append((super_resolution_cutoff(rate, edit.cutoff_hz), F_MAX))
    if not edit.spans_s and not bands:
        return None
    return latent_mask(frames // scale, list(edit.spans_s), bands, scale=scale)


def repaint_callback(
    sampler: str | SamplerFn,
    cfg: SchedulerConfig,
    steps: int,
    z0: Tensor,
    mask: Tensor,
    generator: Generators = None,
    callback: Callback | None = None,
) -> Callback:
    """A sampler callback that keeps the known region: after step i, ``x``'s entries where ``mask`` is False
    become ``add_noise(z0, fresh noise, i + 1)`` (z0 after the last step), written in place so the sampler's
    next step starts from them; then ``callback(i, t, x)``. ``z0`` (B, C, t, f) in the sampler's dtype,
    ``mask`` broadcastable to it (True = regenerate). Fresh noise is drawn from ``generator`` with z0's shape."""
    n = len(schedule(sampler, cfg, steps).timesteps)  # PNDM counts UNet calls, the others steps

    def keep_known(i: int, t: Tensor, x: Tensor) -> None:
        if i + 1 < n:
            noise = randn(tuple(z0.shape), generator, z0.device, z0.dtype)
            known = add_noise(sampler, cfg, steps, z0, noise, i + 1)
        else:
            known = z0
        x.copy_(torch.where(mask, x, known.to(x.dtype)))
        if callback is not None:
            callback(i, t, x)

    return keep_known


def source_sample_rate(audio: str | os.PathLike | np.ndarray | Tensor, sample_rate: int | None) -> int:
    """The input's own sample rate, before ``load_audio`` resamples it: a file's header, or the given rate."""
    if isinstance(audio, (str, os.PathLike)):
        import soundfile as sf

        try:
            return int(sf.info(str(Path(audio).expanduser())).samplerate)
        except (sf.LibsndfileError, RuntimeError, TypeError) as e:
            raise UsageError(f"cannot read audio file {audio}: {e}") from e
    if sample_rate is None:
        raise UsageError("a waveform array or tensor needs its sample rate (audio_sample_rate=...)")
    return int(sample_rate)


def super_resolution_cutoff(source_rate: int, cutoff_hz: float | None = None) -> float:
    """The frequency above which super-resolution regenerates: ``cutoff_hz`` if given, else the input's
    Nyquist frequency (half its own sample rate), which must lie below the model's top frequency (8 kHz)."""
    if cutoff_hz is not None:
        if isinstance(cutoff_hz, bool) or not isinstance(cutoff_hz, (int, float)):
            raise UsageTypeError(f"cutoff_hz must be a number of Hz, got {cutoff_hz!r}")
        if not (math.isfinite(cutoff_hz) and 0 < cutoff_hz < F_MAX):
            raise UsageError(f"cutoff_hz must be between 0 and {F_MAX:.0f} Hz, got {cutoff_hz}")
        return float(cutoff_hz)
    if source_rate >= SAMPLE_RATE:
        raise UsageError(
            f"super-resolution: the input's sample rate is {source_rate} Hz, so nothing below the model's "
            f"{F_MAX:.0f} Hz is missing; give the cutoff (cutoff_hz=, --super-resolution HZ) for band-limited "
            "audio stored at a higher rate"
        )
    return source_rate / 2
