"""The rewrite table: each rewrite as a record of what it swaps, how it is probed, whether it is timed, and
what it needs of the dtype, the PyTorch build and the CPU (which ``decisions`` checks before probing)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .. import gpt2, unet, vae
from . import cpu_attention, probes
from .convs import FastConv2d
from .linears import FastConv1D, FastLinear, has_onednn_matmul
from .plan import Plan
from .unet_rewrites import FastAttention, FastGEGLU, FastTransformer2D, FastUNet, FastUNetUpsample
from .vae_rewrites import FastVAEDecoder, FastVAEUpsample
from .vocoder_rewrites import FastConv1d, FastConvTranspose1d

Probe = Callable[[Plan], probes.Calls]  # the plan its fast call runs under -> (plain call, fast call)
ShapeProbe = Callable[[Plan, tuple[int, ...]], probes.Calls]  # the same on an input of that shape


@dataclass(frozen=True)
class Capability:
    """Something a rewrite needs of the PyTorch build or the CPU."""

    present: Callable[[], bool]
    missing: Callable[[], str]  # the decision's reason where it is not present
    found: Callable[[], str] = lambda: ""  # what a decision without a probe says where it is


ONEDNN_MATMUL = Capability(has_onednn_matmul, lambda: "this PyTorch build has no oneDNN matmul")
KERNEL_ISA = Capability(
    cpu_attention.supported,
    lambda: f"needs AVX-512 or AVX2 (this CPU: {cpu_attention.isa()})",
    lambda: f"{cpu_attention.isa()} build",
)
FULL_PRECISION = (torch.float32, torch.float64)
SIXTEEN_BIT = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Rewrite:
    name: str
    swaps: dict[type, type]  # plain class -> fast subclass
    probe: Probe | None  # (plain call, fast call) on a representative input; None: a capability only
    # (plain call, fast call) on an input shape: the rewrite is timed per shape, where it first meets one,
    # instead of once (its module asks its plan, which asks ``decide``)
    shape_probe: ShapeProbe | None = None
    # Timed on this CPU, or not: a rewrite that only removes work (fewer multiply-adds, the same kernels) pays
    # wherever it applies, which its module checks per call; one that changes kernels or memory layouts is timed.
    timed: bool = True
    dtypes: tuple[torch.dtype, ...] | None = None  # the dtypes it is offered in (None: every one) ...
    other_dtypes: str = ""  # ... and the decision's reason in the others
    needs: tuple[Capability, ...] = ()
    # rewrites its fast route calls into (``linear``): its probe runs with those on where this machine decides
    # them on, as a model optimized with the defaults runs it
    builds_on: tuple[str, ...] = ()
    opt_in: bool = False  # on only for a model whose ``optimize`` chose it (``cpu_attention=True``)

    def unmet(self, dtype: torch.dtype) -> str | None:
        """Why the rewrite is not offered in ``dtype`` on this machine, or None where it is."""
        for capability in self.needs:
            if not capability.present():
                return capability.missing()
        if self.dtypes is not None and dtype not in self.dtypes:
            return self.other_dtypes
        return None


REWRITES: dict[str, Rewrite] = {
    r.name: r
    for r in [
        Rewrite(
            "onednn-linear",
            {nn.Linear: FastLinear, gpt2.Conv1D: FastConv1D},
            probes.probe_linear,
            needs=(ONEDNN_MATMUL,),
        ),
        Rewrite("fused-geglu", {unet.GEGLU: FastGEGLU}, probes.probe_geglu, builds_on=("onednn-linear",)),
        Rewrite(
            "packed-linear",
            {unet.AudioLDM2UNet: FastUNet},
            probes.probe_packed,
            needs=(ONEDNN_MATMUL,),
            dtypes=SIXTEEN_BIT,
            other_dtypes="16-bit only (float32 weights are the file's memory maps: a packed copy would double them)",
        ),
        Rewrite(
            "folded-attention",
            {unet.Attention: FastAttention},
            probes.probe_folded,
            timed=False,
            dtypes=FULL_PRECISION,
            other_dtypes="full precision only (16-bit scores would be rounded before the softmax)",
        ),
        Rewrite(
            "token-projections",
            {unet.Transformer2DModel: FastTransformer2D},
            probes.probe_tokens,
            builds_on=("onednn-linear",),
        ),
        Rewrite(
            "phase-upsampling",
            {unet.Upsample2D: FastUNetUpsample, vae.Upsample2D: FastVAEUpsample},
            probes.probe_upsample,
            timed=False,
            shape_probe=probes.upsample_shape_probe,
        ),
        Rewrite("shared-guidance", {unet.AudioLDM2UNet: FastUNet}, probes.probe_shared, timed=False),
        Rewrite("vae-channels-last", {vae.AutoencoderKLDecoder: FastVAEDecoder}, probes.probe_vae),
        Rewrite(
            "vocoder-channels-last",
            {nn.Conv1d: FastConv1d, nn.ConvTranspose1d: FastConvTranspose1d},
            probes.probe_vocoder,
        ),
        Rewrite(
            "winograd-conv",
            {nn.Conv2d: FastConv2d},
            probes.probe_winograd,
            timed=False,
            shape_probe=probes.probe_winograd,
            dtypes=(torch.float32,),
            other_dtypes="float32 only (in 16-bit formats every transform step would round)",
            builds_on=("onednn-linear",),
        ),
        Rewrite(
            "gemm-conv",
            {nn.Conv2d: FastConv2d},
            probes.probe_gemm_conv,
            timed=False,
            shape_probe=probes.probe_gemm_conv,
            builds_on=("onednn-linear",),
        ),
        # a C++ build, hence opt-in; where chosen, timed per attention shape (the AVX2 build loses to PyTorch's
        # kernel at some of the UNet's shapes)
        Rewrite(
            "cpu-attention",
            {unet.Attention: FastAttention},
            None,
            shape_probe=probes.attention_shape_probe,
            needs=(KERNEL_ISA,),
            opt_in=True,
        ),
    ]
}
FAST_TO_PLAIN = {fast: plain for r in REWRITES.values() for plain, fast in r.swaps.items()}
