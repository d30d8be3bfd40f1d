"""Fast by default on the machine at hand: what ``--dtype auto`` and the attention kernel pick, the first line
that says so, a CPU without a compiler, ``--prepare``, and bfloat16's distance from float32 beside diffusers'."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from audioldm2_core import AudioLDM2
from audioldm2_core.fast import native_bfloat16
from tests.helpers import CPU_KERNEL, rel_err
from tests.oracle import reference_pipeline

ROOT = Path(__file__).resolve().parents[1]
AUTO_BF16 = (
    "bfloat16 (auto: native bfloat16 on this CPU; --dtype float32 gives diffusers' float32 audio to rounding)"
)


def run(*args: str, **env_extra: str) -> subprocess.CompletedProcess:
    """``python -m audioldm2_core`` as a user runs it: no AUDIOLDM2_CPU_ATTENTION (conftest sets 0)."""
    env = {k: v for k, v in os.environ.items() if k != "AUDIOLDM2_CPU_ATTENTION"}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", **env_extra)
    return subprocess.run([sys.executable, "-m", "audioldm2_core", *args], capture_output=True, text=True, env=env,
                          timeout=600)  # fmt: skip


def generate(tiny_base, out: Path, **env) -> subprocess.CompletedProcess:
    return run(
        "a dog barks", "-o", str(out), "--model", str(tiny_base), "--steps", "2", "--length", "1.0", **env
    )


def test_no_flags_runs_the_fastest_honest_route_and_says_so(tiny_base, tmp_path):
    """bfloat16 where the CPU has native bfloat16 arithmetic, float32 elsewhere; the kernel where it is written
    for the CPU; the first line names both."""
    r = generate(tiny_base, tmp_path / "x.wav")
    assert r.returncode == 0, r.stderr
    first = r.stderr.splitlines()[0]
    dtype = AUTO_BF16 if native_bfloat16() else "float32"
    kernel = ", the C++ attention kernel" if CPU_KERNEL else ""
    assert first.startswith(f"audioldm2: cpu, {dtype}{kernel}, "), first
    assert "could not be built" not in r.stderr  # this machine has a compiler (the test below takes it away)
    assert (tmp_path / "x.wav").is_file()


def test_held_to_avx2_auto_stays_float32():
    """Under an AVX2 hold oneDNN has no bfloat16 arithmetic: ``--dtype auto`` keeps the float32 route."""
    code = "from audioldm2_core.frontend import resolve_device_and_dtype as r; print(r('cpu', 'auto')[1])"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == "float32", out.stderr


@pytest.mark.skipif(
    not CPU_KERNEL, reason="the kernel is not chosen by default on a CPU it is not written for"
)
def test_without_a_compiler_one_line_and_it_runs(tiny_base, tmp_path):
    """No compiler (and no build cached): one line says so, PyTorch's attention runs, the WAV is written."""
    r = generate(tiny_base, tmp_path / "x.wav", CXX=str(tmp_path / "no-such-compiler"),
                 XDG_CACHE_HOME=str(tmp_path / "cache"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    said = [line for line in r.stderr.splitlines() if "could not be built" in line]
    assert len(said) == 1 and said[0].endswith("PyTorch's attention runs"), r.stderr
    assert "Traceback" not in r.stderr and (tmp_path / "x.wav").is_file()


def test_prepare_then_a_generation_starts_without_timing_or_building(tiny_base, tmp_path):
    """On a new machine (an empty cache) the first run says what it does once; ``--prepare`` does it ahead."""
    cache = str(tmp_path / "cache")
    r = run("--prepare", "1.0", "--model", str(tiny_base), XDG_CACHE_HOME=cache)
    assert r.returncode == 0, r.stderr
    assert "timing this CPU's fastest routes, once" in r.stderr
    assert ("building the attention kernel, once" in r.stderr) == CPU_KERNEL
    assert "prepared 1.0 s" in r.stderr and "later runs start without timing or building" in r.stdout
    r = generate(tiny_base, tmp_path / "x.wav", XDG_CACHE_HOME=cache)
    assert r.returncode == 0, r.stderr
    assert "once" not in r.stderr, r.stderr


def test_prepare_checks_its_lengths(tiny_base):
    r = run("--prepare", "0", "--model", str(tiny_base))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "audio_length_in_s" in r.stderr, r.stderr


def _waves(make, seeds) -> list[torch.Tensor]:
    return [make(torch.Generator().manual_seed(seed)).float() for seed in seeds]


def test_bfloat16_is_as_close_to_float32_as_diffusers_bfloat16(tiny_base):
    """Our bfloat16 route (with the kernel where it is written for the CPU, as the command line runs it) differs
    from float32 by what bfloat16 rounding costs: no more than diffusers' own bfloat16 differs from its float32.
    Each route rounds in its own order, so one seed's distance varies by a few percent between equally good routes
    (4% on the tiny checkpoint here); the mean over four seeds is compared, within 10%."""
    from diffusers import DPMSolverMultistepScheduler

    kw = dict(num_inference_steps=10, audio_length_in_s=2.0, negative_prompt="noise", guidance_scale=3.5)
    prompt, seeds = "a dog barks in the rain", range(4)

    def ours(dtype, **options):
        pipe = AudioLDM2.from_pretrained(tiny_base, dtype=dtype, **options)
        return lambda g: (
            pipe(prompt, generator=g, sampler="dpmpp-2m", rerank=False, output_type="pt", **kw).audios
        )

    def theirs(dtype):
        pipe = copy.deepcopy(reference_pipeline(str(tiny_base))).to(dtype=dtype)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        return lambda g: pipe(prompt, generator=g, output_type="pt", **kw).audios

    with torch.no_grad():
        ours32, ours16 = (
            _waves(ours(torch.float32), seeds),
            _waves(ours(torch.bfloat16, cpu_attention=CPU_KERNEL), seeds),
        )
        theirs32, theirs16 = _waves(theirs(torch.float32), seeds), _waves(theirs(torch.bfloat16), seeds)
    assert max(rel_err(a, b) for a, b in zip(ours32, theirs32, strict=True)) <= 1e-4  # the same float32 audio
    our_distance = np.mean([rel_err(a, b) for a, b in zip(ours16, ours32, strict=True)])
    their_distance = np.mean([rel_err(a, b) for a, b in zip(theirs16, theirs32, strict=True)])
    assert 0 < our_distance <= 1.1 * their_distance, (our_distance, their_distance)
