"""Which components are in memory, and giving memory back: the pipeline's memory policy, kept out of its stages.

``Residency`` loads each component on first use and, with ``low_memory``, drops it at the end of the stage
that used it (text encoders, then the UNet, then the VAE and the vocoder), which bounds peak memory by the
largest stage instead of the sum. ``Component`` is the descriptor that shows a residency's components as
attributes under diffusers' names (``pipe.unet``); assigning one replaces it for good (never released, never
reloaded).

The heap hand-back (glibc only). Weights read in the file's dtype are memory maps and go back when unmapped;
tensors made by a cast and activations live on the C heap, and glibc keeps freed heap memory for reuse unless
asked to trim it. On the CPU the residency trims after every stage, and ``return_heap_before(modules)``
installs forward pre-hooks (removable handles) that trim before each of the given modules runs: for the
decoders, whose short-lived copies (channels-last weights, oneDNN's reorders) between long-lived activations
leave glibc holding memory under the generation's peak. A trim is skipped where it cannot lower the peak
(``return_pays``). Elsewhere (macOS, musl, Windows) nothing is done.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

__all__ = ["Component", "Residency", "return_freed_memory", "return_heap_before", "heap_state", "return_pays"]


def libc() -> ctypes.CDLL | None:
    """This process's C library (its global symbols: POSIX's ``dlopen(NULL)``), or None where there is none
    to open by no name: on Windows ``ctypes.CDLL(None)`` raises ``TypeError``."""
    try:
        return ctypes.CDLL(None)
    except (OSError, TypeError):
        return None


class MallInfo2(ctypes.Structure):  # glibc >= 2.33's struct mallinfo2, fields in its order
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")
    ]  # fmt: skip


def heap_state() -> tuple[int, int, int] | None:
    """(RSS, the process's peak RSS so far, the heap glibc holds free), bytes; None where unknown (not Linux
    with glibc >= 2.33)."""
    c = libc()
    if c is None:
        return None
    try:
        c.mallinfo2.restype = MallInfo2
        free = c.mallinfo2().fordblks
        with open("/proc/self/status") as f:
            status = dict(line.split(":", 1) for line in f)
        rss, peak = (int(status[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM"))
    except (OSError, AttributeError, KeyError, ValueError):
        return None
    return rss, peak, free


def return_pays(rss: int, peak: int, free: int) -> bool:
    """Whether handing the free heap back can lower the process's peak RSS: the part of the free heap a later
    allocation cannot reuse sits under a later peak, at most ``rss + free``; below the peak so far a trim would
    only cost the page faults of memory taken back."""
    return rss + free >= peak


def return_freed_memory() -> None:
    """Hand the heap freed so far back to the system, where that can lower the peak (``return_pays``)."""
    state = heap_state()
    if state is not None and not return_pays(*state):
        return
    c = libc()
    if c is not None:
        with contextlib.suppress(AttributeError):  # not glibc's
            c.malloc_trim(0)


def return_heap_before(modules: Iterable[torch.nn.Module]) -> list[RemovableHandle]:
    """Forward pre-hooks that hand the freed heap back before each of ``modules`` runs; remove them with the
    handles' ``remove()``."""
    return [m.register_forward_pre_hook(lambda *_: return_freed_memory()) for m in modules]


class Residency:
    """The components of one pipeline: ``loaders[name]()`` builds one, ``get`` loads it on first use, ``release``
    ends a stage. ``on_load(name, module)`` runs on each loaded component (the speed layer, compilation, the
    heap hooks) and returns what to keep."""

    def __init__(
        self,
        loaders: dict[str, Callable[[], Any]],
        low_memory: bool = False,
        cpu: bool = True,
        on_load: Callable[[str, Any], Any] | None = None,
    ):
        self.loaders, self.low_memory, self.cpu = loaders, low_memory, cpu
        self.on_load = on_load or (lambda name, module: module)
        self.modules: dict[str, Any] = {}
        self.replaced: set[str] = set()  # components a user assigned: never released, never reloaded

    def get(self, name: str) -> Any:
        if name not in self.modules:
            # Loaded outside inference mode even when a stage asks for it inside: the weights are then normal
            # tensors, which a user may train, and whose version counters the speed layer's caches read.
            with torch.inference_mode(False):
                self.modules[name] = self.on_load(name, self.loaders[name]())
        return self.modules[name]

    def replace(self, name: str, module: Any) -> None:
        self.modules[name] = module
        self.replaced.add(name)

    def release(self, *names: str) -> None:
        """The end of a stage: with ``low_memory`` its components are dropped; on the CPU, either way, the heap
        the stage freed (its activations) goes back to the system."""
        if self.low_memory:
            for name in names:
                if name not in self.replaced:
                    self.modules.pop(name, None)
        if self.low_memory or self.cpu:
            return_freed_memory()

    @contextlib.contextmanager
    def stage(self, *names: str):
        """``with residency.stage("unet"):`` releases the stage's components on leaving, as ``release``."""
        try:
            yield
        finally:
            self.release(*names)


class Component:
    """A pipeline attribute holding one component under diffusers' name: read through the owner's
    ``residency`` (loaded on first read, again after a stage released it); assigning one replaces it."""

    def __set_name__(self, owner: type, name: str):
        self.name = name

    def __get__(self, pipe: Any, owner: type | None = None):
        return self if pipe is None else pipe.residency.get(self.name)

    def __set__(self, pipe: Any, module: Any) -> None:
        pipe.residency.replace(self.name, module)
