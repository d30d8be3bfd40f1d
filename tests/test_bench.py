"""The benchmark script runs end to end (on the tiny checkpoint, one step), so that CI keeps it working."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import AVX512

BENCH = Path(__file__).parents[1] / "benchmarks" / "bench.py"


def test_bench_runs_end_to_end(tiny_base, tmp_path):
    cmd = [sys.executable, str(BENCH), "--checkpoint", str(tiny_base), "--cache-dir", str(tmp_path)]
    cmd += ["--steps", "1", "--length", "0.64", "--repeats", "1", "--threads", "1"]
    cmd += ["--cpu-attention"] if AVX512 else []
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    for row in ("load", "text encoders", "GPT-2", "denoising", "VAE", "vocoder", "generate (end to end)"):
        # the ratio is "-" where our time rounds to 0 (tiny models)
        assert re.search(rf"^\| {re.escape(row)} \| [\d.]+ s \| [\d.]+ s \| ([\d.]+x|-) \|$", out, re.M), row
    assert re.search(r"^\| peak RSS \| \d+ MB \| \d+ MB \| [\d.]+x \|$", out, re.M)
    assert re.search(r"^- generate per pair, diffusers / ours: [\d.]+x \(median [\d.]+x\)$", out, re.M)
    assert re.search(r"^- peak RSS per pair, ours / diffusers: [\d.]+x \(median [\d.]+x\)$", out, re.M)
    err = float(re.search(r"rel\. L2 error, ours vs diffusers: (\S+)", out).group(1))
    assert err < 1e-5  # the same waveform as diffusers, to float32 rounding


def test_unet_ab_runs(tiny_base):
    """benchmarks/unet_ab.py: diffusers, a baseline checkout (this one), ours and ours with the C++ attention
    kernel in one process."""
    script = BENCH.parent / "unet_ab.py"
    cmd = [sys.executable, str(script), "--checkpoint", str(tiny_base), "--rounds", "1", "--length", "0.64"]
    cmd += ["--threads", "1", "--baseline", str(BENCH.parents[1]), "--baseline-shared"]
    cmd += ["--cpu-attention"] if AVX512 else []
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    names = "diffusers|baseline|ours|ours, cpu_attention"
    rows = dict(re.findall(rf"^\| ({names}) \| .* \| (\S+) \|$", proc.stdout, re.M))
    assert set(rows) == {"diffusers", "baseline", "ours"} | ({"ours, cpu_attention"} if AVX512 else set())
    assert all(float(err) < 1e-5 for err in rows.values())  # the same noise prediction, to float32 rounding


def test_pipeline_ab_runs(tiny_base):
    """benchmarks/pipeline_ab.py: whole generations of diffusers and ours (and with the kernel) in one process."""
    script = BENCH.parent / "pipeline_ab.py"
    cmd = [sys.executable, str(script), "--checkpoint", str(tiny_base), "--rounds", "2", "--steps", "2"]
    cmd += ["--length", "0.64", "--threads", "1"] + (["--cpu-attention"] if AVX512 else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    names = "diffusers|ours|ours, cpu_attention"
    rows = re.findall(
        rf"^\| ({names}) \| [\d.]+ s \| [\d.]+ s \| ([\d.]+)x \| ([\d., ]+) \| (\S+) \|$", proc.stdout, re.M
    )
    assert {r[0] for r in rows} == {"diffusers", "ours"} | ({"ours, cpu_attention"} if AVX512 else set())
    assert all(len(r[2].split(", ")) == 2 for r in rows)  # one ratio per round
    assert all(float(r[3]) < 1e-5 for r in rows)  # the same waveform as diffusers, to float32 rounding
