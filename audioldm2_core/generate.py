"""AudioLDM 2's inference procedure (Liu et al. 2024, "AudioLDM 2: Learning Holistic Audio Generation with
Self-supervised Pretraining", fig. 1), as a few functions over loaded components:

    conditions  prompt -> CLAP + Flan-T5 (speech: VITS) -> projection -> GPT-2's 8 "language of audio"
                states (conditioning.encode_prompt)                                  -> Conditions
    x_T         N(0, I) noise (text_to_audio), or the input's latents noised to a step (audio_to_audio)
    denoising   the sampler over the guided denoiser: the UNet attends to both conditions  -> z_0 (B, 8, t, 16)
    decode      z_0 -> VAE decoder -> log-mel (B, 1, 4t, 64) -> HiFi-GAN -> 16 kHz waveform (B, 640 t)

Each function runs under autograd as well as in inference mode (training calls the same ones). Memory policy
(which component is loaded when), CUDA graphs and compilation are applied to the components and the denoiser
from outside, by the pipeline; the stages never see them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .audio import log_mel
from .config import SchedulerConfig
from .editing import repaint_callback
from .noise import Generators
from .samplers import Callback, Denoiser, SamplerFn, add_noise, init_noise_sigma, sample

__all__ = ["Conditions", "guided_denoiser", "text_to_audio", "audio_to_audio", "encode_audio", "decode"]


@dataclass(frozen=True)
class Conditions:
    """What the UNet attends to, per latent of the batch: under guidance the rows are [negative, positive]."""

    t5: Tensor  # (B', L, d) Flan-T5 states (speech: VITS phoneme states): diffusers' prompt_embeds
    t5_mask: Tensor  # (B', L) 1 where attended: diffusers' attention_mask
    loa: Tensor  # (B', n, 768) GPT-2's generated "language of audio": diffusers' generated_prompt_embeds
    guided: bool  # B' = 2 B, the negative prompts' rows first

    @property
    def batch(self) -> int:
        """B: the latents denoised under these conditions."""
        return self.loa.shape[0] // (2 if self.guided else 1)


def guided_denoiser(unet: nn.Module, cond: Conditions, guidance_scale: float) -> Denoiser:
    """Classifier-free guidance (Ho & Salimans 2022): eps = eps(x | neg) + w (eps(x | pos) - eps(x | neg)),
    both halves in one UNet batch. Samplers see only ``model(x, t)``."""

    def model(x: Tensor, t: Tensor) -> Tensor:
        out = unet(
            torch.cat([x] * 2) if cond.guided else x,
            t,
            encoder_hidden_states=cond.loa,
            encoder_hidden_states_1=cond.t5,
            encoder_attention_mask_1=cond.t5_mask,
        )
        if cond.guided:
            uncond, text = out.chunk(2)
            out = uncond + guidance_scale * (text - uncond)
        return out

    return model


def text_to_audio(
    denoiser: Denoiser,
    noise: Tensor,
    cfg: SchedulerConfig,
    steps: int,
    sampler: str | SamplerFn = "ddim",
    *,
    eta: float = 0.0,
    generator: Generators = None,
    callback: Callback | None = None,
) -> Tensor:
    """The latent diffusion model's reverse process (Rombach et al. 2022): x_T = ``noise`` (N(0, I)) at the
    sampler's scale, denoised in ``steps`` steps to z_0."""
    x = noise * init_noise_sigma(sampler, cfg, steps)
    return sample(sampler, denoiser, x, cfg, steps, eta=eta, generator=generator, callback=callback)


def audio_to_audio(
    denoiser: Denoiser,
    z0: Tensor,
    noise: Tensor,
    cfg: SchedulerConfig,
    steps: int,
    start: int,
    sampler: str | SamplerFn = "ddim",
    *,
    mask: Tensor | None = None,
    eta: float = 0.0,
    generator: Generators = None,
    callback: Callback | None = None,
) -> Tensor:
    """SDEdit (Meng et al. 2022): the input's latents ``z0`` noised to step ``start`` and denoised from there.
    With a ``mask`` (True = regenerate), RePaint (Lugmayr et al. 2022): before every step the rest is z0 noised
    to that step's level, and at the end z0 itself (``editing.py``)."""
    x = add_noise(sampler, cfg, steps, z0, noise, start)
    if mask is not None:
        callback = repaint_callback(sampler, cfg, steps, z0, mask, generator, callback)
    x = sample(sampler, denoiser, x, cfg, steps, start=start, eta=eta, generator=generator, callback=callback)
    return x if mask is None else torch.where(mask, x, z0.to(x.dtype))


def encode_audio(
    vae_encoder: nn.Module, wave: Tensor, frames: int, *, sample: bool = False, generator: Generators = None
) -> Tensor:
    """A 16 kHz mono waveform -> z0 = scaling_factor * E(log-mel) (1, 8, frames / 4, 16): the posterior's mean,
    or a draw from it (``sample``, as the original encodes its training data). The log-mel is the original's
    front end (``audio.log_mel``), cut or padded to ``frames``."""
    p = next(vae_encoder.parameters())
    mel = log_mel(wave, frames)[None, None].to(p.device, p.dtype)  # (1, 1, frames, 64)
    return vae_encoder.encode(mel, sample=sample, generator=generator)


def decode(vae: nn.Module, vocoder: nn.Module, latents: Tensor) -> Tensor:
    """z_0 (B, 8, t, 16) -> log-mel (B, 1, 4t, 64) by the VAE's decoder -> waveform (B, 640 t) by HiFi-GAN
    (Kong et al. 2020), float32."""
    mel = vae.decode(latents.to(next(vae.parameters()).dtype))
    return vocoder(mel.squeeze(1)).float()
