"""VAE: log-mel spectrogram <-> latents, diffusers' ``AutoencoderKL`` as two modules, one per direction.

Place in the AudioLDM 2 data flow: the UNet denoises latents of shape (B, 8, T/4, 16); the decoder turns them
into a log-mel spectrogram (B, 1, T, 64), which ``vocoder.py`` turns into a waveform. The encoder goes the other
way, only when audio comes in (style transfer, inpainting, super-resolution): the log-mel of ``audio.log_mel``
-> the posterior over latents. T is the number of mel frames (100 per second at 16 kHz with a hop of 160
samples); the spectrogram is treated as a one-channel image of height T (time) and width 64 (mel bins), so both
axes are scaled by ``2 ** (len(block_out_channels) - 1)`` (4 for the hub's three blocks).

    decoder (AutoencoderKLDecoder, text-to-audio)      encoder (AutoencoderKLEncoder, audio in)
    latents (B, 8, t, f) * 1 / scaling_factor          mel (B, 1, 4t, 4f)
      post_quant_conv   1x1 conv, 8 -> 8                 encoder.conv_in     3x3 conv, 1 -> 128
      decoder.conv_in   3x3 conv, 8 -> 512               encoder.down_blocks 3 x (2 resnets, then a stride-2
      decoder.mid_block resnet, attention, resnet                            3x3 conv except in the last
      decoder.up_blocks 3 x (3 resnets, then nearest                         block); widths 128, 256, 512
                        2x upsample + 3x3 conv except    encoder.mid_block   resnet, attention, resnet
                        in the last); 512, 256, 128      conv_norm_out, SiLU, conv_out (512 -> 2 * 8)
      conv_norm_out, SiLU, conv_out (128 -> 1)           quant_conv          1x1 conv, 16 -> 16
    mel (B, 1, 4t, 4f)                                 mean, logvar (B, 8, t, f) each -> * scaling_factor

Reference: diffusers ``AutoencoderKL`` (``models/autoencoders/autoencoder_kl.py``, ``Encoder``, ``Decoder`` and
``DiagonalGaussianDistribution`` in ``models/autoencoders/vae.py``, ``UNetMidBlock2D`` / ``DownEncoderBlock2D`` /
``UpDecoderBlock2D`` / ``ResnetBlock2D`` / ``Downsample2D`` / ``Upsample2D``, ``AttnProcessor2_0``), called as
``AudioLDM2Pipeline.__call__`` calls it: ``vae.decode(1 / vae.config.scaling_factor * latents).sample``; and,
for the encoder, as the original AudioLDM 2 code encodes its training data (``get_first_stage_encoding``:
``scale_factor * posterior.sample()``; diffusers' AudioLDM 2 pipeline never encodes).

Quirks:
- ``decode`` takes the latents as the UNet produced them and applies the ``1 / scaling_factor`` itself, in the
  pipeline's order (multiply by the Python float ``1 / s``, not divide by ``s``), so the rounding is the same;
  ``encode`` returns them at the UNet's scale (``scaling_factor * z``); ``posterior`` is the unscaled
  distribution, diffusers' ``latent_dist``.
- The encoder's downsampling pads the right and bottom edges by one zero (diffusers' ``Downsample2D`` with
  ``padding=0``) and then runs a stride-2 3x3 conv without padding: (H, W) -> (H // 2, W // 2) for even sizes.
- The posterior's log-variance is clamped to [-30, 20] before ``std = exp(logvar / 2)``, as diffusers does.
- The hub's ``force_upcast: true`` is ignored by the AudioLDM 2 pipeline (only the SD pipelines read it); we
  run in the dtype we were loaded in, like the reference.
- The mid-block attention has one head as wide as the channels (diffusers passes ``attention_head_dim =
  channels``), and its ``to_out`` is ``[Linear, Dropout]``: only ``to_out.0`` holds weights.
- Every GroupNorm of the VAE uses eps=1e-6 (not PyTorch's 1e-5).
- The weight file holds the whole autoencoder. Each half reads only its own tensors, and checks that the file's
  keys are exactly the two halves (``_vae_keys``): text-to-audio never reads the encoder's.

Left out on purpose: tiling and slicing, the ``spatial`` norm variant, dropout, gradient checkpointing,
``return_dict``, the posterior's ``kl`` / ``nll`` (training only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import VAEConfig, vae_config
from .errors import WeightsError
from .loading import Checkpoint, empty_init, load_strict
from .noise import randn

__all__ = ["AutoencoderKLDecoder", "AutoencoderKLEncoder", "DiagonalGaussian", "load_vae", "load_vae_encoder"]

_EPS = 1e-6  # every GroupNorm in diffusers' VAE


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
    """resnet, (attention, resnet): the bottleneck at the lowest resolution, in the encoder and the decoder."""

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


class Downsample2D(nn.Module):
    """Zero-pad right and bottom by one, then a stride-2 3x3 conv: (H, W) -> (H // 2, W // 2) for even H, W."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (left, right, top, bottom): diffusers' asymmetric padding


class DownEncoderBlock2D(nn.Module):
    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_downsample: bool
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups)
                for i in range(num_layers)
            ]
        )
        # diffusers' `downsamplers` is a one-element list (None in the last block: no keys, like an empty list)
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)] if add_downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for downsampler in self.downsamplers:
            x = downsampler(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = cfg.block_out_channels  # (128, 256, 512): widest at the lowest resolution
        groups = cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList(
            [
                DownEncoderBlock2D(
                    widths[max(i - 1, 0)],
                    widths[i],
                    num_layers=cfg.layers_per_block,
                    groups=groups,
                    add_downsample=i < len(widths) - 1,
                )
                for i in range(len(widths))
            ]
        )
        self.mid_block = UNetMidBlock2D(widths[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=_EPS)
        # mean and log-variance of every latent channel (diffusers' double_z, always on in AutoencoderKL)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.latent_channels, kernel_size=3, padding=1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(mel)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


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


@dataclass
class DiagonalGaussian:
    """The encoder's posterior over unscaled latents, N(mean, std^2) per element: diffusers' ``latent_dist``."""

    mean: torch.Tensor  # (B, C_lat, t, f)
    logvar: torch.Tensor  # (B, C_lat, t, f), clamped to [-30, 20]

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """mean + std * noise, the noise drawn as diffusers' ``DiagonalGaussianDistribution.sample`` draws it
        (``randn_tensor`` of the mean's shape, dtype and device): one generator gives the same numbers."""
        noise = randn(tuple(self.mean.shape), generator, self.mean.device, self.mean.dtype)
        return self.mean + self.std * noise


class AutoencoderKLEncoder(nn.Module):
    """The encoding half of ``AutoencoderKL``; attribute names are the checkpoint's keys."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)

    def posterior(self, mel: torch.Tensor) -> DiagonalGaussian:
        """Log-mel (B, in_channels, T, F) -> the posterior over unscaled latents (B, C_lat, T / s, F / s).

        Equals ``AutoencoderKL.encode(mel).latent_dist`` (mean, logvar and so std).
        """
        moments = self.quant_conv(self.encoder(mel))  # (B, 2 C_lat, t, f)
        mean, logvar = moments.chunk(2, dim=1)
        return DiagonalGaussian(mean, torch.clamp(logvar, -30.0, 20.0))

    def encode(
        self,
        mel: torch.Tensor,
        sample: bool = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Log-mel (B, in_channels, T, F) -> latents at the UNet's scale, ``scaling_factor * z``.

        ``z`` is the posterior's mean (deterministic, the default), or with ``sample=True`` a draw from it (as
        the original AudioLDM 2 encodes its training data; the generator as in :meth:`DiagonalGaussian.sample`).
        """
        posterior = self.posterior(mel)
        z = posterior.sample(generator) if sample else posterior.mean
        return self.cfg.scaling_factor * z

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.encode(mel)


_HALVES = {"encoder": ("encoder.", "quant_conv."), "decoder": ("decoder.", "post_quant_conv.")}


def _vae_keys(ckpt: Checkpoint, half: str) -> dict[str, torch.Tensor]:
    """Read one half's tensors only, and check that the file holds exactly the two halves.

    The vae weight file holds the whole autoencoder (``encoder.*``, ``quant_conv.*``, ``decoder.*``,
    ``post_quant_conv.*``). Text-to-audio needs only the decoder, so the encoder's tensors are not read then
    (``select`` is consulted before a tensor is loaded), and the other way round. But a key belonging to neither
    half, or a file missing the other half, means the file is not the autoencoder we think it is: an error
    rather than something to skip silently. Which of the half's own keys are missing or unexpected is
    ``load_strict``'s to say.
    """
    seen: list[str] = []

    def wanted(key: str) -> bool:
        seen.append(key)
        return key.startswith(_HALVES[half])

    state = ckpt.read_weights("vae", select=wanted)
    (other,) = (h for h in _HALVES if h != half)
    rest = [k for k in seen if k not in state]
    stray = [k for k in rest if not k.startswith(_HALVES[other])]
    conv = f"{_HALVES[other][1]}weight"  # quant_conv.weight or post_quant_conv.weight
    if stray or not any(k.startswith(_HALVES[other][0]) for k in rest) or conv not in rest:
        prefixes = ", ".join(p + "*" for p in _HALVES[other])
        raise WeightsError(
            f"{ckpt.root}/vae: expected the file to hold the {other} ({prefixes}) besides the {half}; "
            f"keys of neither: {sorted(stray)[:12]}; {other} keys found: {len(rest) - len(stray)}"
        )
    return state


def load_vae(
    ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> AutoencoderKLDecoder:
    """Build the VAE decoder of a checkpoint and fill it strictly from ``vae/`` (the encoder is not read)."""
    cfg = vae_config(ckpt.config("vae"))
    with empty_init():  # meta device, no random init: the file fills every tensor
        model = AutoencoderKLDecoder(cfg)
    return load_strict(
        model, _vae_keys(ckpt, "decoder"), f"{ckpt.root}/vae", dtype=dtype, device=device
    ).eval()


def load_vae_encoder(
    ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> AutoencoderKLEncoder:
    """Build the VAE encoder of a checkpoint and fill it strictly from ``vae/`` (the decoder is not read)."""
    cfg = vae_config(ckpt.config("vae"))
    with empty_init():
        model = AutoencoderKLEncoder(cfg)
    return load_strict(
        model, _vae_keys(ckpt, "encoder"), f"{ckpt.root}/vae", dtype=dtype, device=device
    ).eval()
