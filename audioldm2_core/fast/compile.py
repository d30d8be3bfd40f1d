"""torch.compile and CUDA graphs for the denoiser, applied from outside as gpt-fast compiles its decode step.

``compiled(unet, options, device)`` wraps the UNet in ``torch.compile`` (the fast modules trace: their routes
stand aside while compiling, and the C++ attention kernel is one opaque op of the graph); ``CudaGraphDenoiser``
records a guided UNet call in a CUDA graph and replays it for the other steps of a loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..errors import UsageTypeError


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
    """``torch.compile``'s options for the pipeline's ``compile=``: a dict as given, ``True`` the defaults
    (``{}``), ``False`` none (``None``)."""
    if isinstance(compile, dict):
        return dict(compile)
    if not isinstance(compile, bool):
        raise UsageTypeError(f"compile must be a bool or a dict of torch.compile options, not {compile!r}")
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
