"""Linears by oneDNN's matmul, shared by the text models, GPT-2 and the UNet (rewrite ``onednn-linear``), on
weights packed once in oneDNN's blocked layout inside a UNet call (``packed-linear``).

``linear`` is also the GEMM of the other rewrites (GEGLU's halves, the token projections, Winograd's and the
im2col convolutions): it takes the route its caller's plan allows.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from .. import gpt2
from .guards import no_grad, twin
from .plan import OFF, Plan


@functools.cache
def has_onednn_matmul() -> bool:
    """Whether this PyTorch build has oneDNN's matmul op (x86 and ARM wheels do; a build without oneDNN
    registers no ``mkldnn`` ops at all)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn(x: Tensor, weight: Tensor, plan: Plan) -> bool:
    """Whether oneDNN's matmul is used for this linear: on in ``plan`` for the dtype, off under autograd and
    torch.compile (no backward; the compiler picks its own GEMMs)."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype
        and plan.on("onednn-linear", x.dtype)
        and not torch.compiler.is_compiling()  # before the build check: torch 2.6's tracer cannot run it
        and torch.backends.mkldnn.enabled
        and has_onednn_matmul()
        and no_grad(x, weight)
    )


# Whether this context is inside a UNet call (``unet_call``), where ``packed-linear``'s linears pack
_IN_UNET_CALL: contextvars.ContextVar[bool] = contextvars.ContextVar("audioldm2_in_unet_call", default=False)


@contextlib.contextmanager
def unet_call() -> Iterator[None]:
    """Inside: the linears of a plan with ``packed-linear`` on read packed weights (the UNet's run 20-200 times
    a generation; a text encoder's linear, called once, packs nothing)."""
    token = _IN_UNET_CALL.set(True)
    try:
        yield
    finally:
        _IN_UNET_CALL.reset(token)


def linear(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, gelu: bool = False, plan: Plan = OFF
) -> Tensor:
    """``F.linear``, then the exact (erf) GELU if ``gelu``: by oneDNN's matmul with the GELU in the same pass
    where ``plan`` has that on (on the weight in oneDNN's blocked layout inside a UNet call where it has
    ``packed-linear`` on), else ``F.linear`` (GELU in place when no gradient needs the input)."""
    if onednn(x, weight, plan) and (bias is None or no_grad(bias)):
        if _IN_UNET_CALL.get() and plan.on("packed-linear", x.dtype):
            weight = packed_weight(weight, plan.packed)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [], "none")
    y = F.linear(x, weight, bias)
    if not gelu:
        return y
    return F.gelu(y) if y.requires_grad else torch.ops.aten.gelu_(y)


def packed_weight(weight: Tensor, kept: WeakIdKeyDictionary) -> Tensor:
    """``weight`` (a parameter or a view of one) as oneDNN's matmul reads it, in its blocked layout: the same
    numbers, reordered once and kept in ``kept`` (a plan's) while the parameter's storage and version counter
    stay the same (a ``copy_``, an optimizer step or a new tensor repack it), where the plain call reorders the
    weight on every call (rewrite ``packed-linear``). Inference tensors (no version counter) are passed as they
    are."""
    if weight.is_inference():
        return weight
    base = weight if weight._base is None else weight._base
    stamp = (weight.untyped_storage().data_ptr(), weight._version)
    where = (weight.storage_offset(), tuple(weight.shape), weight.stride())
    views = kept.setdefault(base, {})
    hit = views.get(where)
    if hit is None or hit[0] != stamp:
        hit = views[where] = (stamp, torch.ops.mkldnn._reorder_linear_weight(weight.detach()))
    return hit[1]


@twin
class FastLinear(nn.Linear):
    """``nn.Linear`` by oneDNN's matmul (rewrite ``onednn-linear``)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, plan=self.fast_plan)


@twin
class FastConv1D(gpt2.Conv1D):
    """GPT-2's ``Conv1D`` (weight stored (in, out)) by oneDNN's matmul (rewrite ``onednn-linear``)."""

    def forward(self, x: Tensor) -> Tensor:
        plan = self.fast_plan
        return (
            linear(x, self.weight.t(), self.bias, plan=plan)
            if onednn(x, self.weight, plan)
            else super().forward(x)
        )
