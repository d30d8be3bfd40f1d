"""The opt-in C++ attention kernel (``audioldm2_core.fast.cpu_attention``) against PyTorch's attention."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from audioldm2_core import fast, unet
from audioldm2_core.fast import cpu_attention
from tests.helpers import rel_err


def _qkv(batch, heads, n, length, d, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "tokens":  # (B, N, H, d) memory seen as (B, H, N, d): how the UNet's projections come out
        q = torch.randn(batch, n, heads, d, generator=g).to(dtype).transpose(1, 2)
        k, v = (torch.randn(batch, length, heads, d, generator=g).to(dtype).transpose(1, 2) for _ in range(2))
    else:
        q = torch.randn(batch, heads, n, d, generator=g).to(dtype)
        k, v = (torch.randn(batch, heads, length, d, generator=g).to(dtype) for _ in range(2))
    return q, k, v


# Head widths 16-128; keys below, at and above a 32-key panel, not multiples of it; query counts that are
# not multiples of the query tile (8; AVX2 build: 6) or of a task's 256 (252); both memory layouts.
SHAPES = [
    (2, 8, 1024, 1024, 32, "tokens"),  # the UNet's first attention level
    (
        2,
        8,
        1024,
        1024,
        16,
        "tokens",
    ),  # (AVX2 build: 4 rows per pass of 6-row tiles once read past its scores)
    (1, 2, 17, 5, 16, "heads"),
    (2, 3, 37, 45, 128, "tokens"),
    (1, 8, 300, 299, 48, "heads"),
    (2, 1, 7, 33, 64, "tokens"),
    (1, 4, 129, 64, 80, "tokens"),
    (1, 2, 520, 129, 96, "heads"),
    (1, 2, 9, 31, 112, "tokens"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "bfloat16 widened"])
@pytest.mark.parametrize("batch,heads,n,length,d,layout", SHAPES)
def test_kernel_matches_reference(cpu_attention_on, batch, heads, n, length, d, layout, dtype):
    """bfloat16 takes AVX512-BF16 dot products where the CPU has them ("bfloat16 widened": float32 products
    of the widened inputs, the path of other CPUs)."""
    bf16_dot = dtype != "bfloat16 widened"
    dtype = torch.bfloat16 if isinstance(dtype, str) else dtype
    q, k, v = _qkv(batch, heads, n, length, d, dtype, layout)
    if d > cpu_attention._max_width:  # the AVX2 build: 8 vectors of 8 floats per head
        with pytest.raises(
            RuntimeError, match=f"head width must be a multiple of 8 up to 64 in this build, got {d}"
        ):
            torch.ops.audioldm2.attention(q, k, v, bf16_dot)
        assert cpu_attention.attention(q, k, v) is None  # the wrapper leaves it to PyTorch's kernel
        return
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double()).transpose(1, 2)
    torch_err = rel_err(F.scaled_dot_product_attention(q, k, v).transpose(1, 2), exact)
    got = torch.ops.audioldm2.attention(q, k, v, bf16_dot)
    assert got.shape == (batch, n, heads, d) and got.dtype == dtype and got.is_contiguous()
    err = rel_err(got, exact)
    # float32: within float32 rounding and no worse than PyTorch's own kernel (measured ~3e-7 both);
    # bfloat16: the output rounded once, the probabilities too with dot products, as PyTorch does: ~2.2e-3
    # both (widened: ~1.7e-3).
    assert err <= (1e-6 if dtype == torch.float32 else 4e-3), err
    assert err <= 1.25 * torch_err + 1e-8, (err, torch_err)


def test_large_scores_and_uniform_rows(cpu_attention_on):
    """Large logits (the softmax's max subtraction), and rows whose scores are all equal."""
    q, k, v = _qkv(1, 2, 40, 70, 32, torch.float32, "heads")
    q = q * 30.0  # scores up to ~1e3: exp would overflow without the max
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double()).transpose(1, 2)
    assert rel_err(torch.ops.audioldm2.attention(q, k, v), exact) <= 1e-6
    zeros = torch.zeros_like(q)  # every score 0: the output is the mean of the values
    got = torch.ops.audioldm2.attention(zeros, k, v)
    assert rel_err(got, v.mean(2, keepdim=True).expand_as(q).transpose(1, 2)) <= 1e-6


def test_wrapper_applies_only_where_it_should(cpu_attention_on, monkeypatch):
    q, k, v = _qkv(1, 2, 8, 600, 32, torch.float32, "tokens")
    out = cpu_attention.attention(q, k, v)
    assert out.shape == (1, 8, 64)  # (B, N, H * d), the layout of the output projection's input
    assert rel_err(out, F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)) <= 1e-6
    assert cpu_attention.min_keys(torch.float32) == cpu_attention.MIN_KEYS
    assert cpu_attention.attention(q, k[:, :, :60], v[:, :, :60]) is None  # < min_keys: PyTorch's kernel
    q24, k24, v24 = _qkv(1, 2, 8, 600, 24, torch.float32, "tokens")
    assert cpu_attention.attention(q24, k24, v24) is None  # head width not a multiple of 16
    assert cpu_attention.attention(q.double(), k.double(), v.double()) is None
    assert cpu_attention.attention(q, k.bfloat16(), v) is None
    assert cpu_attention.attention(q.requires_grad_(), k, v) is None  # autograd: no backward here
    with torch.no_grad():
        assert cpu_attention.attention(q, k, v) is not None
    monkeypatch.setattr(cpu_attention, "_built", False)  # a process without the kernel loaded
    assert cpu_attention.attention(q, k, v) is None


def test_kernel_rejects_bad_input(cpu_attention_on):
    q, k, v = _qkv(1, 2, 8, 40, 32, torch.float32, "heads")
    with pytest.raises(RuntimeError, match="multiple of (16|8)"):  # the AVX-512 build's vectors, or AVX2's
        torch.ops.audioldm2.attention(q[..., :20], k[..., :20], v[..., :20])
    with pytest.raises(RuntimeError, match="shapes do not match"):
        torch.ops.audioldm2.attention(q, k, v[:, :, :10])
    with pytest.raises(RuntimeError, match="float32 or all bfloat16"):
        torch.ops.audioldm2.attention(q, k.double(), v)
    with pytest.raises(RuntimeError, match="last dimension"):
        torch.ops.audioldm2.attention(torch.randn(1, 2, 8, 64)[..., ::2], k, v)  # width 32, stride 2


def test_environment_variable(monkeypatch):
    """A model that leaves the choice (``cpu_attention=None``) takes the environment variable's; one that
    makes it is not overruled."""
    monkeypatch.setenv("AUDIOLDM2_CPU_ATTENTION", "0")
    assert not cpu_attention.chosen(None) and cpu_attention.chosen(True)
    monkeypatch.setenv("AUDIOLDM2_CPU_ATTENTION", "1")
    assert cpu_attention.chosen(None) and not cpu_attention.chosen(False)
    monkeypatch.setenv("AUDIOLDM2_CPU_ATTENTION", "fast")
    with pytest.raises(ValueError, match="expected 1 or 0"):
        cpu_attention.chosen(None)
    with pytest.raises(ValueError, match="expected 1 or 0"):
        fast.optimize(unet.Attention(32, 32, 2, 16))
    monkeypatch.delenv("AUDIOLDM2_CPU_ATTENTION")
    assert not cpu_attention.chosen(None)


def test_build_failure_is_a_clear_error(tmp_path, monkeypatch):
    bad = tmp_path / "attention.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the real build stays untouched
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")  # compiled, not run
    monkeypatch.setattr(cpu_attention, "SOURCE", bad)
    monkeypatch.setattr(cpu_attention, "NAME", "audioldm2_attention_broken_test")
    monkeypatch.setattr(cpu_attention, "_built", False)
    attn = unet.Attention(32, 32, 2, 16)
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    with pytest.raises(RuntimeError, match=r"could not be built: it needs a C\+\+ compiler"):
        fast.optimize(attn, cpu_attention=True)
    assert logger.level == level  # quiet during the build only
    assert not cpu_attention._built  # not half-loaded, and the model asking for it is left plain
    assert type(attn) is unet.Attention and "fast_plan" not in attn.__dict__
    assert not list((tmp_path / "cache").rglob("*.so"))  # no library, and the build folder is gone
    assert not list((tmp_path / "cache").rglob("build-*"))


def test_build_is_cached_and_renamed_into_place(cpu_attention_on):
    """The library sits in a folder keyed by source, flags and versions; no per-process build folder stays."""
    folder = cpu_attention.build_directory()
    assert folder.parent.name == "audioldm2_core" and list(folder.glob("*.so"))
    assert not list(folder.glob("build-*"))


def test_refused_without_avx2(monkeypatch):
    """CPUs without AVX2 (older x86, ARM: PyTorch reports DEFAULT) get a clear error, not a slow path."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    monkeypatch.setattr(cpu_attention, "_built", False)
    with pytest.raises(RuntimeError, match=r"needs AVX-512 or AVX2 \(PyTorch reports DEFAULT for this CPU\)"):
        cpu_attention.build()
    assert not cpu_attention._built


def test_avx2_build(tmp_path):
    """The AVX2 build (8-float vectors, register blocks for 16 registers), on any CPU with AVX2: this file's
    checks in a process whose PyTorch kernels are held to AVX2 (as on a Zen 3), so that it builds and loads
    that library (one process holds one build: both register the same operator). The AVX2 timings:
    benchmarks/RESULTS.md."""
    if cpu_attention.isa() not in ("AVX2", "AVX512"):  # no AVX2: the refusal (test_refused_without_avx2)
        assert not cpu_attention.supported()
        return
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2")
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
         "-k", "matches_reference or large_scores or wrapper or isa"],
        env=env, capture_output=True, text=True, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-500:]


def test_isa_is_pytorchs(cpu_attention_on):
    """The library in use is the one built for the ISA PyTorch's kernels use."""
    assert cpu_attention.isa() in ("AVX512", "AVX2")
    assert cpu_attention.build_directory().name.startswith(
        f"audioldm2_attention-{cpu_attention.isa().lower()}-"
    )
