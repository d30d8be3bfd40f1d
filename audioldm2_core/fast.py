"""The speed layer: exact rewrites of the plain model, applied to a loaded model for inference.

The model files hold the reference computation. This module makes it faster without changing what it
computes (only the order of float additions): ``optimize(model)`` switches each module it knows to a
subclass whose ``forward`` takes a faster route *when that route computes exactly what the plain forward
would* and falls back to the plain ``forward`` (``super().forward``) otherwise. Nothing is copied or
renamed: parameters, buffers, state-dict keys, hooks and ``isinstance`` checks stay as they were, and
``restore(model)`` switches the classes back.

    rewrite            replaces (plain)                           with
    onednn-linear      nn.Linear, GPT-2 Conv1D: MKL's GEMM        oneDNN's matmul (what PyTorch's compiler
                                                                  runs for frozen linears)
    fused-geglu        GEGLU: one GEMM, chunk, GELU, product      two GEMMs on the weight's row halves, GELU
                                                                  fused into the gate's, the product in place
    packed-linear      the UNet's 16-bit linears: oneDNN          the weights in oneDNN's blocked layout,
                       reorders the weight on every call          reordered once per weight version
    folded-attention   cross-attention to a short context         to_q folded into the keys, to_out into the
                                                                  values: 2NC(HL) instead of 2NC(C+L) MACs
    token-projections  Transformer2D's 1x1 proj_in / proj_out     linears in the token layout (no NCHW copy)
    phase-upsampling   nearest 2x + 3x3 conv (UNet, VAE)          four 2x2 convs of the input: 16 taps per
                                                                  input pixel instead of 36
    shared-guidance    the UNet on [x, x] under guidance          the layers before the first conditioned
                                                                  transformer once on x, then repeated
    vae-channels-last  the VAE decoder's convs and norms          the same ops on (B, H, W, C) memory
    vocoder-channels-  the vocoder's 1-D convs on (B, C, L)       2-D convs on (B, C, 1, L) channels-last,
      last                                                        the layout oneDNN's kernels are fastest in
    winograd-conv      3x3, stride-1 convs (UNet, VAE), float32   Winograd F(2x2, 3x3): 16 GEMMs with 4 MACs
                                                                  per output and channel pair instead of 9;
                                                                  timed per input shape
    cpu-attention      SDPA of the UNet's self-attentions         the opt-in C++ kernel (``cpu_attention``);
                                                                  timed per attention shape

Two guarantees a user can rely on, checked on every call, not once at ``optimize``:
- **A user's change is never bypassed.** A rewrite that would skip a submodule's own ``forward`` (reading its
  ``.weight`` instead) runs only while that submodule is of the class we wrote it for and has no hooks, and no
  global module hooks are registered; a replaced submodule (a LoRA wrapper that keeps ``.weight``, as PEFT's
  do), a hooked one or a parametrized one makes the rewrite stand aside for that call. Weights are read live
  at every call, so a changed weight is always seen (the one derived-weight cache, the upsamplers' summed
  kernels, is keyed on the weight's storage and version counter).
- **Gradients are never lost.** Rewrites without a backward (oneDNN's fused ops, the C++ kernel, the in-place
  products) stand aside whenever autograd records.

Which rewrites a model gets is decided per dtype on the running CPU by ``decide``, once per machine: a rewrite
is *supported* when it runs and matches the plain computation on a representative input (a CPU without
AVX-512 BF16 fails oneDNN's bfloat16 matmul, and keeps the plain op). A rewrite that changes kernels or memory
layouts *pays* when it is at least 1% faster on that input, timed here (the median ratio over interleaved
rounds, ``_time``); one that only removes work (folded-attention, shared-guidance) pays wherever it applies,
which its module checks per call (the fold only where H L < C + L). One whose gain depends on the shape
(winograd-conv: up to 1.5x for wide channels on small maps, a loss on narrow ones over long maps; gemm-conv:
1.2-1.8x on the UNet's deepest 32 x 2 maps, a loss on larger ones) is timed per input shape where it first
meets one (phase-upsampling likewise: the UNet's narrow maps and the VAE's wide ones differ; cpu-attention
too, where the kernel is enabled: ~2x PyTorch's kernel on AVX-512, 0.93-0.96x on AVX2), long maps at a capped
height (attention at a capped token count) that then serves every longer length (``_probe_rows``). Timed
decisions are kept on disk (see ``decide``).
``optimize(model, select="supported")`` skips the timing
(tests use it to exercise every rewrite); ``select={"onednn-linear", ...}`` applies exactly those that are
supported. Measurements per CPU: ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module
from torch.utils.weak import WeakIdKeyDictionary

from . import cpu_attention, gpt2, loading, unet, vae

__all__ = [
    "REWRITES",
    "CudaGraphDenoiser",
    "compile_options",
    "compiled",
    "decide",
    "native_bfloat16",
    "optimize",
    "restore",
]


# ------------------------------------------------------------------------------------------ guards


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _global_hooks() -> bool:
    return bool(
        _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or _module._global_backward_hooks
        or _module._global_backward_pre_hooks
    )


def _untouched(*modules: nn.Module) -> bool:
    """Whether a rewrite may read these submodules' weights instead of calling them: each is still of the
    class it was built as (plain or its fast twin), with no hooks of its own and no global ones."""
    return not _global_hooks() and all(type(m) in _KNOWN and not _hooked(m) for m in modules)


def _no_grad(*tensors: Tensor | None) -> bool:
    """Whether no autograd graph would be recorded through these tensors."""
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def _channels_last(x: Tensor) -> bool:
    """Whether a 4-D tensor is stored (B, H, W, C) (and not also NCHW-contiguous, as 1x1 maps are)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------- exact operations


@functools.cache
def _has_onednn_matmul() -> bool:
    """Whether this PyTorch build has oneDNN's matmul op (x86 and ARM wheels do; a build without oneDNN
    registers no ``mkldnn`` ops at all)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn(x: Tensor, weight: Tensor) -> bool:
    """Whether oneDNN's matmul is used for this linear: decided for the dtype, off under autograd and
    torch.compile (no backward; the compiler picks its own GEMMs)."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype
        and _enabled("onednn-linear", x.dtype)
        and not torch.compiler.is_compiling()  # before the build check: torch 2.6's tracer cannot run it
        and torch.backends.mkldnn.enabled
        and _has_onednn_matmul()
        and _no_grad(x, weight)
    )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, gelu: bool = False) -> Tensor:
    """``F.linear``, then the exact (erf) GELU if ``gelu``: by oneDNN's matmul with the GELU in the same pass
    where that is on (on the weight in oneDNN's blocked layout inside a UNet call where ``packed-linear`` is
    on), else ``F.linear`` (GELU in place when no gradient needs the input)."""
    if _onednn(x, weight) and (bias is None or _no_grad(bias)):
        if _packing and _enabled("packed-linear", x.dtype):
            weight = packed_weight(weight)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [], "none")
    y = F.linear(x, weight, bias)
    if not gelu:
        return y
    return F.gelu(y) if y.requires_grad else torch.ops.aten.gelu_(y)


# Inside a UNet call (``FastUNet.forward``) where ``packed-linear`` is on, the linears read packed weights.
_packing = 0

# parameter -> {(offset, shape, stride): ((storage, version), packed)}: what ``packed_weight`` made of it or of
# its views (the GEGLU's row halves, the 1x1 projections flattened); gone with the parameter
_PACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()


@contextlib.contextmanager
def _packed_linears() -> Iterator[None]:
    global _packing
    _packing += 1
    try:
        yield
    finally:
        _packing -= 1


def packed_weight(weight: Tensor) -> Tensor:
    """``weight`` (a parameter or a view of one) as oneDNN's matmul reads it, in its blocked layout: the same
    numbers, reordered once and kept while the parameter's storage and version counter stay the same (a
    ``copy_``, an optimizer step or a new tensor repack it), where the plain call reorders the weight on every
    call (rewrite ``packed-linear``). Inference tensors (no version counter) are passed as they are."""
    if weight.is_inference():
        return weight
    base = weight if weight._base is None else weight._base
    stamp = (weight.untyped_storage().data_ptr(), weight._version)
    where = (weight.storage_offset(), tuple(weight.shape), weight.stride())
    kept = _PACKED.setdefault(base, {})
    hit = kept.get(where)
    if hit is None or hit[0] != stamp:
        hit = kept[where] = (stamp, torch.ops.mkldnn._reorder_linear_weight(weight.detach()))
    return hit[1]


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
    cached = conv.__dict__.get("_phase_weights")
    if cached is None or cached[0] != key:
        with (
            torch.inference_mode(False),
            torch.no_grad(),
        ):  # a normal tensor, usable in and out of inference mode
            cached = (key, phase_weights(w))
        conv.__dict__["_phase_weights"] = cached
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
    channels_last = _channels_last(x)
    if channels_last:  # physical (B, H, 2, W, 2, O) -> logical (B, O, 2H, 2W), channels-last
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
            if channels_last:
                out[:, :, a, :, b, :] = y.permute(0, 2, 3, 1)
            else:
                out[:, :, :, a, :, b] = y
    return view


def _probe_rows(H: int, row_bytes: int, budget: int = 32 << 20) -> int:
    """The map height a per-shape decision is timed at: H, or for long maps (the time axis of long audio) a
    multiple of 64 rows whose largest tensor stays within ``budget``. Both routes' cost per row is steady
    there, so one decision serves every longer length: no new probe (and no full-size probe tensors under a
    generation's peak) the first time a machine meets a longer length."""
    if H * row_bytes <= budget:
        return H
    return min(H, max(64, budget // row_bytes // 64 * 64))


def _upsample_pays(x: Tensor, conv: nn.Conv2d, size) -> bool:
    """Applies (an exact 2x, the conv untouched, no gradient) and, under ``select="auto"``, is faster for this
    input shape on this CPU (timed once per shape: the UNet's narrow maps and the VAE's wide ones differ)."""
    if not (
        (size is None or tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1]))
        and _untouched(conv)
        and _no_grad(x, conv.weight, conv.bias)
    ):
        return False
    B, C, H, W = x.shape
    O = conv.out_channels
    H = _probe_rows(H, B * W * max(C, 4 * O) * x.element_size())  # 2 output rows of 2W per input row
    return _pays_for_shape("phase-upsampling", x.dtype, (B, C, H, W, O, int(_channels_last(x))))


def _pays_for_shape(name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> bool:
    """For a rewrite timed per input shape: under ``select="auto"`` whether it was faster for this shape here
    (timed on its first call and kept); otherwise (``select="supported"`` or named) wherever it applies."""
    if (name, dtype) not in _PER_SHAPE or torch.compiler.is_compiling():
        return True
    return decide(name, dtype, shape=shape).pays is True


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


def winograd_conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None, band_bytes: int = 16 << 20) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a 3x3 ``weight`` and even H and W, by Winograd F(2x2, 3x3).

    x (B, C, H, W), NCHW or channels-last -> (B, O, H, W) in the same memory format. The input is read once
    into zero-padded (B, H + 2, W + 2, C) memory. Its 4x4 tiles at stride 2 are transformed by B^T d B, rows
    then columns, into V (16, tiles, C); M_k = V_k U_k^T by 16 GEMMs (``linear``: oneDNN's where that is on);
    A^T M A gives each tile's 2x2 outputs. M_(1,1) enters every output with weight 1, so the bias is added by
    its GEMM. V and M are 4x the input and the output: they are made for a band of tile rows at a time, at
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
        _winograd_band(xp[:, 2 * t0 : 2 * t1 + 2], U, bias, out[:, t0:t1])
    y = out.view(B, H, W, O).permute(0, 3, 1, 2)  # channels-last
    return y if _channels_last(x) else y.contiguous()


def _winograd_band(xp: Tensor, U: Tensor, bias: Tensor | None, out: Tensor) -> None:
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
    M = [linear(V[k], U[k], bias if k == 5 else None).view(B, n, TW, O) for k in range(16)]
    # A^T = [[1, 1, 1, 0], [0, 1, -1, -1]] on the rows (a), then on the columns (b)
    s = [
        [(M[4 + b] + M[8 + b]).add_(M[b]) for b in range(4)],
        [(M[4 + b] - M[8 + b]).sub_(M[12 + b]) for b in range(4)],
    ]
    for i, t in enumerate(s):
        torch.add(t[1], t[2], out=out[:, :, i, :, 0]).add_(t[0])
        torch.sub(t[1], t[2], out=out[:, :, i, :, 1]).sub_(t[3])


def gemm_conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
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
    y = linear(cols, weight.reshape(O, C * 9), bias).view(B, H, W, O).permute(0, 3, 1, 2)  # channels-last
    return y if _channels_last(x) else y.contiguous()


# ------------------------------------------------------------------------------------- fast modules


class FastLinear(nn.Linear):
    """``nn.Linear`` by oneDNN's matmul (rewrite ``onednn-linear``)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class FastConv1D(gpt2.Conv1D):
    """GPT-2's ``Conv1D`` (weight stored (in, out)) by oneDNN's matmul (rewrite ``onednn-linear``)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight.t(), self.bias) if _onednn(x, self.weight) else super().forward(x)


class FastGEGLU(unet.GEGLU):
    """GEGLU as two GEMMs on the weight's row halves (no copy), GELU fused into the gate's GEMM and the product
    in place: no chunked intermediates, and the next linear reads a contiguous input (rewrite ``fused-geglu``)."""

    def forward(self, x: Tensor) -> Tensor:
        proj = self.proj
        if not (_untouched(proj) and _no_grad(x, proj.weight, proj.bias)):
            return super().forward(x)
        n = proj.weight.shape[0] // 2
        h = linear(x, proj.weight[:n], proj.bias[:n])
        return h.mul_(linear(x, proj.weight[n:], proj.bias[n:], gelu=True))


class FastAttention(unet.Attention):
    """Folded cross-attention (``folded-attention``) and the C++ self-attention kernel (``cpu-attention``)."""

    def forward(self, x: Tensor, context: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        if (
            context is None
            and bias is None
            and cpu_attention.enabled()
            and _enabled("cpu-attention", x.dtype)
        ):
            B, N, _ = x.shape
            q, k, v = (
                p(x).view(B, N, self.heads, -1).transpose(1, 2) for p in (self.to_q, self.to_k, self.to_v)
            )
            if cpu_attention.applies(q, k, v) and _pays_for_shape(
                "cpu-attention", x.dtype, (B, self.heads, min(N, _ATTENTION_PROBE_TOKENS), q.shape[-1])
            ):
                out = cpu_attention.attention(q, k, v)  # (B, N, heads * d)
            else:
                out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1)
            return self.to_out[0](out)
        if context is not None and self._fold_pays(x, context):
            return self._folded(x, context, bias)
        return super().forward(x, context, bias)

    def _fold_pays(self, x: Tensor, context: Tensor) -> bool:
        """Fewer multiply-adds (H L < C + L), full precision (in 16-bit formats the folded scores would be
        rounded before the softmax), to_q and to_out untouched, and no gradient to record."""
        to_out = self.to_out[0]
        return (
            x.dtype in (torch.float32, torch.float64)
            and _enabled("folded-attention", x.dtype)
            and self.heads * context.shape[1] < x.shape[-1] + context.shape[1]
            and _untouched(self.to_q, to_out)
            and _no_grad(x, context, self.to_q.weight, to_out.weight, to_out.bias)
        )

    def _folded(self, x: Tensor, context: Tensor, bias: Tensor | None) -> Tensor:
        """Per head h: scores = (x Wq_h^T)(k_h^T) / sqrt(d) = x (Wq_h^T k_h^T / sqrt(d)), and
        out = sum_h P_h v_h Wo_h^T + b = [P_1 .. P_H] [v_1 Wo_1^T; ..; v_H Wo_H^T] + b. The context is short
        (8 GPT-2 states, a dozen T5 tokens), so both products have H L columns / rows instead of the C-wide
        query and output projections of every one of the N tokens."""
        B, N, C = x.shape
        H, L = self.heads, context.shape[1]
        k = self.to_k(context).view(B, L, H, -1)  # (B, L, H, d)
        v = self.to_v(context).view(B, L, H, -1)
        d = k.shape[-1]
        to_out = self.to_out[0]
        keys = torch.einsum("hdc,blhd->bchl", self.to_q.weight.view(H, d, C), k) * d**-0.5  # (B, C, H, L)
        values = torch.einsum("blhd,chd->bhlc", v, to_out.weight.view(-1, H, d))  # (B, H, L, C_out)
        scores = torch.bmm(x, keys.reshape(B, C, H * L)).view(B, N, H, L)
        if bias is not None:
            scores = scores + bias.reshape(bias.shape[0], 1, 1, L)  # (B, 1, 1, L): every query, every head
        probs = scores.softmax(-1).view(B, N, H * L)
        return torch.baddbmm(to_out.bias, probs, values.reshape(B, H * L, -1))  # (B, N, C_out)


class FastTransformer2D(unet.Transformer2DModel):
    """The 1x1 ``proj_in`` / ``proj_out`` as linears on the tokens: the same sums in the layout the blocks use,
    so no NCHW copy sits between them (rewrite ``token-projections``)."""

    def forward(self, x: Tensor, context: Tensor | None, bias: Tensor | None) -> Tensor:
        if not _untouched(self.proj_in, self.proj_out):
            return super().forward(x, context, bias)
        B, C, H, W = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, H*W, C)
        h = linear(h, self.proj_in.weight.flatten(1), self.proj_in.bias)  # (B, H*W, inner)
        for block in self.transformer_blocks:
            h = block(h, context, bias)
        h = linear(h, self.proj_out.weight.flatten(1), self.proj_out.bias)  # (B, H*W, C)
        return torch.add(x, h.view(B, H, W, C).permute(0, 3, 1, 2))  # x first: the result is NCHW like x


class FastUNetUpsample(unet.Upsample2D):
    """Nearest 2x + 3x3 conv as four 2x2 convs (rewrite ``phase-upsampling``); other sizes stay plain."""

    def forward(self, x: Tensor, size: torch.Size | None = None) -> Tensor:
        if _upsample_pays(x, self.conv, size):
            return nearest2x_conv3x3(x, self.conv)
        return super().forward(x, size)


class FastVAEUpsample(vae.Upsample2D):
    """As :class:`FastUNetUpsample`; the summed weights are not kept: the decoder runs once per generation,
    and they would sit in memory through the vocoder, where the peak is."""

    def forward(self, x: Tensor) -> Tensor:
        if _upsample_pays(x, self.conv, None):
            return nearest2x_conv3x3(x, self.conv, cache=False)
        return super().forward(x)


class FastVAEDecoder(vae.AutoencoderKLDecoder):
    """Decodes in channels-last memory ((B, H, W, C)), where oneDNN's convolutions and GroupNorm are fastest
    on the CPU; every layer keeps the layout, the result is returned in the usual one (``vae-channels-last``)."""

    def decode(self, latents: Tensor) -> Tensor:
        if latents.device.type != "cpu" or not _enabled("vae-channels-last", latents.dtype):
            return super().decode(latents)
        return super().decode(latents.contiguous(memory_format=torch.channels_last)).contiguous()


def _nlc(x: Tensor) -> bool:
    """Whether a (B, C, L) tensor is stored as (B, L, C): the vocoder's input is (the transposed mel), and
    convolutions in that layout keep it, as do the element-wise ops between them."""
    C = x.shape[1] if x.dim() == 3 else 0
    return C > 0 and x.device.type == "cpu" and x.stride(2) == C and (x.stride(1) == 1 or C == 1)


class FastConv1d(nn.Conv1d):
    """A 1-D conv on a (B, C, L) input stored as (B, L, C), as a 2-D conv over (B, C, 1, L) channels-last:
    oneDNN's fast layout for the vocoder's long, narrow signals; the output keeps it (``vocoder-channels-last``)."""

    def forward(self, x: Tensor) -> Tensor:
        if not (_nlc(x) and _enabled("vocoder-channels-last", x.dtype)):
            return super().forward(x)
        (s,), (p,), (d,) = self.stride, self.padding, self.dilation
        y = F.conv2d(x.unsqueeze(2), self.weight.unsqueeze(2), self.bias, (1, s), (0, p), (1, d), self.groups)
        return y.squeeze(2)


class FastConvTranspose1d(nn.ConvTranspose1d):
    """As :class:`FastConv1d`, for the vocoder's upsamplers."""

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        if output_size is not None or not (_nlc(x) and _enabled("vocoder-channels-last", x.dtype)):
            return super().forward(x, output_size)
        (s,), (p,), (op,), (d,) = self.stride, self.padding, self.output_padding, self.dilation
        w = self.weight.unsqueeze(2)  # (in, out / groups, 1, k)
        return F.conv_transpose2d(
            x.unsqueeze(2), w, self.bias, (1, s), (0, p), (0, op), self.groups, (1, d)
        ).squeeze(2)


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
        B, C, H, W = x.shape
        O, es = self.out_channels, x.element_size()
        layout = (int(_channels_last(x)), int(self.bias is not None))
        if (
            x.dtype == torch.float32
            and _enabled("winograd-conv", x.dtype)
            and H % 2 == 0
            and W % 2 == 0
            and _pays_for_shape(
                "winograd-conv", x.dtype, (B, C, _probe_rows(H, B * W * max(C, O) * es), W, O, *layout)
            )
        ):
            return winograd_conv3x3(x, self.weight, self.bias)
        if (
            _enabled("gemm-conv", x.dtype)
            and B * H * W * C * 9 * es <= _GEMM_CONV_BYTES
            and _pays_for_shape("gemm-conv", x.dtype, (B, C, H, W, O, *layout))
        ):
            return gemm_conv3x3(x, self.weight, self.bias)
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
            and _no_grad(x, self.weight, self.bias)
        )


# gemm-conv's im2col copy at most (9x the input): the deepest level's maps, never a long map's
_GEMM_CONV_BYTES = 32 << 20


class FastUNet(unet.AudioLDM2UNet):
    """Two rewrites of a UNet call.

    ``shared-guidance``: under classifier-free guidance the two halves of the batch are the same latents
    (``torch.cat([x] * 2)``) at the same step: the layers before the first transformer that reads a condition
    (``conv_in``, the first down block, the next block's first resnet and its self-attention-only transformer:
    ~6% of a call) give the same rows for both halves, so they run once on the first half and their outputs
    are repeated. Checked per call: the halves equal, no hooks in those layers (which would see half the
    batch), and no gradient recorded.

    ``packed-linear`` (16-bit): the linears inside the call read their weights in oneDNN's blocked layout,
    reordered once (``packed_weight``) instead of on every call: the UNet's run 20-200 times a generation."""

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor | float | int,
        encoder_hidden_states: Tensor,
        encoder_hidden_states_1: Tensor | None = None,
        encoder_attention_mask_1: Tensor | None = None,
    ) -> Tensor:
        args = (sample, timestep, encoder_hidden_states, encoder_hidden_states_1, encoder_attention_mask_1)
        if not _enabled("packed-linear", sample.dtype):
            return self._guided_forward(*args)
        with _packed_linears():
            return self._guided_forward(*args)

    def _guided_forward(self, sample, timestep, encoder_hidden_states, *rest) -> Tensor:
        args = (sample, timestep, encoder_hidden_states, *rest)
        B = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1)
        if not (
            _enabled("shared-guidance", sample.dtype)
            and B % 2 == 0
            and encoder_hidden_states.shape[0] == B
            and t.numel() in (1, B)
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and not _global_hooks()
            and not any(_hooked(m) for m in self._prefix_modules())
            and (t.numel() == 1 or t[: B // 2].equal(t[B // 2 :]))
            and sample[: B // 2].equal(sample[B // 2 :])
        ):
            return super().forward(*args)
        return self._shared_forward(sample[: B // 2], t.expand(B), *args[2:])

    def _prefix_modules(self) -> Iterable[nn.Module]:
        """The modules that may run on half the batch (conservatively: the first two down blocks whole)."""
        yield from self.conv_in.modules()
        yield from self.down_blocks[0].modules()
        yield from self.down_blocks[1].modules()

    def _shared_forward(self, x, t, ehs, ehs_1, mask_1) -> Tensor:
        """The plain forward with ``x`` holding half the batch until a layer reads a condition."""
        cfg, B = self.cfg, ehs.shape[0]
        t_emb = unet.timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = self.time_embedding(t_emb.to(x.dtype))  # (B, temb_dim): rows equal across the halves
        contexts = self.contexts(ehs, ehs_1, mask_1, x.dtype)

        def widen(h: Tensor) -> Tensor:
            return h if h.shape[0] == B else torch.cat([h, h])

        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:  # DownBlock.forward, widening before the first conditioned transformer
            if x.shape[0] == B:
                x, block_skips = block(x, temb, contexts)
                skips += block_skips
                continue
            for i, resnet in enumerate(block.resnets):
                x = resnet(x, temb[: x.shape[0]])
                for j, (context, bias) in enumerate(contexts[: block.per_resnet]):
                    x = block.attentions[i * block.per_resnet + j](
                        x if context is None else widen(x), context, bias
                    )
                skips.append(x)
            if block.downsamplers is not None:
                x = block.downsamplers[0](x)
                skips.append(x)
        x = self.mid_block(widen(x), temb, contexts)
        skips = [widen(s) for s in skips]
        for block in self.up_blocks:
            k = len(block.resnets)
            block_skips, skips = skips[-k:], skips[:-k]
            x = block(x, block_skips, temb, contexts, skips[-1].shape[-2:] if skips else None)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


# --------------------------------------------------------------------------------------- the registry

Probe = Callable[[torch.dtype], tuple[Callable[[], Tensor], Callable[[], Tensor]]]


@dataclass(frozen=True)
class Rewrite:
    name: str
    swaps: dict[type, type]  # plain class -> fast subclass
    probe: Probe | None  # dtype -> (plain call, fast call) on a representative input; None: capability only
    # dtype, shape -> (plain call, fast call) on that input shape: the rewrite is timed per shape, where it
    # first meets one, instead of once (its module passes the shape to ``decide``)
    shape_probe: Callable[..., tuple[Callable[[], Tensor], Callable[[], Tensor]]] | None = None
    # Timed on this CPU, or not: a rewrite that only removes work (fewer multiply-adds, the same kernels) pays
    # wherever it applies, which its module checks per call; one that changes kernels or memory layouts is timed.
    timed: bool = True


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


def _twin_calls(plain: nn.Module, swaps: dict[type, type], *inputs) -> tuple[Callable, Callable]:
    """(plain call, call of a copy of ``plain`` with its modules switched to their fast classes)."""
    fast = copy.deepcopy(plain)
    for m in fast.modules():
        if type(m) in swaps:
            m.__class__ = swaps[type(m)]
    return (lambda: plain(*inputs)), (lambda: fast(*inputs))


# Representative inputs: the full-size UNet's first attention level (1024 tokens of 256 channels for
# 10.24 s, batch 2 under guidance), the VAE decoder's and the vocoder's last, widest-in-time stages.


def _probe_linear(dtype):  # the first level's feed-forward as the plain model runs it (one 256 x 256 linear,
    # ~0.3 ms in bfloat16, was too short to time: its 2-5% gain there read as 1.00x)
    return _twin_calls(
        _seeded(lambda: unet.FeedForward(256), dtype),
        REWRITES["onednn-linear"].swaps,
        _randn(dtype, 2, 1024, 256),
    )


def _probe_packed(dtype):  # the first level's feed-forward's GEMMs (the GEGLU's halves, the output) by
    # oneDNN's matmul on the weights as stored, then packed (weights made outside inference mode, as loaded)
    with torch.inference_mode(False):
        ff = _seeded(lambda: unet.FeedForward(256), dtype)
    proj, out, x = ff.net[0].proj, ff.net[2], _randn(dtype, 2, 1024, 256)
    n = proj.weight.shape[0] // 2

    def run(w: Callable[[Tensor], Tensor]) -> Tensor:
        mm = torch.ops.mkldnn._linear_pointwise
        h = mm(x, w(proj.weight[:n]), proj.bias[:n], "none", [], "none")
        h.mul_(mm(x, w(proj.weight[n:]), proj.bias[n:], "gelu", [], "none"))
        return mm(h, w(out.weight), out.bias, "none", [], "none")

    return (lambda: run(lambda w: w)), (lambda: run(packed_weight))


def _probe_geglu(dtype):
    return _twin_calls(
        _seeded(lambda: unet.GEGLU(256, 1024), dtype), {unet.GEGLU: FastGEGLU}, _randn(dtype, 2, 1024, 256)
    )


def _probe_folded(dtype):  # cross-attention to 8 GPT-2 states
    m = _seeded(lambda: unet.Attention(256, 768, 8, 32), dtype)
    return _twin_calls(
        m, {unet.Attention: FastAttention}, _randn(dtype, 2, 1024, 256), _randn(dtype, 2, 8, 768)
    )


def _probe_tokens(dtype):  # a whole first-level transformer: the gain is the copies around its blocks
    m = _seeded(lambda: unet.Transformer2DModel(256, 8, 768, 1, 32), dtype)
    inputs = _randn(dtype, 2, 256, 128, 8), _randn(dtype, 2, 8, 768), None
    return _twin_calls(m, {unet.Transformer2DModel: FastTransformer2D}, *inputs)


def _probe_upsample(dtype):
    m = _seeded(lambda: unet.Upsample2D(256), dtype)
    return _twin_calls(m, {unet.Upsample2D: FastUNetUpsample}, _randn(dtype, 2, 256, 32, 4))


def _upsample_shape_probe(dtype, shape):
    """(nearest 2x + 3x3 conv, the four 2x2 convs) on input (B, C, H, W) with O outputs, channels-last or not."""
    conv, x = _conv_and_input(dtype, *shape)
    w, b = conv.weight, conv.bias
    up = functools.partial(F.interpolate, scale_factor=2.0, mode="nearest")
    return (lambda: F.conv2d(up(x), w, b, padding=1)), (lambda: nearest2x_conv3x3(x, conv, cache=False))


# cpu-attention's per-shape decisions time at most this many tokens, and that decision serves every longer
# length (no full-size probe for a minute of audio): both kernels' cost grows with the keys alike (the kernel
# against PyTorch's at 2048 and 4096 tokens: 2.06x and 2.20x on AVX-512, 0.95x and 1.02x held to AVX2)
_ATTENTION_PROBE_TOKENS = 2048


def _attention_shape_probe(dtype, shape):
    """(PyTorch's attention, the C++ kernel) on one self-attention of (B, heads, N, d), with q, k and v viewed
    from (B, N, heads * d) as the UNet makes them. Only with the kernel enabled (``FastAttention`` asks)."""
    B, H, N, d = shape
    q, k, v = (t.view(B, N, H, d).transpose(1, 2) for t in _randn(dtype, 3, B, N, H * d).unbind(0))

    def kernel() -> Tensor:
        out = cpu_attention.attention(q, k, v)
        if out is None:
            raise RuntimeError(f"the kernel does not take {shape} in {dtype}")
        return out

    return (lambda: F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1)), kernel


def _probe_vae(dtype):  # a resnet of the decoder's last level at 10.24 s, in each layout (at 128 x 32 the
    # two were level within the timing noise, at full size channels-last is 1.11-1.24x; the whole decoder
    # with its per-shape rewrites decided in each layout 1.04x, 1.58 -> 1.51 s on AVX-512)
    # (16-bit: the small map; without native bfloat16 its convolutions run reference kernels, ~1000x slower)
    H, W = (512, 64) if dtype in (torch.float32, torch.float64) else (128, 32)
    block, x = _seeded(lambda: vae.ResnetBlock2D(128, 128, 32), dtype), _randn(dtype, 1, 128, H, W)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    return (lambda: block(x)), (lambda: block(x_cl).contiguous())


def _probe_vocoder(dtype):  # a narrow conv over a long signal stored (B, L, C), as the vocoder's input is
    m = _seeded(
        lambda: nn.Sequential(
            nn.Conv1d(64, 32, 7, padding=3), nn.LeakyReLU(0.1), nn.Conv1d(32, 32, 11, padding=5)
        ),
        dtype,
    )
    x = _randn(dtype, 1, 20000, 64).transpose(1, 2)
    return _twin_calls(m, {nn.Conv1d: FastConv1d}, x)


def _conv_and_input(dtype, B, C, H, W, O, channels_last, bias=True) -> tuple[nn.Conv2d, Tensor]:
    """A seeded 3x3 conv C -> O and a (B, C, H, W) input, channels-last or not, for the per-shape probes (random
    weights: the time does not depend on them)."""
    conv = _seeded(lambda: nn.Conv2d(C, O, 3, padding=1, bias=bool(bias)), dtype)
    x = _randn(dtype, B, C, H, W)
    return conv, x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _probe_winograd(dtype, shape=(2, 384, 64, 4, 384, 0, 1)):  # default: a conv of the UNet's third level
    """(plain conv, Winograd) on input (B, C, H, W) with O outputs, channels-last or not, with a bias or not."""
    conv, x = _conv_and_input(dtype, *shape)
    w, b = conv.weight, conv.bias  # called as functions: a user's global hooks never see a probe
    return (lambda: F.conv2d(x, w, b, padding=1)), (lambda: winograd_conv3x3(x, w, b))


def _probe_gemm_conv(dtype, shape=(2, 1280, 32, 2, 640, 0, 1)):  # default: the UNet's deepest level
    """(plain conv, one GEMM over im2col) on input (B, C, H, W) with O outputs, channels-last or not, bias or not."""
    conv, x = _conv_and_input(dtype, *shape)
    w, b = conv.weight, conv.bias
    return (lambda: F.conv2d(x, w, b, padding=1)), (lambda: gemm_conv3x3(x, w, b))


def _probe_shared(dtype):  # a small two-level UNet: checked for exactness only (not timed)
    from .config import UNetConfig

    cfg = UNetConfig(
        sample_size=16, in_channels=8, out_channels=8, block_out_channels=(32, 32), layers_per_block=2,
        down_attn=(False, True), up_attn=(True, False), cross_attention_dims=((None, 16),) * 2,
        transformer_layers=(1, 1), num_heads=(2, 2), norm_num_groups=8, norm_eps=1e-5, flip_sin_to_cos=True,
        freq_shift=0, downsample_padding=1, mid_block_scale_factor=1.0,
    )  # fmt: skip
    x = _randn(dtype, 1, 8, 16, 16)
    inputs = torch.cat([x, x]), torch.tensor(500), _randn(dtype, 2, 8, 16)
    return _twin_calls(
        _seeded(lambda: unet.AudioLDM2UNet(cfg), dtype), {unet.AudioLDM2UNet: FastUNet}, *inputs
    )


REWRITES: dict[str, Rewrite] = {
    r.name: r
    for r in [
        Rewrite("onednn-linear", {nn.Linear: FastLinear, gpt2.Conv1D: FastConv1D}, _probe_linear),
        Rewrite("fused-geglu", {unet.GEGLU: FastGEGLU}, _probe_geglu),
        Rewrite("packed-linear", {unet.AudioLDM2UNet: FastUNet}, _probe_packed),
        Rewrite("folded-attention", {unet.Attention: FastAttention}, _probe_folded, timed=False),
        Rewrite("token-projections", {unet.Transformer2DModel: FastTransformer2D}, _probe_tokens),
        Rewrite(
            "phase-upsampling",
            {unet.Upsample2D: FastUNetUpsample, vae.Upsample2D: FastVAEUpsample},
            _probe_upsample,
            timed=False,
            shape_probe=_upsample_shape_probe,
        ),
        Rewrite("shared-guidance", {unet.AudioLDM2UNet: FastUNet}, _probe_shared, timed=False),
        Rewrite("vae-channels-last", {vae.AutoencoderKLDecoder: FastVAEDecoder}, _probe_vae),
        Rewrite(
            "vocoder-channels-last",
            {nn.Conv1d: FastConv1d, nn.ConvTranspose1d: FastConvTranspose1d},
            _probe_vocoder,
        ),
        Rewrite(
            "winograd-conv",
            {nn.Conv2d: FastConv2d},
            _probe_winograd,
            timed=False,
            shape_probe=_probe_winograd,
        ),
        Rewrite(
            "gemm-conv",
            {nn.Conv2d: FastConv2d},
            _probe_gemm_conv,
            timed=False,
            shape_probe=_probe_gemm_conv,
        ),
        # opt-in (``cpu_attention``); where enabled, timed per attention shape (the AVX2 build loses to
        # PyTorch's kernel at some of the UNet's shapes)
        Rewrite("cpu-attention", {unet.Attention: FastAttention}, None, shape_probe=_attention_shape_probe),
    ]
}
# a tuple, not a set: torch 2.6's tracer (torch.compile) cannot test a class's membership of a set
_KNOWN = tuple({cls for r in REWRITES.values() for pair in r.swaps.items() for cls in pair})
_FAST_TO_PLAIN = {fast: plain for r in REWRITES.values() for plain, fast in r.swaps.items()}

# (rewrite, dtype) pairs that ``optimize`` turned on in this process; the fast modules read it on every call
# (one class may serve two rewrites: FastAttention folds only where folded-attention is on).
_ON: set[tuple[str, torch.dtype]] = set()


# (rewrite, dtype) pairs with a shape probe that ``optimize(select="auto")`` turned on: timed per input shape
_PER_SHAPE: set[tuple[str, torch.dtype]] = set()


def _enabled(name: str, dtype: torch.dtype) -> bool:
    return (name, dtype) in _ON


# ------------------------------------------------------------------------------------------ deciding


@dataclass(frozen=True)
class Decision:
    supported: bool
    pays: bool | None  # None: not timed
    reason: str


def _time(
    fn: Callable[[], object],
    plain: Callable[[], object],
    rounds: int,
    seconds: float,
    max_rounds: int,
    clear: tuple[int, float] | None = None,
) -> tuple[float, float, float]:
    """Interleaved rounds, each calling both, at least ``rounds`` and until ``seconds`` have passed (at most
    ``max_rounds``): (fast's median time, plain's median time (s), the median over rounds of plain / fast
    within a round). The paired ratio is the decision: it cancels the drift of this machine's speed between
    rounds and this VM's occasional fast outliers (the ratio of the two calls' minimum times read 0.97-1.25x
    over five runs of the VAE probe, the paired median 1.11-1.24x; oneDNN's bfloat16 linears, 1-2% faster,
    read 1.01-1.04x over 15 rounds and 1.014-1.023x over 60). Stops early when the answer is plain:
    - after two rounds when the fast call is plainly slower (1.5x): a clear loss needs no more rounds;
    - with ``clear`` = (n, m), after n rounds whose every ratio lies beyond 1 + m, or every one below 1 - m:
      more rounds could move the median, not its side of the 1% threshold (a first run on a new machine
      spends most of its probes' time on such answers);
    - after three once ``5 * seconds`` have passed (slow calls: bfloat16 on a CPU without it runs oneDNN's
      reference kernels)."""
    times: tuple[list[float], list[float]] = ([], [])
    start = time.perf_counter()
    for r in range(max_rounds):
        for f, acc in zip((fn, plain), times, strict=True):
            t0 = time.perf_counter()
            f()
            acc.append(time.perf_counter() - t0)
        ratios = [p / q for q, p in zip(*times, strict=True)]
        ratio = statistics.median(ratios)
        elapsed = time.perf_counter() - start
        loss = r >= 1 and ratio < 1 / 1.5
        plain_answer = (
            clear is not None
            and r + 1 >= clear[0]
            and (min(ratios) > 1 + clear[1] or max(ratios) < 1 - clear[1])
        )
        done = r + 1 >= rounds and elapsed >= seconds
        slow = r >= 2 and elapsed >= 5 * seconds
        if loss or plain_answer or done or slow:
            break
    return statistics.median(times[0]), statistics.median(times[1]), ratio


def _code_key(source: str) -> str:
    """This file's code as the decisions depend on it: its syntax tree without docstrings (comments are not in
    it), so that an upgrade which only changes the prose keeps every machine's decisions."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


@functools.cache
def _this_code() -> str:
    with loading.gc_paused():  # its ~10k nodes would set off a full collection over torch's objects: 80 ms
        return _code_key(Path(__file__).read_text())


def _machine_key() -> str:
    """What a timing depends on: the CPU (model and flags), the instruction sets PyTorch and oneDNN may use,
    the thread count, torch's version, and this file's code (the rewrites and their probes)."""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = "".join(
                sorted({line for line in f if line.startswith(("model name", "flags", "vendor_id"))})
            )
    except OSError:  # not Linux
        cpu = f"{platform.machine()} {platform.processor()}"
    env = sorted(
        (k, v) for k, v in os.environ.items() if k.startswith(("ONEDNN_", "DNNL_", "ATEN_", "MKL_", "OMP_"))
    )
    parts = [cpu, repr(env), torch.__version__, str(torch.get_num_threads()), _this_code()]
    parts.append(torch.backends.cpu.get_cpu_capability())
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _decisions_file() -> Path:
    return cpu_attention.cache_root() / f"fast-decisions-{_machine_key()}.json"


@functools.cache
def decide(
    name: str, dtype: torch.dtype, timed: bool = True, shape: tuple[int, ...] | None = None
) -> Decision:
    """Whether rewrite ``name`` is supported on this CPU in ``dtype`` (it runs, and matches the plain
    computation on a representative input) and, when ``timed``, whether it pays there (>= 1% faster: the
    median ratio over interleaved rounds, ``_time``). Probed once per machine (~0.2-1.6 s a rewrite): a timed
    decision is kept in ``~/.cache/audioldm2_core/`` under a key of the CPU, the instruction-set settings, the
    thread count, torch's version and this file's code (not its docstrings or comments), so that later
    processes load in milliseconds (delete the file to measure again).
    One timed while other work competed for the CPU is used until it can be timed again on a quiet machine.
    ``shape``: for a rewrite with a shape probe, the decision for that input shape (always timed)."""
    key = f"{name}|{str(dtype).removeprefix('torch.')}"
    if shape is not None:
        key += "|" + ",".join(map(str, shape))
    path = _decisions_file() if timed else None
    stored = _read_json(path).get(key) if path is not None else None
    # A decision timed on a busy machine is used until one can be timed on a quiet one.
    if isinstance(stored, dict) and (not stored.pop("busy", False) or _busy()):
        return Decision(**stored)
    _busy()  # the probe's own window starts here
    decision = _probe(name, dtype, timed, shape)
    if path is not None:
        _write_json(path, {**_read_json(path), key: {**dataclasses.asdict(decision), "busy": _busy()}})
    return decision


_TICK = 1 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01  # /proc/stat's unit, seconds


def _clocks() -> tuple[float, float, float] | None:
    """(wall clock, all CPUs' busy time since boot, this process's CPU time), in seconds; None without
    ``/proc/stat`` (not Linux). Busy time counts user, nice, system, interrupt and steal time (a VM's vCPU
    given to other guests is competition too); it is kept in clock ticks, whole 1/100 s per CPU."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    return time.monotonic(), (user + nice + system + irq + softirq + steal) * _TICK, time.process_time()


# The busy answer and the clocks of the last look: a look covers the time since the previous one.
_LOOK: dict = {"clocks": _clocks(), "busy": False}


def _busy(min_window: float = 0.25) -> bool:
    """Whether other work competed for the CPU since the last look (import, or the previous call): other
    processes kept more of the CPUs busy than this process's threads leave free, by a quarter of a CPU. Our
    own work is not competition. (The 1-minute load average, used before, counted it: on a machine with as
    many cores as threads it rose to the core count during a generation, and decisions probed then were
    stored as busy and probed again by the next process.) A window shorter than ``min_window`` is too short
    for clock ticks to tell: the last answer stands and the window goes on. Without ``/proc/stat``: the
    load average above the core count, as before."""
    cpus = os.cpu_count() or 1
    now, then = _clocks(), _LOOK["clocks"]
    if now is None or then is None:
        try:
            return os.getloadavg()[0] > cpus
        except (OSError, AttributeError):  # not available (Windows has no os.getloadavg)
            return False
    wall = now[0] - then[0]
    if wall < min_window:
        return _LOOK["busy"]
    others = (now[1] - then[1]) - (now[2] - then[2]) - cpus * _TICK  # less a tick per CPU
    free = max(0, cpus - torch.get_num_threads())
    _LOOK.update(clocks=now, busy=others / wall > free + 0.25)
    return _LOOK["busy"]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    """Atomically (a whole file or none, for concurrent processes); an unwritable cache is only a slower start."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass


def _probe(name: str, dtype: torch.dtype, timed: bool, shape: tuple[int, ...] | None = None) -> Decision:
    rewrite = REWRITES[name]
    if name == "cpu-attention" and shape is None:  # a capability; built and used only when opted in
        if cpu_attention.supported():
            return Decision(
                True, None, f"{cpu_attention.isa()} build: where cpu_attention is enabled, timed per shape"
            )
        return Decision(False, None, f"needs AVX-512 or AVX2 (this CPU: {cpu_attention.isa()})")
    if name in ("onednn-linear", "packed-linear") and not _has_onednn_matmul():
        return Decision(False, None, "this PyTorch build has no oneDNN matmul")
    if name == "folded-attention" and dtype not in (torch.float32, torch.float64):
        return Decision(
            False, None, "full precision only (16-bit scores would be rounded before the softmax)"
        )
    if name == "packed-linear" and dtype not in (torch.bfloat16, torch.float16):
        return Decision(
            False,
            None,
            "16-bit only (float32 weights are the file's memory maps: a packed copy would double them)",
        )
    if name == "winograd-conv" and dtype != torch.float32:
        return Decision(False, None, "float32 only (in 16-bit formats every transform step would round)")
    on = (name, dtype) in _ON
    _ON.add((name, dtype))  # for the probe's fast twin
    try:
        with torch.inference_mode():
            plain, fast = rewrite.probe(dtype) if shape is None else rewrite.shape_probe(dtype, shape)
            try:
                t0 = time.perf_counter()
                expected = plain()
                t1 = time.perf_counter()
                got = fast()
                first = min(t1 - t0, time.perf_counter() - t1)  # the first calls: the check and a warm-up
            except RuntimeError as e:  # e.g. oneDNN's bfloat16 matmul on a CPU without AVX-512 BF16
                return Decision(False, None, f"unsupported here: {str(e).splitlines()[0][:100]}")
            # in float32 (float64 for float64): the difference of two close floats is exact, and a norm's
            # rounding is far below the 1e-5 asked (double copies of a VAE-sized probe's outputs took ~50 ms)
            wide = torch.float64 if dtype == torch.float64 else torch.float32
            expected = expected.to(wide)
            err = ((got.to(wide) - expected).norm() / expected.norm()).item()
            if not err <= (1e-5 if dtype in (torch.float32, torch.float64) else 1e-2):
                return Decision(False, None, f"differs from the plain computation by {err:.1e} here")
            if not (timed and (rewrite.timed or shape is not None)):
                why = "not timed"
                if timed:
                    why = "timed per shape" if rewrite.shape_probe else "fewer multiply-adds where it applies"
                return Decision(True, None, f"supported (error {err:.1e}); {why}")
            # a whole rewrite's probe decides for every layer: 0.5 s and at least 7 rounds (~0.2-0.7 s where
            # every round is 5% or more on one side; a short call runs 15 or more rounds by 0.5 s, a long one,
            # steadier by itself, 7: 15 made the VAE's 0.2 s rounds take 3 s on a first run held to AVX2, and
            # its answer, near 1, still differed between runs); per-shape probes run once per layer shape, a
            # loss or a gain of 10% or more at most shapes: a few rounds, two where both are 15% or more on
            # one side, one where the calls are long (50 ms or more: the VAE's full-size maps, up to 0.5 s a
            # round) and 30% or more on one side (one round of short calls varies too much for that)
            if shape is None:
                t_fast, t_plain, ratio = _time(fast, plain, 7, 0.5, max_rounds=200, clear=(5, 0.05))
            else:
                clear = (1, 0.3) if first >= 0.05 else (2, 0.15)
                t_fast, t_plain, ratio = _time(fast, plain, 3, 0.1, max_rounds=15, clear=clear)
    finally:
        if not on:
            _ON.discard((name, dtype))
    return Decision(
        True, ratio >= 1.01, f"{t_plain * 1e3:.2f} -> {t_fast * 1e3:.2f} ms on its probe ({ratio:.2f}x)"
    )


def optimize(model: nn.Module, select: str | Iterable[str] = "auto") -> dict[str, Decision]:
    """Switch ``model``'s modules to their fast twins where the rewrite is on; returns the decisions taken.

    ``select``: "auto" (supported and pays on this CPU in the model's dtype), "supported" (every supported
    rewrite, untimed) or a collection of rewrite names (those of them that are supported, untimed). CPU models
    only: on other devices nothing is switched.
    """
    if isinstance(select, str):
        if select not in ("auto", "supported"):
            raise ValueError(f"select must be 'auto', 'supported' or rewrite names, not {select!r}")
        names = list(REWRITES)
    else:
        names = list(select)
        unknown = set(names) - set(REWRITES)
        if unknown:
            raise ValueError(f"unknown rewrites {sorted(unknown)}; known: {', '.join(REWRITES)}")
    p = next(model.parameters(), None)
    if p is None or p.device.type != "cpu":
        return {}
    decisions: dict[str, Decision] = {}
    swaps: dict[type, type] = {}
    for name in names:
        rewrite = REWRITES[name]
        if not any(type(m) in rewrite.swaps for m in model.modules()):
            continue  # nothing of this model it applies to
        decision = decisions[name] = decide(name, p.dtype, timed=select == "auto")
        if decision.supported and decision.pays is not False:
            _ON.add((name, p.dtype))
            swaps |= rewrite.swaps
            if rewrite.shape_probe is not None:  # "auto": timed per input shape; else wherever it applies
                (_PER_SHAPE.add if select == "auto" else _PER_SHAPE.discard)((name, p.dtype))
    for m in model.modules():
        if type(m) in swaps:
            m.__class__ = swaps[type(m)]
    return decisions


def restore(model: nn.Module) -> nn.Module:
    """Switch every fast module of ``model`` back to its plain class."""
    for m in model.modules():
        if type(m) in _FAST_TO_PLAIN:
            m.__class__ = _FAST_TO_PLAIN[type(m)]
    return model


def native_bfloat16() -> bool:
    """Whether this CPU runs oneDNN's bfloat16 matmul natively (AVX-512 BF16 or AMX): without it oneDNN runs its
    reference kernels, far slower than float32."""
    return decide("onednn-linear", torch.bfloat16, timed=False).supported


# ------------------------------------------------------------------------- compilation, CUDA graphs


def compiled(unet: torch.nn.Module, options: dict[str, Any] | None, device: torch.device) -> torch.nn.Module:
    """The UNet under ``torch.compile(**options)`` (``None``: as it is). Static shapes by default (a new
    length or batch compiles again). The same module underneath: the weights are the UNet's own. On the CPU,
    Inductor's ``freezing`` too (unless the options name a mode or another backend): the weights become
    constants of the graph, prepacked for oneDNN (without it the compiled linears are MKL's GEMMs, slower than
    the eager oneDNN ones); weights changed after the first call are then not seen: compile again. On a 2-core
    CPU compilation has not paid (``benchmarks/RESULTS.md``): it is for the GPU, where it removes per-kernel
    overhead.
    """
    if options is None:
        return unet
    kwargs: dict[str, Any] = {"dynamic": False} | options
    if device.type == "cpu" and "mode" not in kwargs and kwargs.get("backend", "inductor") == "inductor":
        kwargs["options"] = {"freezing": True} | kwargs.get("options", {})
    return torch.compile(unet, **kwargs)


def compile_options(compile: bool | dict[str, Any]) -> dict[str, Any] | None:
    if isinstance(compile, dict):
        return dict(compile)
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be a bool or a dict of torch.compile options, not {compile!r}")
    return {} if compile else None


class CudaGraphDenoiser:
    """A denoiser ``model(x, t)`` replayed from a CUDA graph: the first call runs it normally, on a side
    stream (which also warms up cuBLAS/cuDNN), then records it into a
    graph with static input buffers; every later call copies its ``x`` and ``t`` into those buffers, replays
    the graph, and returns a copy of the static output. The shapes, dtypes and conditions must stay those of
    the first call, as in one denoising loop; build one per loop. Only ``model``'s GPU work is recorded:
    it must not synchronise with the host (the UNet and the guidance closure do not)."""

    def __init__(self, model: Callable[[Tensor, Tensor], Tensor]):
        self.model = model
        # after the first call: (replay, static x, static t, static output)
        self._recorded: tuple[Callable[[], None], Tensor, Tensor, Tensor] | None = None

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        if self._recorded is None:
            out = self._warm_up(lambda: self.model(x, t))
            static_x, static_t = x.clone(), torch.as_tensor(t, device=x.device).clone()
            replay, static_out = self._capture(lambda: self.model(static_x, static_t))
            self._recorded = replay, static_x, static_t, static_out
            return out
        replay, static_x, static_t, static_out = self._recorded
        if x.shape != static_x.shape or x.dtype != static_x.dtype:
            raise ValueError(
                f"a CUDA-graphed denoiser was recorded for x {tuple(static_x.shape)} {static_x.dtype}, "
                f"called with {tuple(x.shape)} {x.dtype}"
            )
        static_x.copy_(x)
        static_t.copy_(t)
        replay()
        return static_out.clone()

    def _warm_up(self, fn: Callable[[], Tensor]) -> Tensor:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out = fn()
        torch.cuda.current_stream().wait_stream(stream)
        return out

    def _capture(self, fn: Callable[[], Tensor]) -> tuple[Callable[[], None], Tensor]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        return graph.replay, out
