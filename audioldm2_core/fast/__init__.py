"""The speed layer: exact rewrites of the plain model, applied to a loaded model for inference.

The model files hold the reference computation. This package makes it faster without changing what it
computes (only the order of float additions): ``optimize(model)`` switches each module it knows to a
subclass whose ``forward`` takes a faster route *when that route computes exactly what the plain forward
would* and falls back to the plain ``forward`` (``super().forward``) otherwise. Nothing is copied or
renamed: parameters, buffers, state-dict keys, hooks and ``isinstance`` checks stay as they were, and
``restore(model)`` switches the classes back.

    rewrite            replaces (plain)                           with                               file
    onednn-linear      nn.Linear, GPT-2 Conv1D: MKL's GEMM        oneDNN's matmul (what PyTorch's    linears
                                                                  compiler runs for frozen linears)
    fused-geglu        GEGLU: one GEMM, chunk, GELU, product      two GEMMs on the weight's row      unet_rewrites
                                                                  halves, GELU fused into the gate's
    packed-linear      the UNet's 16-bit linears: oneDNN          the weights in oneDNN's blocked    linears
                       reorders the weight on every call          layout, reordered once per version
    folded-attention   cross-attention to a short context         to_q folded into the keys, to_out  unet_rewrites
                                                                  into the values: fewer MACs
    token-projections  Transformer2D's 1x1 proj_in / proj_out     linears in the token layout        unet_rewrites
    phase-upsampling   nearest 2x + 3x3 conv (UNet, VAE)          four 2x2 convs of the input        convs
    shared-guidance    the UNet on [x, x] under guidance          the layers before the first        unet_rewrites
                                                                  conditioned transformer once
    vae-channels-last  the VAE decoder's convs and norms          the same ops on (B, H, W, C)       vae_rewrites
    vocoder-channels-  the vocoder's 1-D convs on (B, C, L)       2-D convs on (B, C, 1, L)          vocoder_rewrites
      last                                                        channels-last
    winograd-conv      3x3, stride-1 convs (UNet, VAE), float32   Winograd F(2x2, 3x3)               convs
    gemm-conv          3x3 convs on small maps                    one GEMM over an im2col copy       convs
    cpu-attention      SDPA of the UNet's self-attentions         the opt-in C++ kernel              cpu_attention

Each rewrite is a record in ``rewrites.REWRITES``: what it swaps, its probe (``probes``), whether it is timed,
what it needs of the dtype and the machine. ``decisions.decide`` says whether it is supported here and pays.

Two guarantees a user can rely on, checked on every call, not once at ``optimize``:
- **A user's change is never bypassed.** A rewrite that would skip a submodule's own ``forward`` (reading its
  ``.weight`` instead) runs only while that submodule is of the class we wrote it for and has no hooks, and no
  global module hooks are registered (``guards``); a replaced submodule (a LoRA wrapper that keeps ``.weight``,
  as PEFT's do), a hooked one or a parametrized one makes the rewrite stand aside for that call. Weights are
  read live at every call, so a changed weight is always seen (the derived weights kept, the upsamplers'
  summed kernels and the packed linears, are keyed on the weight's storage and version counter).
- **Gradients are never lost.** Rewrites without a backward (oneDNN's fused ops, the C++ kernel, the in-place
  products) stand aside whenever autograd records.

What ``optimize`` turns on belongs to that model (``plan.Plan``, attached to each module it switched): a
second model optimized otherwise in the same process computes and routes as it was told, and ``restore``
leaves no trace. The decisions are facts about the machine and are shared (kept on disk, see ``decisions``).
``compile`` holds torch.compile's wrapping of the UNet and the CUDA-graph denoiser.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..errors import UsageError
from . import cpu_attention
from . import cpu_attention as attention_kernel  # the module, where ``optimize``'s argument hides its name
from .compile import CudaGraphDenoiser, compile_options, compiled
from .convs import PHASE_CACHE
from .decisions import Decision, decide, stored
from .plan import PLAN, Plan, switch
from .rewrites import FAST_TO_PLAIN, REWRITES, Rewrite

__all__ = [
    "REWRITES",
    "CudaGraphDenoiser",
    "Decision",
    "Plan",
    "Rewrite",
    "compile_options",
    "compiled",
    "cpu_attention",
    "decide",
    "native_bfloat16",
    "optimize",
    "restore",
    "timed_here",
]


def optimize(
    model: nn.Module, select: str | Iterable[str] = "auto", cpu_attention: bool | None = None
) -> dict[str, Decision]:
    """Switch ``model``'s modules to their fast twins where the rewrite is on; returns the decisions taken.

    ``select``: "auto" (supported and pays on this CPU in the model's dtype), "supported" (every supported
    rewrite, untimed) or a collection of rewrite names (those of them that are supported, untimed).
    ``cpu_attention``: route this model's self-attentions to the C++ kernel where it pays (True: built now if
    needed, a failed build raises and nothing is switched), never (False), or as ``AUDIOLDM2_CPU_ATTENTION``
    says (None). CPU models only: on other devices nothing is switched. A model optimized before is restored
    first: the last call's choices are the ones it has.
    """
    names = _names(select)
    kernel = attention_kernel.chosen(cpu_attention)
    restore(model)
    p = next(model.parameters(), None)
    if p is None or p.device.type != "cpu":
        return {}
    if kernel and "cpu-attention" in names:
        attention_kernel.build()
    classes = {type(m) for m in model.modules()}
    decisions: dict[str, Decision] = {}
    on: list[str] = []
    swaps: dict[type, type] = {}
    for name in names:
        rewrite = REWRITES[name]
        if (rewrite.opt_in and not kernel) or not classes & rewrite.swaps.keys():
            continue  # not chosen, or nothing of this model it applies to
        decision = decisions[name] = decide(name, p.dtype, timed=select == "auto")
        if decision.on:
            on.append(name)
            swaps |= rewrite.swaps
    # "auto": the rewrites with a shape probe are timed per input shape; otherwise on wherever they apply
    per_shape = {n for n in on if REWRITES[n].shape_probe is not None} if select == "auto" else set()
    switch(model, swaps, Plan(p.dtype, frozenset(on), frozenset(per_shape), decide))
    return decisions


def native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 arithmetic (AVX-512 BF16 or AMX) and oneDNN's bfloat16 matmul runs on it
    under the instruction sets allowed here (``ONEDNN_MAX_CPU_ISA``): elsewhere bfloat16 runs on emulation or
    reference kernels, slower than float32."""
    flags = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return flags and decide("onednn-linear", torch.bfloat16, timed=False).supported


def timed_here(dtype: torch.dtype) -> bool:
    """Whether this machine has timed its rewrites in ``dtype`` before (their decisions are on disk): a first
    run does it, ~10 s (``audioldm2 --prepare`` does it ahead)."""
    return all(stored(name, dtype) for name, r in REWRITES.items() if not r.opt_in)


def _names(select: str | Iterable[str]) -> list[str]:
    if isinstance(select, str):
        if select not in ("auto", "supported"):
            raise UsageError(f"select must be 'auto', 'supported' or rewrite names, not {select!r}")
        return list(REWRITES)
    names = list(select)
    unknown = set(names) - set(REWRITES)
    if unknown:
        raise UsageError(f"unknown rewrites {sorted(unknown)}; known: {', '.join(REWRITES)}")
    return names


def restore(model: nn.Module) -> nn.Module:
    """Switch every fast module of ``model`` back to its plain class, dropping its plan (and with it the packed
    weights) and the upsamplers' summed kernels: the model as it was before ``optimize``."""
    for m in model.modules():
        plain = FAST_TO_PLAIN.get(type(m))
        if plain is not None:
            m.__class__ = plain
        m.__dict__.pop(PLAN, None)
        m.__dict__.pop(PHASE_CACHE, None)
    return model
