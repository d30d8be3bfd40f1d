"""A C++ kernel for the UNet's widest self-attention on the CPU, built once per machine on first use.

The first attention level of the UNet (1024 tokens for 10.24 s of audio, head width 32, batch 2 x 8 heads)
runs 20 self-attentions per call (4 per layer: ``attn1`` of each transformer and ``attn2`` of the one without a
condition), a large share of a UNet call on the CPU. ``csrc/attention.cpp`` computes the same exact softmax
attention as PyTorch's CPU flash kernel (a two-pass softmax over whole rows of scores held in L1,
register-blocked products; in bfloat16 the products by AVX512-BF16 dot products where the CPU has them), faster
on AVX-512 CPUs and with relative errors no larger than PyTorch's (see the file's header; timings in
``benchmarks/RESULTS.md``). The speed layer routes a model's self-attentions here where that model chose it
(``fast.optimize(model, cpu_attention=True)``; ``unet_rewrites.FastAttention``) and it is faster per shape.

It is C++, compiled with ``torch.utils.cpp_extension`` on first use (~15 s; the library is kept under
``~/.cache/audioldm2_core/`` (``$XDG_CACHE_HOME``) and later processes load it in ~1 ms), so it needs a C++
compiler and ninja, and it is built for the CPU's vector ISA, AVX-512 or AVX2 (other CPUs are refused with a
clear error). Hence off by default in the Python API, per model: ``optimize(model, cpu_attention=True)``,
``AudioLDM2.from_pretrained(..., cpu_attention=True)``, or where a model leaves the choice
(``cpu_attention=None``) the environment variable ``AUDIOLDM2_CPU_ATTENTION=1``. The command line, dataset
synthesis and the demo turn it on where the CPU takes it (``--no-cpu-attention`` or ``AUDIOLDM2_CPU_ATTENTION=0``
off; where it cannot be built they say so in one line and PyTorch's kernel runs). Where it does not
apply (CUDA, autograd, masks, fewer keys than ``min_keys``, head widths that are not a multiple of 16 up to 128
(AVX2: 64)), PyTorch's ``scaled_dot_product_attention`` runs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
from pathlib import Path

import torch
from torch import Tensor

from ..errors import UnavailableError, UsageError
from ..request import CPU_ATTENTION_ENV

__all__ = ["applies", "attention", "build", "chosen", "min_keys", "supported"]

# the front ends cut an error's message here
WITHOUT = f" (without it, cpu_attention=False or {CPU_ATTENTION_ENV}=0: PyTorch's attention runs)"
NAME = "audioldm2_attention"
SOURCE = Path(__file__).with_name("csrc") / "attention.cpp"
# Below this many keys PyTorch's kernel is as fast or faster. float32 (with the output's copy to (B, N, H * d)
# that PyTorch's kernel needs): 256 keys, head width 48: 1.35 against 1.55 ms; 128 keys: 0.40 against 0.49 ms;
# 64 keys, head width 80: 0.25 against 0.23 ms. bfloat16 with AVX512-BF16: 256 keys 1.0 against 1.8 ms, 64
# keys 0.20 against 0.32 ms; widened to float32 (other CPUs), 256 keys 1.9 against 1.6 ms, 1024: 13.3 against 17.5.
MIN_KEYS = 128
MIN_KEYS_BF16_DOT = 64
MIN_KEYS_BF16_WIDENED = 512
# One build per vector ISA PyTorch reports, each with the vector width and register blocks of that ISA (see
# the kernel's header: the AVX-512 blocks compiled for AVX2 spilled and ran 30x slower than PyTorch's kernel).
# Explicit flags, not -march=native: the build folder, named after them, may be shared by machines with
# different CPUs. Other CPUs (ARM, older x86) are refused: PyTorch's kernel runs there.
_CFLAGS = {
    "AVX512": ["-O3", "-fopenmp", "-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma"],
    "AVX2": ["-O3", "-fopenmp", "-mavx2", "-mfma"],
}
_MAX_WIDTH = {"AVX512": 128, "AVX2": 64}  # 8 vectors per head: 8 x 16 floats, 8 x 8 floats
_max_width = 0  # the loaded build's (set by build: a plain int, which torch.compile's tracing can read)
_built = False  # whether this process has the kernel loaded
_bf16_dot = False  # whether the built kernel takes bfloat16 through AVX512-BF16 dot products (asked once)


def chosen(choice: bool | None = None) -> bool:
    """A model's choice of the kernel: ``choice``, or where it is None the environment variable
    ``AUDIOLDM2_CPU_ATTENTION`` (1 on; 0 or unset off)."""
    if choice is not None:
        return bool(choice)
    value = os.environ.get(CPU_ATTENTION_ENV, "").strip().lower()
    if value not in ("", "0", "1", "false", "true", "no", "yes", "off", "on"):
        raise UsageError(f"{CPU_ATTENTION_ENV}={value!r}: expected 1 or 0")
    return value in ("1", "true", "yes", "on")


def isa() -> str:
    """The vector ISA PyTorch's own kernels use on this CPU (``AVX512``, ``AVX2``, ``DEFAULT``, ...):
    the kernel is built for the same."""
    return torch.backends.cpu.get_cpu_capability()


def supported() -> bool:
    """Whether this CPU is one the kernel is written for (AVX-512 or AVX2, as PyTorch reports it)."""
    return isa() in _CFLAGS


def build_directory() -> Path:
    """Where the kernel is built: a folder per source, ISA, flags, torch and Python version, so that a cached
    build is loaded directly (~1 ms) and never a stale or foreign one."""
    parts = [SOURCE.read_text(), *_CFLAGS[isa()], torch.__version__, platform.python_version()]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    return cache_root() / f"{NAME}-{isa().lower()}-{key}"


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/audioldm2_core`` (``~/.cache/audioldm2_core``): the built kernel, the speed layer's
    decisions."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "audioldm2_core"


def library() -> Path:
    """The built kernel's file (it exists once a build on this machine succeeded)."""
    folder = build_directory()
    return folder / f"{folder.name.replace('-', '_')}.so"


def build() -> None:
    """Load the kernel into this process, building it first where no cached build exists (~15 s); a CPU it
    is not written for, or a failed build, raises an ``UnavailableError`` that says what is missing."""
    global _built, _bf16_dot, _max_width
    if _built:
        return
    if not supported():
        raise UnavailableError(
            f"the CPU attention kernel needs AVX-512 or AVX2 (PyTorch reports {isa()} for this CPU){WITHOUT}"
        )
    folder, built = build_directory(), library()
    work = folder / f"build-{os.getpid()}"  # each process builds in its own folder, then renames
    try:
        if built.is_file():
            torch.ops.load_library(str(built))
        else:
            from torch.utils.cpp_extension import load  # slow to import; only for a build

            work.mkdir(parents=True, exist_ok=True)
            # its warnings (a compiler it does not know) would precede the one error line a failure gives
            logger = logging.getLogger("torch.utils.cpp_extension")
            level = logger.level
            logger.setLevel(logging.ERROR)
            try:
                load(name=built.stem, sources=[str(SOURCE)], extra_cflags=_CFLAGS[isa()],
                     build_directory=str(work), is_python_module=False, verbose=False)  # fmt: skip
            finally:
                logger.setLevel(level)
            os.replace(work / built.name, built)  # atomic: a whole library or none, for every process
    except Exception as e:  # compiler, ninja or headers missing: say what and how to do without
        raise UnavailableError(
            f"the CPU attention kernel could not be built: it needs a C++ compiler and ninja{WITHOUT}. "
            f"{SOURCE}: {type(e).__name__}: {e}"
        ) from e
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _bf16_dot = bool(torch.ops.audioldm2.has_bf16_dot())
    _max_width = _MAX_WIDTH[isa()]
    # The output's shape for torch.compile's tracing (which runs no kernels): then a compiled UNet calls the
    # kernel as one opaque op of its graph.
    torch.library.register_fake("audioldm2::attention")(_attention_shape)
    _built = True


def _attention_shape(q: Tensor, k: Tensor, v: Tensor, bf16_dot: bool = True) -> Tensor:
    B, H, N, d = q.shape
    return q.new_empty(B, N, H, d)


def min_keys(dtype: torch.dtype) -> int:
    """The fewest keys for which the kernel is used (it is faster from there on)."""
    if dtype == torch.bfloat16:
        return MIN_KEYS_BF16_DOT if _bf16_dot else MIN_KEYS_BF16_WIDENED
    return MIN_KEYS


def applies(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether the kernel is loaded and takes these inputs: q (B, H, N, d), k and v (B, H, L, d) on the CPU, float32
    or bfloat16 alike, at least ``min_keys`` keys, a head width that is a multiple of 16 up to the build's, unit
    stride along it, no gradient to record."""
    if not _built:
        return False
    d = q.shape[-1]
    return not (
        q.device.type != "cpu"
        or q.dtype not in (torch.float32, torch.bfloat16)
        or not (q.dtype == k.dtype == v.dtype)
        or k.shape[2] < min_keys(q.dtype)
        or d % 16
        or d > _max_width
        or q.stride(-1) != 1
        or k.stride(-1) != 1
        or v.stride(-1) != 1
        or (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))  # it has no backward
    )


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor | None:
    """softmax(q k^T / sqrt(d)) v for q (B, H, N, d), k and v (B, H, L, d), as (B, N, H * d); ``None`` where
    the kernel is not loaded or does not apply (``applies``: the caller then runs PyTorch's attention)."""
    if not applies(q, k, v):
        return None
    return torch.ops.audioldm2.attention(q, k, v).flatten(2)
