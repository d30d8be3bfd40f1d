"""VAE decoder: latents -> log-mel spectrogram (the decoder half of diffusers' ``AutoencoderKL``).

Place in the AudioLDM 2 data flow: the UNet denoises latents of shape (B, 8, T/4, 16); this module turns them
into a log-mel spectrogram (B, 1, T, 64), which ``vocoder.py`` turns into a waveform. T is the number of mel
frames (100 per second at 16 kHz with a hop of 160 samples); the spectrogram is treated as a one-channel image
of height T (time) and width 64 (mel bins), so both axes are upsampled by ``2 ** (len(block_out_channels) - 1)``
(4 for the hub's three blocks).

    latents (B, 8, t, f)  -- multiplied by 1 / scaling_factor here (see ``decode``)
      post_quant_conv     1x1 conv, 8 -> 8
      decoder.conv_in     3x3 conv, 8 -> 512
      decoder.mid_block   resnet, single-head self-attention over all t*f positions, resnet
      decoder.up_blocks   3 x (3 resnets, then nearest 2x upsample + 3x3 conv except in the last block);
                          widths 512, 256, 128 (block_out_channels reversed)
      conv_norm_out, SiLU, conv_out (128 -> 1)
    mel (B, 1, 4t, 4f)

Reference: diffusers ``AutoencoderKL`` (``models/autoencoders/autoencoder_kl.py``, ``Decoder`` in
``models/autoencoders/vae.py``, ``UNetMidBlock2D`` / ``UpDecoderBlock2D`` / ``ResnetBlock2D`` / ``Upsample2D``,
``AttnProcessor2_0``), called as ``AudioLDM2Pipeline.__call__`` calls it:
``vae.decode(1 / vae.config.scaling_factor * latents).sample``.

Quirks:
- ``decode`` takes the latents as the UNet produced them and applies the ``1 / scaling_factor`` itself, in the
  pipeline's order (multiply by the Python float ``1 / s``, not divide by ``s``), so the rounding is the same.
- The hub's ``force_upcast: true`` is ignored by the AudioLDM 2 pipeline (only the SD pipelines read it); we
  decode in the dtype we were loaded in, like the reference.
- The mid-block attention has one head as wide as the channels (diffusers passes ``attention_head_dim =
  channels``), and its ``to_out`` is ``[Linear, Dropout]``: only ``to_out.0`` holds weights.
- Every GroupNorm of the decoder uses eps=1e-6 (not PyTorch's 1e-5).
- The weight file holds the whole autoencoder; we read only the decoder's tensors and check that everything
  else is the encoder (``_decoder_keys``).

Left out on purpose: the encoder and ``quant_conv`` (AudioLDM 2 inference never encodes), tiling and slicing,
the ``spatial`` norm variant, dropout, gradient checkpointing, ``return_dict``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VAEConfig, vae_config
from .loading import Checkpoint, WeightsError, empty_init, load_strict

__all__ = ["AutoencoderKLDecoder", "load_vae"]

_EPS = 1e-6  # every GroupNorm in diffusers' VAE decoder


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a 1x1-conv shortcut where the width changes. No time embedding."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    """Single-head self-attention over the t*f positions of a feature map, with a residual connection."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # diffusers' to_out.1 is a Dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> same."""
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)  # (B, HW, C): one token per position
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, HW, C); scale 1/sqrt(C)
        h = self.to_out[0](h)
        return h.transpose(1, 2).reshape(B, C, H, W) + x  # (B, C, H, W)


class UNetMidBlock2D(nn.Module):
    """resnet, (attention, resnet): the decoder's bottleneck at the lowest resolution."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        # Without attention diffusers keeps a None placeholder, which holds no keys: an empty list is the same.
        self.attentions = nn.ModuleList([Attention(channels, groups)] if add_attention else [])
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling of both axes (time and mel bins), then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups)
                for i in range(num_layers)
            ]
        )
        # diffusers' `upsamplers` is a one-element list (None in the last block: no keys, like an empty list)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)] if add_upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for upsampler in self.upsamplers:
            x = upsampler(x)
        return x


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = list(reversed(cfg.block_out_channels))  # (512, 256, 128): widest at the lowest resolution
        groups = cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[0], kernel_size=3, padding=1)
        self.mid_block = UNetMidBlock2D(widths[0], groups, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            [
                UpDecoderBlock2D(
                    widths[max(i - 1, 0)],
                    widths[i],
                    num_layers=cfg.layers_per_block + 1,  # the decoder has one more resnet than the encoder
                    groups=groups,
                    add_upsample=i < len(widths) - 1,
                )
                for i in range(len(widths))
            ]
        )
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(widths[-1], cfg.out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKLDecoder(nn.Module):
    """The decoding half of ``AutoencoderKL``; attribute names are the checkpoint's keys."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        self.decoder = Decoder(cfg)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C_lat, t, f) as the UNet produced them -> mel spectrogram (B, out_channels, s*t, s*f).

        Equals ``AutoencoderKL.decode(1 / scaling_factor * latents).sample``: the scaling is done here.
        """
        z = latents * (1 / self.cfg.scaling_factor)  # the pipeline's `1 / s * latents`, same rounding
        return self.decoder(self.post_quant_conv(z))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decode(latents)


def _decoder_keys(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """Read the decoder's tensors only, and assert that the rest of the file is exactly the encoder.

    The vae weight file holds the whole autoencoder (``encoder.*``, ``quant_conv.*``, ``decoder.*``,
    ``post_quant_conv.*``). The encoder is never needed at inference, so its tensors are not read (``select``
    is consulted before a tensor is loaded); but a key belonging to neither half means the file is not the
    autoencoder we think it is, and is an error rather than something to skip silently.
    """
    seen: list[str] = []

    def is_decoder(key: str) -> bool:
        seen.append(key)
        return key.startswith(("decoder.", "post_quant_conv."))

    state = ckpt.read_weights("vae", select=is_decoder)
    rest = [k for k in seen if k not in state]
    stray = [k for k in rest if not k.startswith(("encoder.", "quant_conv."))]
    if stray or not any(k.startswith("encoder.") for k in rest) or "quant_conv.weight" not in rest:
        raise WeightsError(
            f"{ckpt.root}/vae: expected the file to hold the encoder (encoder.*, quant_conv.*) besides the "
            f"decoder; keys of neither: {sorted(stray)[:12]}; encoder keys found: {len(rest) - len(stray)}"
        )
    return state


def load_vae(
    ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> AutoencoderKLDecoder:
    """Build the VAE decoder of a checkpoint and fill it strictly from ``vae/``."""
    cfg = vae_config(ckpt.config("vae"))
    with empty_init():  # meta device, no random init: the file fills every tensor
        model = AutoencoderKLDecoder(cfg)
    return load_strict(model, _decoder_keys(ckpt), f"{ckpt.root}/vae", dtype=dtype, device=device).eval()
