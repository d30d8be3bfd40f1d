"""HiFi-GAN vocoder: log-mel spectrogram -> waveform (transformers' ``SpeechT5HifiGan``).

Place in the AudioLDM 2 data flow: last stage. The VAE decodes latents into a log-mel spectrogram
(B, 1, T, 64); the pipeline drops the channel axis and this module turns (B, T, 64) into a 16 kHz waveform
(B, samples), which the pipeline then cuts to the requested length.

    mel (B, T, 64) -> transpose -> (B, 64, T)
      conv_pre                    7-tap conv, 64 -> 1024 channels
      5 x [leaky ReLU(0.1), upsampler[i] (ConvTranspose1d, stride r_i, width halves),
           mean of the 3 resblocks (kernels 3, 7, 11; dilations 1, 3, 5) of that stage]
      leaky ReLU(0.01), conv_post (7 taps, -> 1 channel), tanh
    waveform (B, samples)

Reference: ``SpeechT5HifiGan`` and ``HifiGanResidualBlock`` in transformers
``models/speecht5/modeling_speecht5.py``; HiFi-GAN V1 generator (Kong et al. 2020).

Quirks:
- Output length is not exactly hop * T: a ConvTranspose1d with stride r, kernel k and padding (k - r) // 2
  gives r * L + (k - r) % 2 samples, so the hub's first upsampler (r=5, k=16) adds one sample, which the
  later stages multiply: 160 * T + 32 samples for the hub config (``num_samples`` computes it). The pipeline
  cuts the waveform to ``audio_length_in_s * sampling_rate`` afterwards.
- The last leaky ReLU uses PyTorch's default slope 0.01, not ``leaky_relu_slope`` (as in the reference and the
  original HiFi-GAN).
- ``mean`` / ``scale`` are persistent buffers in the weight file (zeros / ones on the hub). They are applied,
  ``(mel - mean) / scale``, only when ``normalize_before`` is true; AudioLDM 2's config sets it false.
- The hub file holds plain conv weights: weight norm was folded in before conversion, so there are no
  ``weight_g`` / ``weight_v`` (or ``parametrizations.weight.original0/1``) keys and no weight norm here.
- Unbatched input (T, 64) gives an unbatched waveform (samples,), like the reference.

Left out on purpose: weight-norm apply/remove (training only), ``return_dict``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VocoderConfig, vocoder_config
from .loading import Checkpoint, empty_init, load_strict

__all__ = ["SpeechT5HifiGan", "load_vocoder", "num_samples"]


class HifiGanResidualBlock(nn.Module):
    """Pairs of (dilated conv, plain conv), each pair preceded by leaky ReLUs and wrapped in a residual."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...], slope: float):
        super().__init__()
        self.slope = slope
        # padding (k*d - d) // 2 keeps the length: "same" padding of a dilated, odd-sized kernel
        self.convs1 = nn.ModuleList(
            [
                nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=(kernel_size * d - d) // 2)
                for d in dilations
            ]
        )
        self.convs2 = nn.ModuleList(
            [nn.Conv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2) for _ in dilations]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, L) -> same shape."""
        for conv1, conv2 in zip(self.convs1, self.convs2, strict=True):
            h = conv1(F.leaky_relu(x, self.slope))
            h = conv2(F.leaky_relu(h, self.slope))
            x = h + x
        return x


class SpeechT5HifiGan(nn.Module):
    """The HiFi-GAN generator; attribute names are the checkpoint's keys."""

    def __init__(self, cfg: VocoderConfig):
        super().__init__()
        C = cfg.upsample_initial_channel
        n_up = len(cfg.upsample_rates)  # the width halves at every stage (floor division, as the reference)
        self.cfg = cfg
        self.conv_pre = nn.Conv1d(cfg.model_in_dim, C, kernel_size=7, padding=3)
        self.upsampler = nn.ModuleList(
            [
                nn.ConvTranspose1d(
                    C // 2**i, C // 2 ** (i + 1), kernel_size=k, stride=r, padding=(k - r) // 2
                )
                for i, (r, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, strict=True))
            ]
        )
        # flat list, stage-major: resblocks[i * K + j] is kernel j of stage i (K = len(resblock_kernel_sizes))
        self.resblocks = nn.ModuleList(
            [
                HifiGanResidualBlock(C // 2 ** (i + 1), k, d, cfg.leaky_relu_slope)
                for i in range(n_up)
                for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=True)
            ]
        )
        self.conv_post = nn.Conv1d(C // 2**n_up, 1, kernel_size=7, padding=3)
        # Persistent: the file holds them (placeholders when normalize_before is false); filled by the loader.
        self.register_buffer("mean", torch.zeros(cfg.model_in_dim))
        self.register_buffer("scale", torch.ones(cfg.model_in_dim))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """Log-mel (B, T, model_in_dim) -> waveform (B, num_samples(T)); unbatched (T, mel) -> (samples,)."""
        if self.cfg.normalize_before:
            mel = (mel - self.mean) / self.scale
        batched = mel.dim() == 3
        x = mel if batched else mel.unsqueeze(0)
        x = self.conv_pre(x.transpose(1, 2))  # (B, mel, T) -> (B, C, T)
        K = len(self.cfg.resblock_kernel_sizes)
        for i, up in enumerate(self.upsampler):
            x = up(F.leaky_relu(x, self.cfg.leaky_relu_slope))  # (B, C / 2**(i+1), ~r_i * L)
            # multi-receptive-field fusion: the mean of K residual stacks, summed in the reference's order
            h = self.resblocks[i * K](x)
            for j in range(1, K):
                h = h + self.resblocks[i * K + j](x)
            x = h / K
        x = torch.tanh(self.conv_post(F.leaky_relu(x)))  # default slope 0.01, as the reference
        wave = x.reshape(x.shape[0], -1)  # (B, 1, samples) -> (B, samples)
        return wave if batched else wave[0]


def num_samples(cfg: VocoderConfig, frames: int) -> int:
    """Length of the waveform the vocoder makes from ``frames`` mel frames (ConvTranspose1d arithmetic)."""
    n = frames
    for r, k in zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, strict=True):
        n = (n - 1) * r - 2 * ((k - r) // 2) + k
    return n


def load_vocoder(
    ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> SpeechT5HifiGan:
    """Build the vocoder of a checkpoint and fill it strictly from ``vocoder/``."""
    cfg = vocoder_config(ckpt.config("vocoder"))
    with empty_init():  # meta device, no random init: the file fills every tensor
        model = SpeechT5HifiGan(cfg)
    return load_strict(
        model, ckpt.read_weights("vocoder"), f"{ckpt.root}/vocoder", dtype=dtype, device=device
    ).eval()
