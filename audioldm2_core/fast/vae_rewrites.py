"""The VAE decoder's rewrites.

    vae-channels-last  the decoder's convs and norms on (B, C, H, W)   the same ops on (B, H, W, C) memory
    phase-upsampling   its nearest 2x + 3x3 convs                       four 2x2 convs of the input (``convs``)

Its 3x3 convs are ``convs.FastConv2d`` (winograd-conv, gemm-conv), as the UNet's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import vae
from .convs import nearest2x_conv3x3, upsample_pays
from .guards import twin


@twin
class FastVAEUpsample(vae.Upsample2D):
    """As :class:`FastUNetUpsample`; the summed weights are not kept: the decoder runs once per generation,
    and they would sit in memory through the vocoder, where the peak is."""

    def forward(self, x: Tensor) -> Tensor:
        if upsample_pays(x, self.conv, None, self.fast_plan):
            return nearest2x_conv3x3(x, self.conv, cache=False)
        return super().forward(x)


@twin
class FastVAEDecoder(vae.AutoencoderKLDecoder):
    """Decodes in channels-last memory ((B, H, W, C)), where oneDNN's convolutions and GroupNorm are fastest
    on the CPU; every layer keeps the layout, the result is returned in the usual one (``vae-channels-last``)."""

    def decode(self, latents: Tensor) -> Tensor:
        if latents.device.type != "cpu" or not self.fast_plan.on("vae-channels-last", latents.dtype):
            return super().decode(latents)
        return super().decode(latents.contiguous(memory_format=torch.channels_last)).contiguous()
