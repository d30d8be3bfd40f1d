"""What a training step keeps in memory: exact rewrites of the UNet that keep less for the backward, applied
from outside (``keep_less``; ``keep_all`` undoes them), and the heap hand-back while checkpointing.

A forward under autograd keeps, for each operation, the tensors its derivative reads. Three of the UNet's
keep more than their gradients need:

    GEGLU      h * gelu(g), (h, g) = proj(x):  keeps (h, g) and gelu(g); the derivative needs only (h, g):
               gelu(g) is computed again in the backward (elementwise, beside the derivative's own erf)
    Conv2d     a frozen weight (a LoRA's base model): keeps its input, which only the weight's gradient reads;
               the input's gradient needs the weight and the input's shape (``torch.nn.grad.conv2d_input``)
    resnet     silu(group_norm(x)): keeps x for the norm and the normalised map for the SiLU; the map is the
               norm of x again, computed in the backward (an elementwise pass) instead of kept

Each is a subclass of the plain module with a custom ``torch.autograd.Function``, whose class is swapped in
(state dict, keys and hooks unchanged); each computes the same outputs and the same gradients (the same
kernels on the same tensors) and stands aside, calling the plain forward, where it would change anything: no
gradient recorded, a weight that trains (``--full``, a LoRA on the convs), autocast for the norm (its dtype
policy), a norm with hooks or replaced, global module hooks. What each saves: ``benchmarks/train_ab.py --saved``.

The heap. glibc keeps memory freed inside a forward (the temporaries between the tensors kept) for reuse, and
a checkpointed forward frees nearly all it allocates: its peak is then mostly that held memory. With gradient
checkpointing on a CPU the trainer hands it back before each UNet block (``residency.return_heap_before``),
which costs a few page faults per block; without checkpointing the hand-back costs a large share of the step
(benchmarks/RESULTS.md) and is not done.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..fast.guards import global_hooks, hooked
from ..residency import return_heap_before
from ..unet import GEGLU, AudioLDM2UNet, ResnetBlock2D

__all__ = ["prepare", "keep_less", "keep_all", "GatedGELU", "FrozenWeightConv", "GroupNormSiLU"]


def prepare(unet: AudioLDM2UNet, gradient_checkpointing: bool, device: torch.device) -> None:
    """The trainer's memory policy for the UNet it trains: the lean modules, and with gradient checkpointing its
    blocks, each handing the freed heap back first on a CPU (removable: ``unet.heap_hooks``)."""
    keep_less(unet)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if device.type == "cpu":
            unet.heap_hooks = return_heap_before([*unet.down_blocks, unet.mid_block, *unet.up_blocks])


class GatedGELU(torch.autograd.Function):
    """h * gelu(g) for (h, g) = p.chunk(2, -1), keeping only p: autograd's mul and gelu backward, with gelu(g)
    computed again."""

    @staticmethod
    def forward(ctx, p: Tensor) -> Tensor:
        h, gate = p.chunk(2, dim=-1)
        ctx.save_for_backward(p)
        return h * F.gelu(gate)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (p,) = ctx.saved_tensors
        h, gate = p.chunk(2, dim=-1)
        return torch.cat([grad * F.gelu(gate), torch.ops.aten.gelu_backward(grad * h, gate)], dim=-1)


class FrozenWeightConv(torch.autograd.Function):
    """A convolution whose weight and bias do not train: keeps the weight (checked for in-place changes as
    autograd checks what it keeps), not the input."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, conv: nn.Conv2d) -> Tensor:
        ctx.conv, ctx.shape = conv, x.shape
        ctx.save_for_backward(weight)
        return conv._conv_forward(x, weight, conv.bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        c, (weight,) = ctx.conv, ctx.saved_tensors
        # under autocast the forward ran in grad's dtype: the weight is cast as autocast cast it
        dx = torch.nn.grad.conv2d_input(ctx.shape, weight.to(grad.dtype), grad, c.stride, c.padding, c.dilation,
                                        c.groups)  # fmt: skip
        return dx, None, None


class GroupNormSiLU(torch.autograd.Function):
    """silu(group_norm(x)), keeping x and the norm's statistics (as the norm alone does), not the normalised map."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float) -> Tensor:
        n, c = x.shape[:2]
        y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, x[0, 0].numel(), groups, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.groups, ctx.eps = groups, eps
        return F.silu(y)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        n, c, hw = x.shape[0], x.shape[1], x[0, 0].numel()
        y = torch.native_group_norm(x, weight, bias, n, c, hw, ctx.groups, ctx.eps)[0]
        dy = torch.ops.aten.silu_backward(grad, y)
        dx, dw, db = torch.ops.aten.native_group_norm_backward(
            dy, x, mean, rstd, weight, n, c, hw, ctx.groups, list(ctx.needs_input_grad[:3])
        )
        return dx, dw, db, None, None


def recording(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class LeanGEGLU(GEGLU):
    def forward(self, x: Tensor) -> Tensor:
        p = self.proj(x)
        if recording(p):
            return GatedGELU.apply(p)
        h, gate = p.chunk(2, dim=-1)
        return h * F.gelu(gate)


class LeanConv2d(nn.Conv2d):
    def forward(self, x: Tensor) -> Tensor:
        frozen = not any(w is not None and w.requires_grad for w in (self.weight, self.bias))
        if frozen and self.padding_mode == "zeros" and recording(x):
            return FrozenWeightConv.apply(x, self.weight, self)
        return super().forward(x)


class LeanResnetBlock2D(ResnetBlock2D):
    def forward(self, x: Tensor, temb: Tensor) -> Tensor:  # the plain forward, its two norm-SiLUs fused
        h = self.conv1(self.norm_silu(self.norm1, x))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.norm_silu(self.norm2, h))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor

    def norm_silu(self, norm: nn.GroupNorm, x: Tensor) -> Tensor:
        """silu(norm(x)), through ``GroupNormSiLU`` where it computes the same: the norm untouched, no autocast."""
        plain = (type(norm) is not nn.GroupNorm or hooked(norm) or global_hooks()
                 or torch.is_autocast_enabled(x.device.type) or not recording(x, norm.weight))  # fmt: skip
        if plain:
            return F.silu(norm(x))
        return GroupNormSiLU.apply(x, norm.weight, norm.bias, norm.num_groups, norm.eps)


LEAN: dict[type, type] = {GEGLU: LeanGEGLU, nn.Conv2d: LeanConv2d, ResnetBlock2D: LeanResnetBlock2D}


def keep_less(model: nn.Module) -> int:
    """Swap in the lean classes (modules of exactly a plain class only: a replaced module stays); returns how
    many modules changed."""
    swapped = 0
    for m in model.modules():
        lean = LEAN.get(type(m))
        if lean is not None:
            m.__class__ = lean
            swapped += 1
    return swapped


def keep_all(model: nn.Module) -> None:
    """Undo ``keep_less``: every lean module back to its plain class."""
    plain = {lean: base for base, lean in LEAN.items()}
    for m in model.modules():
        if type(m) in plain:
            m.__class__ = plain[type(m)]
