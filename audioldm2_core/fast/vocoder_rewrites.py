"""The vocoder's rewrite (``vocoder-channels-last``): its 1-D convs on (B, C, L) signals stored (B, L, C) as
2-D convs over (B, C, 1, L) channels-last, the layout oneDNN's kernels are fastest in; the output keeps it.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .guards import twin


def _nlc(x: Tensor) -> bool:
    """Whether a (B, C, L) tensor is stored as (B, L, C): the vocoder's input is (the transposed mel), and
    convolutions in that layout keep it, as do the element-wise ops between them."""
    C = x.shape[1] if x.dim() == 3 else 0
    return C > 0 and x.device.type == "cpu" and x.stride(2) == C and (x.stride(1) == 1 or C == 1)


@twin
class FastConv1d(nn.Conv1d):
    """A 1-D conv on a (B, C, L) input stored as (B, L, C), as a 2-D conv over (B, C, 1, L) channels-last:
    oneDNN's fast layout for the vocoder's long, narrow signals; the output keeps it (``vocoder-channels-last``)."""

    def forward(self, x: Tensor) -> Tensor:
        if not (_nlc(x) and self.fast_plan.on("vocoder-channels-last", x.dtype)):
            return super().forward(x)
        (s,), (p,), (d,) = self.stride, self.padding, self.dilation
        y = F.conv2d(x.unsqueeze(2), self.weight.unsqueeze(2), self.bias, (1, s), (0, p), (1, d), self.groups)
        return y.squeeze(2)


@twin
class FastConvTranspose1d(nn.ConvTranspose1d):
    """As :class:`FastConv1d`, for the vocoder's upsamplers."""

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        if output_size is not None or not (_nlc(x) and self.fast_plan.on("vocoder-channels-last", x.dtype)):
            return super().forward(x, output_size)
        (s,), (p,), (op,), (d,) = self.stride, self.padding, self.output_padding, self.dilation
        w = self.weight.unsqueeze(2)  # (in, out / groups, 1, k)
        return F.conv_transpose2d(
            x.unsqueeze(2), w, self.bias, (1, s), (0, p), (0, op), self.groups, (1, d)
        ).squeeze(2)
