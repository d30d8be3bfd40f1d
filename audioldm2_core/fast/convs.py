"""3x3 convolutions computed another exact way, shared by the UNet and the VAE decoder.

    phase-upsampling   nearest 2x + 3x3 conv as four 2x2 convs of the input (``nearest2x_conv3x3``); the
                       upsampler modules that call it are the UNet's and the VAE's (``unet_rewrites``,
                       ``vae_rewrites``)
    winograd-conv      a 3x3 conv by Winograd F(2x2, 3x3) (``winograd_conv3x3``), float32
    gemm-conv          a 3x3 conv as one GEMM over an im2col copy (``gemm_conv3x3``), small maps

``FastConv2d`` takes the Winograd or the GEMM route where its model's plan has it on and, under
``select="auto"``, where it was faster for the input's shape on this CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .guards import channels_last, no_grad, twin, untouched
from .linears import linear
from .plan import OFF, Plan, probe_rows

PHASE_CACHE = "_phase_weights"  # the attribute of an upsampler's conv holding its summed phase kernels


def phase_weights(weight: Tensor) -> Tensor:
    """(O, I, 3, 3) -> (2, 2, O, I, 2, 2): the 2x2 kernel of output phase (row a, column b).

    Nearest 2x repeats each pixel 2x2, so each output phase of the 3x3 conv sees a 2x2 neighbourhood of the
    original pixels, some taps landing on the same pixel: even rows take original rows (i-1, i) with
    weights (w0, w1 + w2), odd rows (i, i+1) with (w0 + w1, w2); the same for columns. Summed in float32
    (float64 for float64 weights) and rounded once to the weight's dtype.
    """
    w = weight.to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    rows = torch.stack(
        [
            torch.stack([w[..., 0, :], w[..., 1, :] + w[..., 2, :]], -2),  # a = 0: (w0, w1 + w2)
            torch.stack([w[..., 0, :] + w[..., 1, :], w[..., 2, :]], -2),  # a = 1: (w0 + w1, w2)
        ]
    )  # (2a, O, I, 2, 3)
    both = torch.stack(
        [
            torch.stack([rows[..., 0], rows[..., 1] + rows[..., 2]], -1),  # b = 0
            torch.stack([rows[..., 0] + rows[..., 1], rows[..., 2]], -1),  # b = 1
        ],
        1,
    )  # (2a, 2b, O, I, 2, 2)
    return both.to(weight.dtype).contiguous()


def _cached_phase_weights(conv: nn.Conv2d) -> Tensor:
    """``phase_weights(conv.weight)``, kept while the weight's storage and version counter stay the same (a
    ``copy_``, an optimizer step or a new Parameter recompute it). Inference tensors have no version
    counter: for them it is computed per call."""
    w = conv.weight
    if w.is_inference() or torch.compiler.is_compiling():
        return phase_weights(w)
    key = (w.data_ptr(), w._version, w.dtype, w.device)
    cached = conv.__dict__.get(PHASE_CACHE)
    if cached is None or cached[0] != key:
        with (
            torch.inference_mode(False),
            torch.no_grad(),
        ):  # a normal tensor, usable in and out of inference mode
            cached = (key, phase_weights(w))
        conv.__dict__[PHASE_CACHE] = cached
    return cached[1]


def nearest2x_conv3x3(x: Tensor, conv: nn.Conv2d, cache: bool = True) -> Tensor:
    """``conv(F.interpolate(x, scale_factor=2, mode="nearest"))`` for a 3x3, stride-1, padding-1 ``conv`` as four
    2x2 convolutions of ``x`` (see ``phase_weights``), interleaved: the 4x larger input is never built.

    x (B, C, H, W), NCHW or channels-last -> (B, O, 2H, 2W) in the same memory format. ``cache=False`` sums the
    phase weights for this call only (a module called once per generation need not keep 16/9 of its weight).
    """
    B, _, H, W = x.shape
    phases = _cached_phase_weights(conv) if cache else phase_weights(conv.weight)
    O = phases.shape[2]
    nhwc = channels_last(x)
    if nhwc:  # physical (B, H, 2, W, 2, O) -> logical (B, O, 2H, 2W), channels-last
        out = x.new_empty(B, H, 2, W, 2, O)
        view = out.view(B, 2 * H, 2 * W, O).permute(0, 3, 1, 2)
    else:  # physical (B, O, H, 2, W, 2)
        out = x.new_empty(B, O, H, 2, W, 2)
        view = out.view(B, O, 2 * H, 2 * W)
    for a in range(2):
        for b in range(2):
            # Phase (a, b) reads original rows i-1+a .. i+a and columns j-1+b .. j+b: pad so that a valid 2x2
            # convolution yields exactly H x W outputs.
            y = F.conv2d(F.pad(x, (1 - b, b, 1 - a, a)), phases[a, b], conv.bias)  # (B, O, H, W)
            if nhwc:
                out[:, :, a, :, b, :] = y.permute(0, 2, 3, 1)
            else:
                out[:, :, :, a, :, b] = y
    return view


def upsample_pays(x: Tensor, conv: nn.Conv2d, size, plan: Plan) -> bool:
    """Applies (an exact 2x, the conv untouched, no gradient) and, under ``select="auto"``, is faster for this
    input shape on this CPU (timed once per shape: the UNet's narrow maps and the VAE's wide ones differ)."""
    if not (
        (size is None or tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1]))
        and untouched(conv)
        and no_grad(x, conv.weight, conv.bias)
    ):
        return False
    B, C, H, W = x.shape
    O = conv.out_channels
    H = probe_rows(H, B * W * max(C, 4 * O) * x.element_size())  # 2 output rows of 2W per input row
    return plan.pays_for_shape("phase-upsampling", x.dtype, (B, C, H, W, O, int(channels_last(x))))


# Winograd F(2x2, 3x3) (Lavin & Gray, 2016): a 3x3 convolution computed per 2x2 output tile from the 4x4 input
# tile around it, Y = A^T [(G g G^T) * (B^T d B)] A. The products over input channels become 16 GEMMs (one per
# position of the 4x4 transformed tile) with 4 multiply-adds per output pixel and channel pair instead of 9.
# The transforms hold 0, +-1 and +-1/2 only: additions, subtractions and exact halvings. The result differs
# from the direct sum in rounding alone, which the probes measure (~4e-7 relative to float64 against ~1e-6 for
# the direct convolution at the UNet's shapes).
_WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def winograd_weights(weight: Tensor) -> Tensor:
    """(O, I, 3, 3) -> (16, O, I): G g G^T for every (output, input) channel pair, position-major.

    One GEMM against the 16 x 9 Kronecker product of G with itself, whose entries (0, +-1/4, +-1/2, 1) scale
    exactly. Computed per call, not kept: kept for the UNet it would be 16/9 of its 3x3 weights (~670 MB at
    full size), and at a few ms per call it is a small part of what it saves."""
    O, I = weight.shape[:2]
    g = torch.tensor(_WINOGRAD_G, dtype=weight.dtype, device=weight.device)
    return torch.mm(torch.kron(g, g), weight.reshape(O * I, 9).t()).view(16, O, I)


def winograd_conv3x3(
    x: Tensor, weight: Tensor, bias: Tensor | None, band_bytes: int = 16 << 20, plan: Plan = OFF
) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a 3x3 ``weight`` and even H and W, by Winograd F(2x2, 3x3).

    x (B, C, H, W), NCHW or channels-last -> (B, O, H, W) in the same memory format. The input is read once
    into zero-padded (B, H + 2, W + 2, C) memory. Its 4x4 tiles at stride 2 are transformed by B^T d B, rows
    then columns, into V (16, tiles, C); M_k = V_k U_k^T by 16 GEMMs (``linear``: oneDNN's where that is on);
    A^T M A gives each tile's 2x2 outputs. M_(1,1) enters every output with weight 1, so the bias is added by
    its GEMM. The GEMMs take the route ``plan`` allows (``linear``). V and M are 4x the input and the output: they are made for a band of tile rows at a time, at
    most ``band_bytes`` each, which keeps long maps' transient memory bounded (and in cache). 16 MB: against
    8 MB, 5-12% faster on the VAE's 512-channel maps and the UNet's 128 x 8 level (fewer bands, fewer small
    operations), on AVX-512 and on AVX2; 32 MB lost 30-50% on the VAE's 512 x 32 maps.
    """
    B, C, H, W = x.shape
    O = weight.shape[0]
    TH, TW = H // 2, W // 2
    xp = x.new_zeros(B, H + 2, W + 2, C)
    xp[:, 1 : H + 1, 1 : W + 1] = x.permute(0, 2, 3, 1)
    U = winograd_weights(weight)
    out = x.new_empty(B, TH, 2, TW, 2, O)
    rows = max(1, band_bytes // (16 * B * TW * max(C, O) * x.element_size()))  # tile rows per band
    for t0 in range(0, TH, rows):
        t1 = min(TH, t0 + rows)
        _winograd_band(xp[:, 2 * t0 : 2 * t1 + 2], U, bias, out[:, t0:t1], plan)
    y = out.view(B, H, W, O).permute(0, 3, 1, 2)  # channels-last
    return y if channels_last(x) else y.contiguous()


def _winograd_band(xp: Tensor, U: Tensor, bias: Tensor | None, out: Tensor, plan: Plan) -> None:
    """One band: padded input rows (B, 2n + 2, W + 2, C) -> ``out`` (B, n, 2, W / 2, 2, O)."""
    B, _, _, C = xp.shape
    n, TW, O = out.shape[1], out.shape[3], out.shape[5]
    # B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]] on the rows of each tile ...
    d = [xp[:, i : i + 2 * n : 2] for i in range(4)]  # row i of every tile: (B, n, W + 2, C)
    rows = (d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3])
    V = xp.new_empty(4, 4, B, n, TW, C)
    for a, r in enumerate(rows):  # ... then on the columns, written where the GEMMs read them
        e = [r[:, :, j : j + 2 * TW : 2] for j in range(4)]
        torch.sub(e[0], e[2], out=V[a, 0])
        torch.add(e[1], e[2], out=V[a, 1])
        torch.sub(e[2], e[1], out=V[a, 2])
        torch.sub(e[1], e[3], out=V[a, 3])
    V = V.view(16, B * n * TW, C)
    # k = 4 a + b: position (a, b) of the transformed tiles; (B, n, TW, O) each
    M = [linear(V[k], U[k], bias if k == 5 else None, plan=plan).view(B, n, TW, O) for k in range(16)]
    # A^T = [[1, 1, 1, 0], [0, 1, -1, -1]] on the rows (a), then on the columns (b)
    s = [
        [(M[4 + b] + M[8 + b]).add_(M[b]) for b in range(4)],
        [(M[4 + b] - M[8 + b]).sub_(M[12 + b]) for b in range(4)],
    ]
    for i, t in enumerate(s):
        torch.add(t[1], t[2], out=out[:, :, i, :, 0]).add_(t[0])
        torch.sub(t[1], t[2], out=out[:, :, i, :, 1]).sub_(t[3])


def gemm_conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None, plan: Plan = OFF) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a 3x3 ``weight`` as one GEMM over an im2col copy: the nine
    shifted views of the zero-padded input side by side, (B H W, C 9) against the weight viewed (O, C 9).

    For the UNet's deepest level (32 x 2 maps at 10.24 s, 640-1280 channels) oneDNN's direct convolution runs at
    40% of the GEMM's rate (350 against 640 GFLOP/s in bfloat16): a map of 64 positions gives it little to
    block over. The copy is 9x the input, so the route is taken for small maps only (``FastConv2d``).
    x (B, C, H, W), NCHW or channels-last -> (B, O, H, W) in the same memory format."""
    B, C, H, W = x.shape
    O = weight.shape[0]
    xp = F.pad(x, (1, 1, 1, 1))
    cols = torch.stack([xp[:, :, i : i + H, j : j + W] for i in range(3) for j in range(3)], dim=-1)
    # (B H W, C 9): each row in the weight's (C, kh, kw) order
    cols = cols.permute(0, 2, 3, 1, 4).reshape(B * H * W, C * 9)
    y = linear(cols, weight.reshape(O, C * 9), bias, plan=plan).view(B, H, W, O).permute(0, 3, 1, 2)  # NHWC
    return y if channels_last(x) else y.contiguous()


@twin
class FastConv2d(nn.Conv2d):
    """A 3x3, stride-1, padding-1 conv by Winograd F(2x2, 3x3) (``winograd_conv3x3``, rewrite ``winograd-conv``:
    float32 only, as in 16-bit formats every transform step would round, and even H and W) or as one GEMM over
    an im2col copy (``gemm_conv3x3``, rewrite ``gemm-conv``: small maps, any dtype), no gradient to record.
    Whether either pays depends on the shape (Winograd: wide channels and small maps gain up to ~1.8x on AVX2,
    narrow ones over long maps lose; the GEMM: the deepest level's 64-position maps): under
    ``select="auto"`` each input shape is timed once on this CPU, and kept. Winograd is tried first."""

    def forward(self, x: Tensor) -> Tensor:
        if not self._plain_3x3(x):
            return super().forward(x)
        plan = self.fast_plan
        B, C, H, W = x.shape
        O, es = self.out_channels, x.element_size()
        layout = (int(channels_last(x)), int(self.bias is not None))
        if (
            x.dtype == torch.float32
            and plan.on("winograd-conv", x.dtype)
            and H % 2 == 0
            and W % 2 == 0
            and plan.pays_for_shape(
                "winograd-conv", x.dtype, (B, C, probe_rows(H, B * W * max(C, O) * es), W, O, *layout)
            )
        ):
            return winograd_conv3x3(x, self.weight, self.bias, plan=plan)
        if (
            plan.on("gemm-conv", x.dtype)
            and B * H * W * C * 9 * es <= GEMM_CONV_BYTES
            and plan.pays_for_shape("gemm-conv", x.dtype, (B, C, H, W, O, *layout))
        ):
            return gemm_conv3x3(x, self.weight, self.bias, plan=plan)
        return super().forward(x)

    def _plain_3x3(self, x: Tensor) -> bool:
        """A 3x3, stride-1, zero-padding-1, undilated, ungrouped conv of a CPU map, no gradient to record."""
        return (
            not torch.compiler.is_compiling()  # first: the compiler picks its own convolutions
            and x.dim() == 4
            and x.device.type == "cpu"
            and self.kernel_size == (3, 3)
            and self.stride == (1, 1)
            and self.padding == (1, 1)
            and self.dilation == (1, 1)
            and self.groups == 1
            and self.padding_mode == "zeros"
            and no_grad(x, self.weight, self.bias)
        )


# gemm-conv's im2col copy at most (9x the input): the deepest level's maps, never a long map's
GEMM_CONV_BYTES = 32 << 20
