"""The probes: a rewrite's plain and fast calls on a representative input, built from the pool of seeded values.

A probe takes the plan its fast call runs under (the rewrite on, and the rewrites it builds on where they are
on here) and returns (plain call, fast call); a shape probe takes the input shape too. ``decisions`` runs them:
once to check that the two agree, then timed.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import loading, unet, vae
from ..config import UNetConfig
from . import cpu_attention
from .convs import gemm_conv3x3, nearest2x_conv3x3, winograd_conv3x3
from .linears import FastLinear, packed_weight
from .plan import Plan, switch
from .unet_rewrites import FastAttention, FastGEGLU, FastTransformer2D, FastUNet, FastUNetUpsample
from .vocoder_rewrites import FastConv1d

Calls = tuple[Callable[[], Tensor], Callable[[], Tensor]]  # (plain call, fast call)


# Probes' random values are cut from one seeded draw, repeated: drawing each per-shape probe's weights and input
# anew (up to 8M values at ~3.7 ns each), after the module's own initialisation, took 40-70 ms a shape at the
# UNet's widest convolutions, ~1.2 s of a first run. The pool's size is a prime, so that its repeats line up
# with no dimension or stride of a probe's tensors (an exactness check on periodic data could miss a shift).
_POOL_SIZE = 1_048_573


@functools.cache
def _pool() -> Tensor:
    return torch.randn(_POOL_SIZE, generator=torch.Generator().manual_seed(0))


def _draw(shape: tuple[int, ...], start: int = 0) -> Tensor:
    """Float32 values of ``shape`` from the pool, from position ``start`` on, round it as often as needed."""
    n, pool = math.prod(shape), _pool()
    out = torch.empty(n)
    i = 0
    while i < n:
        chunk = pool[(start + i) % _POOL_SIZE :][: n - i]
        out[i : i + len(chunk)] = chunk
        i += len(chunk)
    return out.view(shape)


def _seeded(make: Callable[[], nn.Module], dtype: torch.dtype) -> nn.Module:
    """The module ``make`` builds, its weights the pool's values scaled by their last dimension: built on the
    meta device, without its own initialisation, and filled strictly, as a checkpoint is loaded."""
    with loading.empty_init():
        module = make()
    state, start = {}, 0
    for name, p in module.named_parameters():
        state[name] = _draw(p.shape, start) * p.shape[-1] ** -0.5
        start = (start + p.numel()) % _POOL_SIZE
    return loading.load_strict(module, state, "a speed-layer probe", dtype=dtype)


def _randn(dtype: torch.dtype, *shape: int) -> Tensor:
    return _draw(shape, _POOL_SIZE // 2).to(dtype)  # not where weights start


def _twin_calls(plain: nn.Module, swaps: dict[type, type], plan: Plan, *inputs) -> Calls:
    """(plain call, call of a copy of ``plain`` with its modules switched to their fast classes under ``plan``)."""
    fast = copy.deepcopy(plain)
    switch(fast, swaps, plan)
    return (lambda: plain(*inputs)), (lambda: fast(*inputs))


# Representative inputs: the full-size UNet's first attention level (1024 tokens of 256 channels for
# 10.24 s, batch 2 under guidance), the VAE decoder's and the vocoder's last, widest-in-time stages.


def probe_linear(plan: Plan) -> Calls:  # the first level's feed-forward as the plain model runs it (one
    # 256 x 256 linear, ~0.3 ms in bfloat16, was too short to time: its 2-5% gain there read as 1.00x)
    dtype = plan.dtype
    ff = _seeded(lambda: unet.FeedForward(256), dtype)
    return _twin_calls(ff, {nn.Linear: FastLinear}, plan, _randn(dtype, 2, 1024, 256))


def probe_packed(plan: Plan) -> Calls:  # the first level's feed-forward's GEMMs (the GEGLU's halves, the
    # output) by oneDNN's matmul on the weights as stored, then packed (weights made outside inference mode,
    # as loaded)
    dtype = plan.dtype
    with torch.inference_mode(False):
        ff = _seeded(lambda: unet.FeedForward(256), dtype)
    proj, out, x = ff.net[0].proj, ff.net[2], _randn(dtype, 2, 1024, 256)
    n = proj.weight.shape[0] // 2

    def run(w: Callable[[Tensor], Tensor]) -> Tensor:
        mm = torch.ops.mkldnn._linear_pointwise
        h = mm(x, w(proj.weight[:n]), proj.bias[:n], "none", [], "none")
        h.mul_(mm(x, w(proj.weight[n:]), proj.bias[n:], "gelu", [], "none"))
        return mm(h, w(out.weight), out.bias, "none", [], "none")

    return (lambda: run(lambda w: w)), (lambda: run(lambda w: packed_weight(w, plan.packed)))


def probe_geglu(plan: Plan) -> Calls:
    geglu = _seeded(lambda: unet.GEGLU(256, 1024), plan.dtype)
    return _twin_calls(geglu, {unet.GEGLU: FastGEGLU}, plan, _randn(plan.dtype, 2, 1024, 256))


def probe_folded(plan: Plan) -> Calls:  # cross-attention to 8 GPT-2 states
    dtype = plan.dtype
    m = _seeded(lambda: unet.Attention(256, 768, 8, 32), dtype)
    inputs = _randn(dtype, 2, 1024, 256), _randn(dtype, 2, 8, 768)
    return _twin_calls(m, {unet.Attention: FastAttention}, plan, *inputs)


def probe_tokens(plan: Plan) -> Calls:  # a whole first-level transformer: the gain is the copies around
    # its blocks
    dtype = plan.dtype
    m = _seeded(lambda: unet.Transformer2DModel(256, 8, 768, 1, 32), dtype)
    inputs = _randn(dtype, 2, 256, 128, 8), _randn(dtype, 2, 8, 768), None
    return _twin_calls(m, {unet.Transformer2DModel: FastTransformer2D}, plan, *inputs)


def probe_upsample(plan: Plan) -> Calls:
    m = _seeded(lambda: unet.Upsample2D(256), plan.dtype)
    return _twin_calls(m, {unet.Upsample2D: FastUNetUpsample}, plan, _randn(plan.dtype, 2, 256, 32, 4))


def upsample_shape_probe(plan: Plan, shape: tuple[int, ...]) -> Calls:
    """(nearest 2x + 3x3 conv, the four 2x2 convs) on input (B, C, H, W) with O outputs, channels-last or not."""
    conv, x = _conv_and_input(plan.dtype, *shape)
    w, b = conv.weight, conv.bias
    up = functools.partial(F.interpolate, scale_factor=2.0, mode="nearest")
    return (lambda: F.conv2d(up(x), w, b, padding=1)), (lambda: nearest2x_conv3x3(x, conv, cache=False))


def attention_shape_probe(plan: Plan, shape: tuple[int, ...]) -> Calls:
    """(PyTorch's attention, the C++ kernel) on one self-attention of (B, heads, N, d), with q, k and v viewed
    from (B, N, heads * d) as the UNet makes them. Only with the kernel built (``FastAttention`` asks)."""
    B, H, N, d = shape
    dtype = plan.dtype
    q, k, v = (t.view(B, N, H, d).transpose(1, 2) for t in _randn(dtype, 3, B, N, H * d).unbind(0))

    def kernel() -> Tensor:
        out = cpu_attention.attention(q, k, v)
        if out is None:
            raise RuntimeError(f"the kernel does not take {shape} in {dtype}")
        return out

    return (lambda: F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1)), kernel


def probe_vae(
    plan: Plan,
) -> Calls:  # a resnet of the decoder's last level at 10.24 s, in each layout (at 128 x 32 the
    # two were level within the timing noise, at full size channels-last is 1.11-1.24x; the whole decoder
    # with its per-shape rewrites decided in each layout 1.04x, 1.58 -> 1.51 s on AVX-512)
    # (16-bit: the small map; without native bfloat16 its convolutions run reference kernels, ~1000x slower)
    dtype = plan.dtype
    H, W = (512, 64) if dtype in (torch.float32, torch.float64) else (128, 32)
    block, x = _seeded(lambda: vae.ResnetBlock2D(128, 128, 32), dtype), _randn(dtype, 1, 128, H, W)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    return (lambda: block(x)), (lambda: block(x_cl).contiguous())


def probe_vocoder(plan: Plan) -> Calls:  # a narrow conv over a long signal stored (B, L, C), as the
    # vocoder's input is
    dtype = plan.dtype
    m = _seeded(
        lambda: nn.Sequential(
            nn.Conv1d(64, 32, 7, padding=3), nn.LeakyReLU(0.1), nn.Conv1d(32, 32, 11, padding=5)
        ),
        dtype,
    )
    x = _randn(dtype, 1, 20000, 64).transpose(1, 2)
    return _twin_calls(m, {nn.Conv1d: FastConv1d}, plan, x)


def _conv_and_input(dtype, B, C, H, W, O, channels_last, bias=True) -> tuple[nn.Conv2d, Tensor]:
    """A seeded 3x3 conv C -> O and a (B, C, H, W) input, channels-last or not, for the per-shape probes (random
    weights: the time does not depend on them)."""
    conv = _seeded(lambda: nn.Conv2d(C, O, 3, padding=1, bias=bool(bias)), dtype)
    x = _randn(dtype, B, C, H, W)
    return conv, x.contiguous(memory_format=torch.channels_last) if channels_last else x


def probe_winograd(plan: Plan, shape=(2, 384, 64, 4, 384, 0, 1)) -> Calls:  # default: the UNet's 3rd level
    """(plain conv, Winograd) on input (B, C, H, W) with O outputs, channels-last or not, with a bias or not."""
    conv, x = _conv_and_input(plan.dtype, *shape)
    w, b = conv.weight, conv.bias  # called as functions: a user's global hooks never see a probe
    return (lambda: F.conv2d(x, w, b, padding=1)), (lambda: winograd_conv3x3(x, w, b, plan=plan))


def probe_gemm_conv(plan: Plan, shape=(2, 1280, 32, 2, 640, 0, 1)) -> Calls:  # default: the deepest level
    """(plain conv, one GEMM over im2col) on input (B, C, H, W) with O outputs, channels-last or not, bias or not."""
    conv, x = _conv_and_input(plan.dtype, *shape)
    w, b = conv.weight, conv.bias
    return (lambda: F.conv2d(x, w, b, padding=1)), (lambda: gemm_conv3x3(x, w, b, plan=plan))


def probe_shared(plan: Plan) -> Calls:  # a small two-level UNet: checked for exactness only (not timed)
    dtype = plan.dtype
    cfg = UNetConfig(
        sample_size=16, in_channels=8, out_channels=8, block_out_channels=(32, 32), layers_per_block=2,
        down_attn=(False, True), up_attn=(True, False), cross_attention_dims=((None, 16),) * 2,
        transformer_layers=(1, 1), num_heads=(2, 2), norm_num_groups=8, norm_eps=1e-5, flip_sin_to_cos=True,
        freq_shift=0, downsample_padding=1, mid_block_scale_factor=1.0,
    )  # fmt: skip
    x = _randn(dtype, 1, 8, 16, 16)
    inputs = torch.cat([x, x]), torch.tensor(500), _randn(dtype, 2, 8, 16)
    model = _seeded(lambda: unet.AudioLDM2UNet(cfg), dtype)
    return _twin_calls(model, {unet.AudioLDM2UNet: FastUNet}, plan, *inputs)
