"""The benchmark scripts run end to end (on the tiny checkpoint, one or two steps), so that CI keeps them
working."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import CPU_KERNEL

BENCH = Path(__file__).parents[1] / "benchmarks" / "bench.py"
KERNEL = ["--cpu-attention"] if CPU_KERNEL else []


def _run(script: str, *args: str) -> str:
    """The stdout of ``benchmarks/<script>`` with ``args``, one thread, which must succeed."""
    cmd = [sys.executable, str(BENCH.parent / script), "--threads", "1", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def _decisions(out: str) -> dict[str, str]:
    """The listed fast.optimize decisions: rewrite -> "on" / "off"."""
    return dict(re.findall(r"^- ([a-z-]+): (on|off) \(.*\): .+$", out, re.M))


def _bench(tiny_base, tmp_path, *args: str) -> str:
    return _run(
        "bench.py", "--checkpoint", str(tiny_base), "--cache-dir", str(tmp_path), "--steps", "1",
        "--length", "0.64", "--repeats", "1", *args,
    )  # fmt: skip


def _bench_error(out: str) -> float:
    return float(re.search(r"rel\. L2 error, ours vs diffusers: (\S+)", out).group(1))


def test_bench_runs_end_to_end(tiny_base, tmp_path):
    out = _bench(tiny_base, tmp_path, *KERNEL)
    for row in ("load", "text encoders", "GPT-2", "denoising", "VAE", "vocoder", "generate (end to end)"):
        # the ratio is "-" where our time rounds to 0 (tiny models)
        assert re.search(rf"^\| {re.escape(row)} \| [\d.]+ s \| [\d.]+ s \| ([\d.]+x|-) \|$", out, re.M), row
    assert re.search(r"^\| peak RSS \| \d+ MB \| \d+ MB \| [\d.]+x \|$", out, re.M)
    assert re.search(r"^- generate per pair, diffusers / ours: [\d.]+x \(median [\d.]+x\)$", out, re.M)
    assert re.search(r"^- peak RSS per pair, ours / diffusers: [\d.]+x \(median [\d.]+x\)$", out, re.M)
    assert _bench_error(out) < 1e-5  # the same waveform as diffusers, to float32 rounding
    assert re.search(r"^CPU: .+ logical CPUs", out, re.M)
    assert _decisions(out)  # the speed layer's decisions for ours, one line per rewrite


def test_bench_plain_runs(tiny_base, tmp_path):
    """bench.py --plain: ours without the speed layer (fast=False), so no decisions to list."""
    out = _bench(tiny_base, tmp_path, "--plain")
    assert "plain model (ours, fast=False)" in out
    assert not _decisions(out)
    assert _bench_error(out) < 1e-5


def test_bench_first_run_times_the_decisions_in_the_run(tiny_base, tmp_path, monkeypatch):
    """bench.py --first-run: ours without kept decisions, in a cache folder of its own (this machine's built
    kernels linked in), so the run times the speed layer's rewrites and the kept decisions stay as they were."""
    cache = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    out = _bench(tiny_base, tmp_path, "--first-run")
    assert "first run on this machine (ours: no kept decisions)" in out
    assert _decisions(out)
    assert not list(cache.glob("audioldm2_core/fast-decisions-*.json"))  # the run kept its own elsewhere
    assert _bench_error(out) < 1e-5


def test_bench_baseline_runs_the_other_checkout(tiny_base, tmp_path):
    """bench.py --baseline: the baseline's runs import that checkout's audioldm2_core (a child that had
    imported this one first ran it twice: the comparison measured nothing)."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(BENCH.parents[1] / "audioldm2_core", other / "audioldm2_core")
    out = _bench(tiny_base, tmp_path, "--baseline", str(other))
    assert f"Speed layer of baseline ({other / 'audioldm2_core'};" in out
    assert f"Speed layer of ours ({BENCH.parents[1] / 'audioldm2_core'};" in out
    assert float(re.search(r"rel\. L2 error, ours vs baseline: (\S+)", out).group(1)) < 1e-5


def test_first_run_cache_links_the_built_kernels_only(tmp_path, monkeypatch):
    sys.path.insert(0, str(BENCH.parent))
    try:
        import bench
    finally:
        sys.path.remove(str(BENCH.parent))
    kept = tmp_path / "kept" / "audioldm2_core"
    (kept / "audioldm2_attention-avx2-0123").mkdir(parents=True)
    (kept / "audioldm2_attention-avx2-0123" / "kernel.so").write_text("built")
    (kept / "fast-decisions-0123.json").write_text("{}")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "kept"))
    (tmp_path / "fresh").mkdir()
    fresh = Path(bench._without_decisions(tmp_path / "fresh")) / "audioldm2_core"
    assert sorted(p.name for p in fresh.iterdir()) == ["audioldm2_attention-avx2-0123"]
    assert (fresh / "audioldm2_attention-avx2-0123" / "kernel.so").read_text() == "built"


def test_unet_ab_runs(tiny_base):
    """benchmarks/unet_ab.py: diffusers, a baseline checkout (this one), our plain and fast UNets and the fast
    one with the C++ attention kernel in one process, all on the full guidance batch."""
    out = _run(
        "unet_ab.py", "--checkpoint", str(tiny_base), "--rounds", "1", "--length", "0.64",
        "--baseline", str(BENCH.parents[1]), *KERNEL,
    )  # fmt: skip
    names = "diffusers|baseline|plain|fast|fast, cpu_attention"
    rows = dict(re.findall(rf"^\| ({names}) \| .* \| (\S+) \|$", out, re.M))
    expected = {"diffusers", "baseline", "plain", "fast"} | ({"fast, cpu_attention"} if CPU_KERNEL else set())
    assert set(rows) == expected
    assert all(float(err) < 1e-5 for err in rows.values())  # the same noise prediction, to float32 rounding
    assert re.search(r"^CPU: .+ logical CPUs", out, re.M)
    assert _decisions(out)  # which rewrites the fast variant (and the baseline) had


def test_pipeline_ab_runs(tiny_base):
    """benchmarks/pipeline_ab.py: whole generations of diffusers, our plain and fast pipelines (and the fast
    one with the kernel) in one process."""
    out = _run(
        "pipeline_ab.py", "--checkpoint", str(tiny_base), "--rounds", "2", "--steps", "2", "--length", "0.64",
        *KERNEL,
    )  # fmt: skip
    names = "diffusers|ours, plain|ours|ours, cpu_attention"
    rows = re.findall(
        rf"^\| ({names}) \| [\d.]+ s \| [\d.]+ s \| ([\d.]+)x \| ([\d., ]+) \| (\S+) \|$", out, re.M
    )
    expected = {"diffusers", "ours, plain", "ours"} | ({"ours, cpu_attention"} if CPU_KERNEL else set())
    assert {r[0] for r in rows} == expected
    assert all(len(r[2].split(", ")) == 2 for r in rows)  # one ratio per round
    assert all(float(r[3]) < 1e-5 for r in rows)  # the same waveform as diffusers, to float32 rounding
    assert _decisions(out)  # which rewrites "ours" had


def test_samplers_ab_counts_unet_calls(tiny_base, tmp_path):
    out = _run("samplers_ab.py", "--checkpoint", str(tiny_base), "--steps", "4", "--length", "0.64",
               "--samplers", "ddim,heun,pndm")  # fmt: skip
    calls = dict(
        re.findall(r"^\| ([a-z0-9-]+) \| (\d+) \| [\d.]+ \| [\d.]+ s \| [\d.]+ s \| [\d.]+ s \|$", out, re.M)
    )
    assert calls == {"ddim": "4", "heun": "7", "pndm": "13"}  # N, 2N - 1, N + 9


def test_gpt2_ab_runs(tiny_gigaspeech):
    """benchmarks/gpt2_ab.py: the speech checkpoints' GPT-2 generation, diffusers' loop against ours."""
    out = _run("gpt2_ab.py", "--checkpoint", str(tiny_gigaspeech), "--new-tokens", "12", "--rounds", "2")
    rows = dict(re.findall(r"^\| (diffusers|ours, plain|ours) \| .* \| (\S+) \|$", out, re.M))
    assert set(rows) == {"diffusers", "ours, plain", "ours"}
    assert all(float(err) < 1e-5 for err in rows.values())  # the same states, to float32 rounding
    assert "12 states for a guidance batch of 2 from 315 inputs" in out


def test_profile_ops_runs(tiny_base):
    """benchmarks/profile_ops.py: per operator class, each component's time adds up, with GFLOP/s for the
    GEMM and convolution classes against the measured peaks."""
    out = _run("profile_ops.py", "--checkpoint", str(tiny_base), "--calls", "1", "--length", "0.64", *KERNEL)
    assert re.search(r"^Measured float32 peaks .*GEMM, MKL \d+.*convolution, NCHW \d+", out, re.M)
    for component in ("UNet", "VAE decoder", "vocoder"):
        assert f"#### {component}: time per operator class, per call" in out
    rows = re.findall(
        r"^\| (GEMM|convolution|attention|norm|layout|elementwise) \| ([\d.]+) ms \|", out, re.M
    )
    assert len(rows) == 18 and sum(float(ms) for cls, ms in rows if cls == "convolution") > 0
    assert re.search(r"^\| convolution \| [\d.]+ ms \| \d+% \| \d+ \(\d+%\) \|", out, re.M)  # a rate
    assert _decisions(out)


def test_modes_runs(tiny_base):
    """benchmarks/modes.py: every mode offered here against float32, with the waveform error and CLAP change."""
    out = _run(
        "modes.py", "--checkpoint", str(tiny_base), "--prompts", "2", "--steps", "1", "--length", "0.64"
    )
    rows = dict(re.findall(r"^\| ([a-z0-9+]+) \| [\d.]+ s \| [\d.]+x \| (\S+) / \S+ \| ", out, re.M))
    assert rows["float32"] == "0.00e+00"
    if CPU_KERNEL:
        assert float(rows["float32+kernel"]) < 1e-5  # exact: float32 rounding
    for mode, err in rows.items():
        if mode.startswith("bfloat16"):
            assert 0 < float(err) < 0.5


def test_openvino_node_table():
    """openvino_ab.py --profile's table (OpenVINO itself is optional, never installed for the tests): the
    slowest (node type, kernel) pairs first, the rest summed into one row, shares of the total."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("openvino_ab", BENCH.parent / "openvino_ab.py")
    openvino_ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(openvino_ab)
    ms = {("FullyConnected", "gemm_mlas_f32"): 60.0, ("Convolution", "brgconv_avx2_f32"): 30.0}
    ms |= {("Add", "jit_avx2_f32"): 6.0, ("Reorder", "ref"): 4.0}
    lines = openvino_ab.node_table(ms, top=2)
    assert lines[2:] == [
        "| FullyConnected | gemm_mlas_f32 | 60.0 | 60% |",
        "| Convolution | brgconv_avx2_f32 | 30.0 | 30% |",
        "| other | 2 pairs | 10.0 | 10% |",
        "| total | | 100.0 | 100% |",
    ]


def test_train_ab_runs(tiny_base):
    """benchmarks/train_ab.py: one optimizer step of each variant (one round), the first step's loss equal to
    diffusers' with the same LoRA; ``--saved`` lists what a forward keeps for the backward (the lean modules'
    share by their names); ``--floor`` gives a step's FLOPs and their time at the GEMM peak."""
    out = _run(
        "train_ab.py", "--checkpoint", str(tiny_base), "--rounds", "1", "--length", "0.64", "--no-peaks"
    )
    for name in ("diffusers", "ours, plain modules", "ours", "ours, checkpointed"):
        row = re.search(rf"^\| {re.escape(name)} \| [\d.]+ s \|.* \| (\S+) \|$", out, re.M)
        assert row and float(row.group(1)) <= 1e-5, (name, out)
    saved = _run("train_ab.py", "--checkpoint", str(tiny_base), "--length", "0.64", "--saved", "ours")
    assert re.search(r"^ours: [\d.]+ GB kept for the backward$", saved, re.M)
    assert re.search(r"^- Attention: [\d.]+ GB$", saved, re.M)
    assert re.search(r"^- LeanGEGLU: [\d.]+ GB$", saved, re.M)
    floor = _run("train_ab.py", "--checkpoint", str(tiny_base), "--length", "0.64", "--floor", "ours")
    assert re.search(
        r"^ours: one step, \d+ GFLOP \(.*attention forward and backward: \d+\);.* floor [\d.]+ s$",
        floor,
        re.M,
    )
