"""The objective AudioLDM 2's latent diffusion model was trained with (the original code, ``ddpm.py``
``p_losses``), and what is random in it: per item and step,

    z0  = s * (mu + sigma * e)                a draw from the VAE posterior of the clip's log-mel (s: the VAE's
                                              scaling_factor), over a random crop of ``frames`` latent frames
    t   ~ U{0 .. T-1},  eps ~ N(0, I)         T = 1000 (the checkpoint's scheduler config)
    z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps                        (Ho et al. 2020; diffusers' add_noise)
    loss = w_t || target - unet(z_t, t, c) ||^2, target = eps (epsilon prediction, every hub checkpoint) or
           v = sqrt(abar_t) eps - sqrt(1 - abar_t) z0 (v-prediction, Salimans & Ho 2022), w_t = 1, or with Min-SNR
           (Hang et al. 2023) min(SNR_t, gamma) / SNR_t (v: / (SNR_t + 1)), SNR_t = abar_t / (1 - abar_t)
    c   = the item's conditions, or with probability p (classifier-free guidance dropout, Ho & Salimans 2022)
          the unconditional ones

Every draw of an item comes from its own generator, seeded by (seed, step, the item's place in the batch, its
id): a process, a micro-batch or a resumed run draws the same numbers for it. Also here: the learning rate at
a step and the EMA decay, as functions of the step alone.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..generate import Conditions, guided_denoiser
from ..noise import randn
from ..vae import DiagonalGaussian

__all__ = [
    "Draws",
    "seed_of",
    "draw",
    "noised",
    "target",
    "snr_weight",
    "item_losses",
    "learning_rate",
    "ema_decay",
]


def seed_of(*parts: object) -> int:
    """A 63-bit seed from its parts: the first 8 bytes of sha256("a/b/..."), big-endian, shifted right once."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass(frozen=True)
class Draws:
    """An item's random draws at one step."""

    z0: Tensor  # (C, frames, F) latents at the UNet's scale
    noise: Tensor  # (C, frames, F)
    t: int
    unconditional: bool  # classifier-free guidance dropout


def draw(
    mean: Tensor,
    logvar: Tensor,
    frames: int,
    generator: torch.Generator,
    scaling_factor: float,
    timesteps: int,
    p_uncond: float,
    noise_offset: float = 0.0,
) -> Draws:
    """One item's draws, in this order: the crop's first latent frame, the dropout, the posterior's noise (the
    VAE's own ``DiagonalGaussian.sample``), t, eps, and with ``noise_offset`` eps += offset * N(0, 1) per
    channel (diffusers' ``--noise_offset``). ``mean``/``logvar`` (C, t >= frames, F): the clip's posterior."""
    start = int(torch.randint(0, mean.shape[1] - frames + 1, (1,), generator=generator))
    unconditional = bool(torch.rand((), generator=generator) < p_uncond)
    crop = slice(start, start + frames)
    z0 = scaling_factor * DiagonalGaussian(mean[None, :, crop], logvar[None, :, crop]).sample(generator)[0]
    t = int(torch.randint(0, timesteps, (1,), generator=generator))
    noise = randn(tuple(z0.shape), generator)
    if noise_offset:
        noise = noise + noise_offset * randn((z0.shape[0], 1, 1), generator)
    return Draws(z0, noise, t, unconditional)


def _scales(abar: Tensor, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """sqrt(abar_t), sqrt(1 - abar_t) as (B, 1, 1, 1), computed as diffusers' ``add_noise``."""
    abar = abar.to(like.device, like.dtype)[t.to(like.device)]
    return (abar**0.5).reshape(-1, 1, 1, 1), ((1 - abar) ** 0.5).reshape(-1, 1, 1, 1)


def noised(z0: Tensor, noise: Tensor, t: Tensor, abar: Tensor) -> Tensor:
    """z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps."""
    a, s = _scales(abar, t, z0)
    return a * z0 + s * noise


def target(z0: Tensor, noise: Tensor, t: Tensor, abar: Tensor, prediction_type: str) -> Tensor:
    """What the UNet learns to predict: eps, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) z0."""
    if prediction_type == "epsilon":
        return noise
    a, s = _scales(abar, t, z0)
    return a * noise - s * z0


def snr_weight(t: Tensor, abar: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-gamma loss weights (B,), as diffusers' scripts compute them (``training_utils.compute_snr``)."""
    a = abar.to(t.device)[t]
    snr = (a**0.5 / (1 - a) ** 0.5) ** 2
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1)


def item_losses(
    unet: nn.Module,
    z0: Tensor,
    noise: Tensor,
    t: Tensor,
    cond: Conditions,
    abar: Tensor,
    prediction_type: str,
    snr_gamma: float | None = None,
    autocast: torch.dtype | None = None,
) -> Tensor:
    """Each item's loss (B,) float32: the weighted mean squared error of the UNet's prediction (called as the
    samplers call it, ``generate.guided_denoiser`` without guidance); ``autocast``: the forward's dtype under
    mixed precision."""
    x = noised(z0, noise, t, abar)
    with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
        pred = guided_denoiser(unet, cond, 1.0)(x, t)
    losses = (pred.float() - target(z0, noise, t, abar, prediction_type).float()).square().mean(dim=(1, 2, 3))
    return losses if snr_gamma is None else losses * snr_weight(t, abar, snr_gamma, prediction_type)


def learning_rate(step: int, base: float, warmup: int, schedule: str, steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear from base / warmup up to base over the
    first ``warmup`` steps, then constant, or a half cosine down to 0 at ``steps``."""
    if step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_decay(updates: int, decay: float) -> float:
    """The EMA's decay at its ``updates``-th update (1-based): 0 at the first (the EMA starts as the weights),
    then min(decay, (1 + n) / (10 + n)), n = updates - 1: diffusers' ``EMAModel`` (the original's ``LitEma``
    has the same warm-up, one update earlier)."""
    n = updates - 1
    return 0.0 if n <= 0 else min(decay, (1 + n) / (10 + n))
