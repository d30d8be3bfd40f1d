"""The checks a rewrite makes on every call before it takes its route, and the mark of a fast module.

A rewrite that reads a submodule's weights instead of calling it runs only while that submodule is untouched
(its own class, no hooks, no global hooks); one without a backward runs only where no gradient is recorded.
``twin`` marks a fast module's class: it reads its model's plan (``plan.Plan``) from ``fast_plan``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from .plan import OFF, PLAN

# The classes a rewrite may read through: the plain classes the rewrites swap and their fast twins (``twin``
# adds both as each rewrite module defines its classes; nothing changes it later). A tuple, not a set: torch
# 2.6's tracer (torch.compile) cannot test a class's membership of a set.
KNOWN: tuple[type, ...] = ()


def twin(cls: type) -> type:
    """Class decorator of a fast module, a subclass of the plain one: it and its plain class become ``KNOWN``,
    and until ``optimize`` attaches its model's plan it reads ``OFF`` (every route plain)."""
    global KNOWN
    KNOWN = tuple(dict.fromkeys((*KNOWN, cls, cls.__bases__[0])))
    setattr(cls, PLAN, OFF)
    return cls


def hooked(m: nn.Module) -> bool:
    """Whether ``m`` has hooks of its own."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def global_hooks() -> bool:
    """Whether hooks for every module are registered (``register_module_forward_hook`` ...)."""
    return bool(
        torch_module._global_forward_hooks
        or torch_module._global_forward_pre_hooks
        or torch_module._global_backward_hooks
        or torch_module._global_backward_pre_hooks
    )


def untouched(*modules: nn.Module) -> bool:
    """Whether a rewrite may read these submodules' weights instead of calling them: each is still of the
    class it was built as (plain or its fast twin), with no hooks of its own and no global ones."""
    return not global_hooks() and all(type(m) in KNOWN and not hooked(m) for m in modules)


def no_grad(*tensors: Tensor | None) -> bool:
    """Whether no autograd graph would be recorded through these tensors."""
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def channels_last(x: Tensor) -> bool:
    """Whether a 4-D tensor is stored (B, H, W, C) (and not also NCHW-contiguous, as 1x1 maps are)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
