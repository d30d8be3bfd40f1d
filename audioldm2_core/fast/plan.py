"""What ``optimize`` turned on for one model: a frozen ``Plan``, attached to every module it switched.

The fast modules read their model's plan on every call (``self.fast_plan``), so that two models in one process
take the routes each was optimized for; ``restore`` removes it with the classes. The plan also holds what a
model's routes derive from its weights and keep (oneDNN's packed copies), which goes with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

PLAN = "fast_plan"  # the attribute of a switched module (and of its fast class: ``OFF``) holding its plan


@dataclass(frozen=True)
class Plan:
    dtype: torch.dtype | None = None  # the model's (its first parameter's); other inputs take the plain route
    rewrites: frozenset[str] = frozenset()  # the rewrites on for this model
    per_shape: frozenset[str] = frozenset()  # of those, the ones decided per input shape (select="auto")
    # where per-shape decisions come from (``decide``; given, so that the modules need not import what probes them)
    decide: Callable[..., Any] | None = field(default=None, compare=False, repr=False)
    # packed-linear's weights: parameter -> {(offset, shape, stride): ((storage, version), packed)}, what
    # ``linears.packed_weight`` made of it or of its views; gone with the parameter, or with this plan
    packed: WeakIdKeyDictionary = field(init=False, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "packed", WeakIdKeyDictionary())

    def on(self, name: str, dtype: torch.dtype) -> bool:
        """Whether rewrite ``name`` is on for inputs of ``dtype``."""
        return dtype == self.dtype and name in self.rewrites

    def pays_for_shape(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> bool:
        """For a rewrite decided per input shape: whether it was faster for this shape here (timed on its first
        call and kept); for the others (``select="supported"`` or named) wherever it applies."""
        if name not in self.per_shape or dtype != self.dtype or torch.compiler.is_compiling():
            return True
        return self.decide(name, dtype, shape=shape).pays is True

    def __deepcopy__(self, memo) -> Plan:  # a copied model packs its own parameters
        return dataclasses.replace(self)

    def __reduce__(self):  # pickled without the packed weights (made again on first use)
        return Plan, (self.dtype, self.rewrites, self.per_shape, self.decide)


OFF = Plan()  # nothing on: what a fast class reads until ``optimize`` attaches its model's plan


def switch(model: nn.Module, swaps: dict[type, type], plan: Plan) -> None:
    """Switch every module of ``model`` whose class is a key of ``swaps`` to its fast twin, holding ``plan``."""
    for m in model.modules():
        fast = swaps.get(type(m))
        if fast is not None:
            m.__class__ = fast
            m.__dict__[PLAN] = plan


def probe_rows(H: int, row_bytes: int, budget: int = 32 << 20) -> int:
    """The map height a per-shape decision is timed at: H, or for long maps (the time axis of long audio) a
    multiple of 64 rows whose largest tensor stays within ``budget``. Both routes' cost per row is steady
    there, so one decision serves every longer length: no new probe (and no full-size probe tensors under a
    generation's peak) the first time a machine meets a longer length."""
    if H * row_bytes <= budget:
        return H
    return min(H, max(64, budget // row_bytes // 64 * 64))
