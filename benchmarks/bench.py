"""Benchmark audioldm2_core against diffusers' AudioLDM2Pipeline on identical full-size weights.

    python benchmarks/bench.py                       # the issue's workload: 10.24 s, 20 DPM-Solver++ steps
    python benchmarks/bench.py --dtype bfloat16      # bf16 on both sides; error against our float32 result
    python benchmarks/bench.py --low-memory          # ours loads each component for its stage only
    python benchmarks/bench.py --plain               # ours without the speed layer (fast=False)
    python benchmarks/bench.py --tiny --steps 1      # a tiny random checkpoint, seconds (as tests/test_bench.py)
    python benchmarks/bench.py --baseline ../old     # ours against another checkout's audioldm2_core
    python benchmarks/bench.py --cpu-attention       # ours with the C++ attention kernel (fast/cpu_attention.py)
    python benchmarks/bench.py --first-run           # ours as on a new machine: timing its rewrites as it runs
    python benchmarks/bench.py --device cuda --dtype float16 --cuda-graphs   # on a GPU (issue 6's GPU path)

Weights: the real checkpoints cannot be downloaded here, so a random-weight checkpoint with the exact
``cvssp/audioldm2`` (or ``-large``) architecture is built once from the shipped hub configs, with the
reference stack's own ``save_pretrained``, and cached under ``benchmarks/.cache/``. Its tokenizers are the
small trained ones of ``weights_tools/tiny_tokenizers.py`` while the CLAP and T5 embedding tables keep the
real vocabulary sizes (50265 / 32128): a small tokenizer's ids are valid ids of the big tables, so every
matrix has its real shape and only the token sequences are a little different from the real tokenizers'.
The vocoder is re-drawn near unit gain (``weights_tools.make_tiny.unit_gain_vocoder``, gain 0.9), so
that the waveform, hence its error, depends on every stage. ``--checkpoint`` benchmarks any other pipeline folder instead (e.g. the real weights).

Method: every run is a fresh subprocess (clean peak RSS: ``ru_maxrss`` of that process), diffusers and ours
alternate, ``--repeats`` times each, and the table shows medians. Stage times come from timers wrapped
around the components' ``forward``/``decode`` methods at class level on both sides (diffusers' code itself
is not modified; a compiled UNet is timed around its call): text encoders = CLAP text + T5 + projection, GPT-2 = every language-model forward,
denoising = every UNet forward, VAE = ``decode``, vocoder = ``forward``. "generate" is the whole call;
"load" is ``from_pretrained`` (imports not included; they are shown on their own row).

Ours runs as ``AudioLDM2.from_pretrained`` loads it: through the speed layer (``audioldm2_core/fast/``),
whose rewrites are decided per CPU, so the report names the CPU and lists which rewrites were on;
``--plain`` benchmarks the plain reference model (``fast=False``) instead.

On a GPU (``--device cuda``): every timer synchronises the device before it reads the clock, "load" includes
the copy to the device, and the table adds the peak of allocated GPU memory. ``--compile`` compiles the UNet
on both sides; ``--cuda-graphs`` replays our denoising loop from a CUDA graph (diffusers has no such option;
its nearest is ``torch.compile(mode="reduce-overhead")``). float32 timings on a GPU keep PyTorch's defaults
(TF32 convolutions in cuDNN on both sides).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(__file__).resolve().parent / ".cache"
PROMPT = "Techno music with a strong, upbeat tempo and high melodic riffs"
NEGATIVE = "Low quality."
SEED = 0

# --------------------------------------------------------------------------------------- checkpoint


VERSION = "2"  # of the built checkpoint: bump to rebuild caches made by an older recipe


def build_checkpoint(out_dir: Path, large: bool = False, tiny: bool = False) -> Path:
    """The random-weight checkpoint (real sizes from the hub configs, or the tests' tiny one), built once."""
    out_dir = Path(out_dir)
    done = out_dir / "DONE"
    if done.is_file() and done.read_text().strip() == VERSION:
        return out_dir
    sys.path.insert(0, str(ROOT))
    import torch

    from weights_tools.make_tiny import (
        build_models,
        make_tiny,
        real_configs,
        unit_gain_vocoder,
        write_checkpoint,
    )
    from weights_tools.tiny_tokenizers import train_tokenizers

    if out_dir.exists():
        shutil.rmtree(out_dir)  # a half-written folder, or one from an older recipe
    print(f"building the random checkpoint in {out_dir} (once) ...", file=sys.stderr, flush=True)
    if tiny:
        make_tiny(out_dir, "large" if large else "base", seed=0)
    else:
        repo = "cvssp/audioldm2-large" if large else "cvssp/audioldm2"
        train_tokenizers(out_dir / "_tokenizers", seed=0)  # small vocabularies; the tables stay real-sized
        models = build_models(real_configs(repo), seed=0)
        rates = real_configs(repo)["vocoder"]["upsample_rates"]
        unit_gain_vocoder(models["vocoder"], rates, torch.Generator().manual_seed(1), gain=0.9)
        write_checkpoint(out_dir, models, repo_for_configs=repo)
    done.write_text(VERSION + "\n")
    return out_dir


def checkpoint_dir(args: argparse.Namespace) -> Path:
    name = ("tiny" if args.tiny else "audioldm2") + ("-large" if args.large else "") + "-random"
    return (Path(args.cache_dir) if args.cache_dir else CACHE) / name


def resolve_checkpoint(args: argparse.Namespace) -> Path:
    """``--checkpoint``, or the random checkpoint of ``--tiny`` / ``--large``, built on first use (also for
    ``unet_ab.py`` and ``pipeline_ab.py``, which take the same options)."""
    if args.checkpoint:
        return Path(args.checkpoint)
    return build_checkpoint(checkpoint_dir(args), args.large, args.tiny)


def weights_description(args: argparse.Namespace, ckpt: Path) -> str:
    """What a table's weights are: ``--checkpoint``'s folder, or which random checkpoint (also for
    ``pipeline_ab.py``)."""
    if args.checkpoint:
        return f"checkpoint {ckpt}"
    return f"{'large' if args.large else 'base'} {'tiny' if args.tiny else 'full-size'} random weights"


def check_device_options(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--cuda-graphs`` and float16 run on a CUDA device only (also for ``pipeline_ab.py``)."""
    if (args.cuda_graphs or args.dtype == "float16") and not args.device.startswith("cuda"):
        p.error("--cuda-graphs and float16 need --device cuda")


CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def cpu_description() -> str:
    """This CPU as a table should name it: model, family and model number, logical CPUs, and which of
    ``CPU_FLAGS`` (the vector extensions the speed layer's choices and the C++ attention kernel depend on) it
    has (also for ``unet_ab.py`` and ``pipeline_ab.py``)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:  # not Linux
        pass
    text = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info and "model" in info:
        text += f" (family {info['cpu family']}, model {info['model']})"
    text += f", {os.cpu_count()} logical CPUs"
    flags = set(info.get("flags", "").split())
    if flags:
        has = [f for f in CPU_FLAGS if f in flags]
        lacks = [f for f in CPU_FLAGS if f not in flags]
        text += f"; with {' '.join(has) or 'none of ' + ' '.join(CPU_FLAGS)}"
        text += f"; without {' '.join(lacks)}" if has and lacks else ""
    # What the kernels actually use: PyTorch's vector ISA, and oneDNN's where it is held below the CPU's (how
    # an AVX2-only CPU is emulated here: ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2).
    try:
        import torch

        text += f"; PyTorch kernels {torch.backends.cpu.get_cpu_capability()}"
    except ImportError:
        pass
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        text += f", oneDNN held to {os.environ['ONEDNN_MAX_CPU_ISA']} (ONEDNN_MAX_CPU_ISA)"
    return text


def unet_inputs(checkpoint, unet_cfg, length: float, t5_len: int, dtype, generator):
    """A UNet call's inputs as the pipelines build them under guidance (also for ``unet_ab.py`` and
    ``profile_ops.py``): the latent of ``length`` seconds ((frames, mel bins) / the VAE's scale), 8 GPT-2 states
    and ``t5_len`` T5 states for [negative, positive] with the negative prompt's mask shorter, drawn in that order
    from ``generator``. Returns (latent (1, C, f, b), gpt2 (2, 8, lm), t5 (2, t5_len, d), mask (2, t5_len),
    mel frames)."""
    import torch

    from audioldm2_core.config import vae_config, vocoder_config
    from audioldm2_core.pipeline import audio_shape

    lm, t5 = unet_cfg.cross_attention_dims[0][1], unet_cfg.cross_attention_dims[0][2]
    vocoder = vocoder_config(checkpoint.config("vocoder"))
    scale = vae_config(checkpoint.config("vae")).scale_factor
    factor = math.prod(vocoder.upsample_rates) / vocoder.sampling_rate
    frames, _ = audio_shape(length, factor, scale, vocoder.sampling_rate)
    latent = torch.randn(
        1, unet_cfg.in_channels, frames // scale, vocoder.model_in_dim // scale, generator=generator
    )
    gpt2 = torch.randn(2, 8, lm, generator=generator)
    t5_states = torch.randn(2, t5_len, t5, generator=generator)
    mask = torch.ones(2, t5_len, dtype=torch.long)
    mask[0, min(6, t5_len) :] = 0  # the negative prompt is the shorter one
    return latent.to(dtype), gpt2.to(dtype), t5_states.to(dtype), mask, frames


def rotate(names: list[str], generate, rounds: int) -> tuple[dict, dict]:
    """Whole generations in rotation in one process (``pipeline_ab.py``, ``openvino_ab.py``): one 1-step
    warm-up each (first-touch memory, kernel set-up, compilation, outside the timed rounds), then ``rounds``
    rounds calling each name once, who goes first alternating. ``generate(name, **overrides)`` returns the
    waveform. Returns ({name: seconds per round}, {name: the last round's waveform})."""
    for name in names:
        generate(name, num_inference_steps=1)
    times: dict[str, list[float]] = {name: [] for name in names}
    waves = {}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            waves[name] = generate(name)
            times[name].append(time.perf_counter() - start)
            print(f"[{r + 1}/{rounds}] {name}: {times[name][-1]:.2f} s", file=sys.stderr, flush=True)
    return times, waves


def rotation_table(
    times: dict, waves: dict, ref, error_header: str = "rel. error vs diffusers", places: int = 2
) -> list[str]:
    """``rotate``'s result as a markdown table: median, min (in seconds to ``places``), the median of the
    per-round ratios to "diffusers" and each of them, and each output's relative L2 error against ``ref``
    (waveforms, or a component's outputs as in ``unet_ab.py`` and ``gpt2_ab.py``: arrays or tensors)."""
    import numpy as np

    ref = np.asarray(ref, dtype=np.float64)
    lines = [
        f"| implementation | median | min | diffusers / it (median of rounds) | per round | {error_header} |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for name, ts in times.items():
        ratios = [d / t for d, t in zip(times["diffusers"], ts, strict=True)]
        err = float(np.linalg.norm(np.asarray(waves[name], dtype=np.float64) - ref) / np.linalg.norm(ref))
        lines.append(
            f"| {name} | {statistics.median(ts):.{places}f} s | {min(ts):.{places}f} s | "
            f"{statistics.median(ratios):.3f}x | {', '.join(f'{x:.2f}' for x in ratios)} | {err:.2e} |"
        )
    return lines


def same_weights(module):
    """A second module object holding the very tensors of ``module`` (no copy of a weight): a variant that the
    speed layer optimizes otherwise (``fast.optimize(copy, cpu_attention=True)``) while the first stays as it is."""
    import copy

    copied = copy.deepcopy(module, memo={id(t): t for t in (*module.parameters(), *module.buffers())})
    assert all(a is b for a, b in zip(module.parameters(), copied.parameters(), strict=True))
    return copied


def decision_lines(decisions: dict) -> list[str]:
    """``fast.optimize``'s decisions, one line per rewrite: on or off, why, and which of the keys it was
    decided for (keys with different decisions, e.g. timed in two checkouts, get a line each, side by side).
    ``decisions``: {component or variant: {rewrite: Decision}} (``AudioLDM2.fast_decisions``); only the
    fields of a Decision are read, so a baseline checkout's decisions are listed alike (also for
    ``unet_ab.py`` and ``pipeline_ab.py``)."""
    by_rewrite: dict[str, dict[tuple[str, str], list[str]]] = {}
    for key, rewrites in decisions.items():
        for name, d in rewrites.items():
            by_rewrite.setdefault(name, {}).setdefault(("on" if _on(d) else "off", d.reason), []).append(key)
    return [
        f"- {name}: {on} ({reason}): {', '.join(keys)}"
        for name, outcomes in by_rewrite.items()
        for (on, reason), keys in outcomes.items()
    ]


def rewrites_on(decisions: dict) -> list[str]:
    """The rewrites ``fast.optimize`` switched on for any of ``decisions``' keys (as ``decision_lines``)."""
    return sorted({name for rewrites in decisions.values() for name, d in rewrites.items() if _on(d)})


def _on(decision) -> bool:
    return decision.supported and decision.pays is not False  # as fast.optimize applies it


def run_spec(args: argparse.Namespace, ckpt: Path) -> dict:
    """The workload of a run, as the workers take it (also for ``pipeline_ab.py``)."""
    return dict(
        ckpt=str(ckpt),
        steps=args.steps,
        sampler=args.sampler,
        length=args.length,
        guidance=args.guidance,
        device=args.device,
        waveforms=getattr(args, "waveforms", 1),
    )


# ------------------------------------------------------------------------------------------ workers


class StageTimer:
    """Accumulates wall time per stage, from timers wrapped around the components' methods."""

    def __init__(self, sync=None) -> None:
        self.seconds: dict[str, float] = {}
        self.sync = sync or (lambda: None)  # torch.cuda.synchronize on a GPU: time the work, not its launch
        self._depth = 0  # a nested wrapped call (e.g. a T5 inside a timed CLAP) is counted once, by the outer

    def wrap(self, target: object, method: str, stage: str) -> None:
        """Time every call of ``target.method`` (a class, so that modules loaded later count too, or one object)."""
        original = getattr(target, method)
        timer = self

        def timed(*args, **kwargs):
            if timer._depth:
                return original(*args, **kwargs)
            timer._depth += 1
            timer.sync()
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                timer.sync()
                timer._depth -= 1
                timer.seconds[stage] = timer.seconds.get(stage, 0.0) + time.perf_counter() - start

        setattr(target, method, timed)


def _status_mb(keys: set[str]) -> dict[str, float]:
    """Fields of this process's ``/proc/self/status`` (VmRSS, RssAnon, RssFile, ...), MB."""
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) / 1024 for k, v in (line.split(":", 1) for line in f) if k in keys}


def _rss_mb() -> float:
    """Current resident set (VmRSS) of this process, MB."""
    return _status_mb({"VmRSS"}).get("VmRSS", float("nan"))


class PeakSampler:
    """What the peak RSS is made of: VmRSS sampled every 10 ms in a thread, keeping the sample with the largest,
    split into RssAnon (heap: activations, copies, torch itself) and RssFile (mapped weight files, pages the
    kernel may drop and read again without writing anything). ``ru_maxrss`` stays the headline peak: a sample
    can miss it by the growth of 10 ms."""

    def __init__(self):
        import threading

        self.peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            try:
                now = _status_mb(set(self.peak))
            except (OSError, ValueError):  # not Linux
                return
            if now.get("VmRSS", 0) > self.peak["VmRSS"]:
                self.peak = now
            time.sleep(0.01)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def _device(spec: dict):
    import torch

    return torch.device(spec.get("device", "cpu"))


def worker(spec: dict) -> dict:
    """One measured run in this (fresh) process; returns the measurements and saves the waveform."""
    import numpy as np

    start = time.perf_counter()
    sampler = PeakSampler()
    import torch

    torch.set_num_threads(spec["threads"])
    cuda = _device(spec).type == "cuda"
    timer = StageTimer(torch.cuda.synchronize if cuda else None)
    dtype = getattr(torch, spec["dtype"])
    if spec["impl"] == "diffusers":
        import diffusers  # noqa: F401
        import transformers  # noqa: F401

        import_s = time.perf_counter() - start
        pipe, call = _diffusers(spec, dtype, timer)
    else:
        root = Path(spec.get("root") or ROOT).resolve()  # --baseline: another checkout's audioldm2_core
        sys.path.insert(0, str(root))
        import audioldm2_core

        if Path(audioldm2_core.__file__).resolve().parents[1] != root:  # imported before the path was set
            raise RuntimeError(f"audioldm2_core came from {audioldm2_core.__file__}, not from {root}")
        import_s = time.perf_counter() - start
        pipe, call = _ours(spec, dtype, timer)
    load_s, rss_loaded = spec["_load_s"], _rss_mb()
    t0 = time.perf_counter()
    audio = call()  # a numpy array: the device has finished
    generate_s = time.perf_counter() - t0
    audio = np.asarray(audio, dtype=np.float32)
    np.save(spec["out"], audio)
    gpu = {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20} if cuda else {}
    # after the call: with --low-memory the components load (and are decided) per stage; a --baseline
    # checkout may predate the speed layer
    decisions = getattr(pipe, "fast_decisions", {})
    return gpu | {
        "impl": spec["impl"],
        "import_s": import_s,
        "load_s": load_s,
        "generate_s": generate_s,
        "stages": timer.seconds,
        "rss_loaded_mb": rss_loaded,
        "peak_rss_mb": _peak_rss_mb(),
        "peak_anon_mb": sampler.peak.get("RssAnon", 0.0),
        "peak_file_mb": sampler.peak.get("RssFile", 0.0),
        "samples": int(audio.shape[-1]),
        "fast": decision_lines(decisions),
        "fast_on": rewrites_on(decisions),
        "package": str(Path(sys.modules["audioldm2_core"].__file__).parent) if spec["impl"] == "ours" else "",
    }


def _call_kwargs(spec: dict, torch, **overrides) -> dict:
    """The generation's arguments for both pipelines; ``overrides`` replace some (e.g. a warm-up's steps)."""
    kwargs = dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=spec["steps"],
        guidance_scale=spec["guidance"],
        audio_length_in_s=spec["length"],
        num_waveforms_per_prompt=spec.get("waveforms", 1),
        generator=torch.Generator().manual_seed(SEED),
        output_type="np",
    )
    return kwargs | overrides


def _diffusers(spec: dict, dtype, timer: StageTimer):
    import torch
    from diffusers import AudioLDM2Pipeline
    from diffusers.models import AutoencoderKL
    from diffusers.pipelines.audioldm2.modeling_audioldm2 import (
        AudioLDM2ProjectionModel,
        AudioLDM2UNet2DConditionModel,
    )
    from transformers import ClapModel, GPT2LMHeadModel, SpeechT5HifiGan, T5EncoderModel

    t0 = time.perf_counter()
    # As weights_tools/reference.py: the hub's GPT2Model file loaded as GPT2LMHeadModel, which diffusers'
    # generate_language_model needs under transformers 5; dtype forced (CLAP's config says float64).
    lm = GPT2LMHeadModel.from_pretrained(spec["ckpt"], subfolder="language_model", dtype=dtype)
    pipe = AudioLDM2Pipeline.from_pretrained(spec["ckpt"], language_model=lm, dtype=dtype)
    device = _device(spec)
    if device.type != "cpu":
        pipe.to(device)
        torch.cuda.synchronize(device)
    spec["_load_s"] = time.perf_counter() - t0
    pipe.set_progress_bar_config(disable=True)
    sys.path.insert(0, str(ROOT))
    from weights_tools.reference import diffusers_scheduler  # the scheduler our sampler name stands for

    pipe.scheduler = diffusers_scheduler(spec["sampler"], pipe.scheduler.config)
    timer.wrap(ClapModel, "get_text_features", "text encoders")
    timer.wrap(T5EncoderModel, "forward", "text encoders")
    timer.wrap(AudioLDM2ProjectionModel, "forward", "text encoders")
    timer.wrap(GPT2LMHeadModel, "forward", "GPT-2")
    if spec["compile"]:  # time the compiled module's calls (a timer inside would break dynamo's graph)
        # as ours (fast.compiled): static shapes, and on the CPU Inductor's freezing (prepacked weights)
        cpu = device.type == "cpu"
        pipe.unet = torch.compile(pipe.unet, dynamic=False, options={"freezing": True} if cpu else None)
        timer.wrap(pipe.unet, "forward", "denoising")
    else:
        timer.wrap(AudioLDM2UNet2DConditionModel, "forward", "denoising")
    timer.wrap(AutoencoderKL, "decode", "VAE")
    timer.wrap(SpeechT5HifiGan, "forward", "vocoder")

    def call(**overrides):
        with torch.no_grad():
            return pipe(**_call_kwargs(spec, torch, **overrides)).audios

    return pipe, call


def _ours(spec: dict, dtype, timer: StageTimer):
    import torch

    from audioldm2_core import pipeline as P
    from audioldm2_core.clap_text import ClapTextEncoder
    from audioldm2_core.gpt2 import GPT2
    from audioldm2_core.projection import AudioLDM2Projection
    from audioldm2_core.t5 import T5Encoder
    from audioldm2_core.unet import AudioLDM2UNet
    from audioldm2_core.vae import AutoencoderKLDecoder
    from audioldm2_core.vocoder import SpeechT5HifiGan

    t0 = time.perf_counter()
    # Options only where they differ from the defaults: a --baseline checkout may predate them. (Loading the
    # built kernel for cpu_attention counts as load time, ~1 ms.)
    options = {
        k: spec[k] for k in ("compile", "cuda_graphs", "cpu_attention") if spec.get(k) not in (None, False)
    }
    options["device"] = spec.get("device", "cpu")  # the device is always named: None would pick a GPU
    if spec.get("fast", True) is False:  # --plain: without the speed layer
        options["fast"] = False
    pipe = P.AudioLDM2.from_pretrained(spec["ckpt"], dtype=dtype, low_memory=spec["low_memory"], **options)
    if _device(spec).type == "cuda":
        torch.cuda.synchronize()
    spec["_load_s"] = time.perf_counter() - t0
    timer.wrap(ClapTextEncoder, "forward", "text encoders")
    timer.wrap(T5Encoder, "forward", "text encoders")
    timer.wrap(AudioLDM2Projection, "forward", "text encoders")
    timer.wrap(GPT2, "forward", "GPT-2")
    if spec["compile"]:  # the pipeline's compiled UNet (resident), timed around its call
        timer.wrap(pipe.unet, "forward", "denoising")
    else:  # the speed layer's UNet subclass overrides forward: time both (a nested call counts once)
        for cls in (AudioLDM2UNet, *AudioLDM2UNet.__subclasses__()):  # a --baseline checkout may have none
            if "forward" in vars(cls):
                timer.wrap(cls, "forward", "denoising")
    if spec.get("cuda_graphs"):  # a replayed step calls no forward: time the guided call (with its 3 adds)
        from audioldm2_core import fast

        graphed = (
            getattr(fast, "CudaGraphDenoiser", None) or P.CudaGraphDenoiser
        )  # a --baseline may predate it
        timer.wrap(graphed, "__call__", "denoising")
    timer.wrap(AutoencoderKLDecoder, "decode", "VAE")
    timer.wrap(SpeechT5HifiGan, "forward", "vocoder")

    def call(**overrides):
        return pipe(**_call_kwargs(spec, torch, **overrides), sampler=spec["sampler"]).audios

    return pipe, call


def run_child(spec: dict) -> dict:
    """Run one measurement in a fresh interpreter and return its result dict."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    env["PYTHONPATH"] = (spec.get("root") or str(ROOT)) + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory(prefix="bench-first-run-") as fresh:
        if spec.get("first_run") and spec["impl"] == "ours":
            env["XDG_CACHE_HOME"] = _without_decisions(Path(fresh))
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec)],
            env=env,
            capture_output=True,
            text=True,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['impl']} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _without_decisions(folder: Path) -> str:
    """``folder`` made a cache folder (for ``XDG_CACHE_HOME``) holding the attention kernels built in this
    machine's, and none of the speed layer's kept decisions: a run there times every rewrite and layer shape
    as the first run on a machine does (``--first-run``), without building the kernel again."""
    kept = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "audioldm2_core"
    (folder / "audioldm2_core").mkdir()
    for built in kept.glob("audioldm2_attention-*"):
        (folder / "audioldm2_core" / built.name).symlink_to(built, target_is_directory=True)
    return str(folder)


# ------------------------------------------------------------------------------------------- report

STAGES = ("text encoders", "GPT-2", "denoising", "VAE", "vocoder")


def rel_err(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("nan")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def table(results: dict[str, list[dict]], errors: dict[str, float], header: str) -> str:
    """Medians over repeats, one row per measure, with the ratio other / ours (> 1: ours is better)."""
    other, ours = results  # column order: the reference (diffusers or --baseline), then ours

    def med(label: str, get) -> float:
        return statistics.median(get(r) for r in results[label])

    rows = [("import", "s", lambda r: r["import_s"]), ("load", "s", lambda r: r["load_s"])]
    rows += [(s, "s", lambda r, s=s: r["stages"].get(s, 0.0)) for s in STAGES]
    rows += [
        ("generate (end to end)", "s", lambda r: r["generate_s"]),
        ("load + generate", "s", lambda r: r["load_s"] + r["generate_s"]),
        ("RSS after load", "MB", lambda r: r["rss_loaded_mb"]),
        ("peak RSS", "MB", lambda r: r["peak_rss_mb"]),
        ("... of it heap (RssAnon at the sampled peak)", "MB", lambda r: r.get("peak_anon_mb", 0.0)),
        ("... of it mapped files (RssFile)", "MB", lambda r: r.get("peak_file_mb", 0.0)),
    ]
    if "peak_gpu_mb" in results[ours][0]:
        rows.append(("peak GPU memory (allocated)", "MB", lambda r: r["peak_gpu_mb"]))
    lines = [header, "", f"| measure | {other} | {ours} | {other} / {ours} |", "|---|---:|---:|---:|"]
    for name, unit, get in rows:
        a, b = med(other, get), med(ours, get)
        fmt = "{:.2f} s" if unit == "s" else "{:.0f} MB"
        ratio = f"{a / b:.2f}x" if b >= 0.01 else "-"  # low-memory "load" is ~0: it happens per stage
        lines.append(f"| {name} | {fmt.format(a)} | {fmt.format(b)} | {ratio} |")
    lines.append("")
    # Per alternating pair: this machine drifts by ~10% over minutes, so the spread says how much a median
    # of a few runs can be trusted.
    pairs = list(zip(results[other], results[ours], strict=True))
    speed = [a["generate_s"] / b["generate_s"] for a, b in pairs]  # > 1: ours is faster
    memory = [b["peak_rss_mb"] / a["peak_rss_mb"] for a, b in pairs]  # < 1: ours peaks lower
    for label, ratios in (
        (f"generate per pair, {other} / {ours}", speed),
        (f"peak RSS per pair, {ours} / {other}", memory),
    ):
        listed = ", ".join(f"{x:.2f}x" for x in ratios)
        lines.append(f"- {label}: {listed} (median {statistics.median(ratios):.2f}x)")
    lines += [f"- {name}: {value:.2e}" for name, value in errors.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:  # a measured run: nothing of audioldm2_core imported before its root is set
        print(json.dumps(worker(json.loads(argv[1]))))
        return
    sys.path.insert(0, str(ROOT))
    from audioldm2_core.samplers import SAMPLERS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="sampler steps (default 20)")
    p.add_argument(
        "--sampler",
        default="dpmpp-2m",
        choices=list(SAMPLERS),
        help="sampler; diffusers gets the matching scheduler (default dpmpp-2m: DPM-Solver++ 2M)",
    )
    p.add_argument("--length", type=float, default=10.24, help="audio length in seconds (default 10.24)")
    p.add_argument("--guidance", type=float, default=3.5, help="guidance scale (default 3.5)")
    p.add_argument(
        "--waveforms",
        type=int,
        default=1,
        help="waveforms per prompt, re-ranked by CLAP on both sides when > 1 (default 1)",
    )
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="compute dtype"
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    p.add_argument("--cuda-graphs", action="store_true", help="ours: the denoising loop from a CUDA graph")
    p.add_argument("--threads", type=int, default=2, help="torch threads per run (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="runs per implementation, alternating (default 3)")
    p.add_argument("--large", action="store_true", help="the cvssp/audioldm2-large UNet (2 layers per block)")
    p.add_argument("--low-memory", action="store_true", help="ours: load each component for its stage only")
    p.add_argument("--plain", action="store_true", help="ours: the plain model, without the speed layer")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet on both sides")
    p.add_argument(
        "--cpu-attention",
        action="store_true",
        help="ours: the C++ attention kernel (audioldm2_core.fast.cpu_attention)",
    )
    p.add_argument(
        "--first-run",
        action="store_true",
        help="ours: every run as the first on a new machine, without kept decisions (the speed layer times its "
        "rewrites and layer shapes during the run; a built attention kernel is reused)",
    )
    p.add_argument("--tiny", action="store_true", help="tiny random checkpoint (the tests' smoke run)")
    p.add_argument("--checkpoint", help="use this pipeline folder instead of the built random checkpoint")
    p.add_argument(
        "--baseline",
        metavar="ROOT",
        help="compare with the audioldm2_core of another checkout (e.g. a git worktree) instead of diffusers",
    )
    p.add_argument("--cache-dir", help=f"where the checkpoint is built and the outputs go (default {CACHE})")
    args = p.parse_args(argv)
    if args.compile and args.low_memory:
        p.error("--compile needs the UNet resident: not with --low-memory")
    if args.plain and (args.cpu_attention or args.first_run):
        p.error("--cpu-attention and --first-run are about the speed layer: not with --plain")
    check_device_options(p, args)

    ckpt = resolve_checkpoint(args)
    out = Path(args.cache_dir) if args.cache_dir else CACHE
    out.mkdir(parents=True, exist_ok=True)
    _warm_page_cache(ckpt)
    base = run_spec(args, ckpt) | dict(
        dtype=args.dtype,
        threads=args.threads,
        compile=args.compile,
        low_memory=args.low_memory,
        cpu_attention=args.cpu_attention,
        cuda_graphs=args.cuda_graphs,
        fast=not args.plain,
        first_run=args.first_run,
    )
    if args.cpu_attention:  # built here once (~12 s), so that the runs only load it
        sys.path.insert(0, str(ROOT))
        from audioldm2_core.fast import cpu_attention

        cpu_attention.build()
    other = "baseline" if args.baseline else "diffusers"
    specs = {
        other: dict(
            base,
            impl="ours",
            root=str(Path(args.baseline).resolve()),
            cpu_attention=False,
            cuda_graphs=False,
            fast=True,  # as it loads by default (a checkout from before the speed layer takes no option)
        )
        if args.baseline
        else dict(base, impl="diffusers", low_memory=False),
        "ours": dict(base, impl="ours"),
    }
    results: dict[str, list[dict]] = {label: [] for label in specs}
    waves = {label: out / f"wave-{label}.npy" for label in specs}
    for r in range(args.repeats):
        for label in list(specs) if r % 2 == 0 else list(specs)[::-1]:  # alternate who goes first
            res = run_child(dict(specs[label], out=str(waves[label])))
            results[label].append(res)
            print(f"[{r + 1}/{args.repeats}] {label}: " + json.dumps(res), file=sys.stderr, flush=True)

    import numpy as np

    errors = {
        f"waveform rel. L2 error, ours vs {other}": rel_err(np.load(waves["ours"]), np.load(waves[other]))
    }
    if args.dtype != "float32":  # the reduced-precision error, against our own float32 result
        ref = out / "wave-ours-float32.npy"
        fp32 = dict(base, impl="ours", dtype="float32", low_memory=False, compile=False, cuda_graphs=False)
        run_child(dict(fp32, out=str(ref), first_run=False))  # a reference waveform: never a timed first run
        for label in specs:
            errors[f"waveform rel. L2 error, {label} {args.dtype} vs ours float32"] = rel_err(
                np.load(waves[label]), np.load(ref)
            )
    wave = np.load(waves["ours"])
    errors["ours: waveform RMS (a silent or saturated output would make the errors meaningless)"] = float(
        np.sqrt(np.mean(wave.astype(np.float64) ** 2))
    )
    load = os.getloadavg()
    header = (
        f"{weights_description(args, ckpt)}, "
        f"{args.waveforms} x {args.length} s, {args.steps} x {args.sampler}, guidance {args.guidance}, {args.dtype}, "
        f"{args.threads} threads, {'plain model (ours, fast=False), ' if args.plain else ''}"
        f"{'low-memory (ours), ' if args.low_memory else ''}"
        f"{f'device {args.device}, ' if args.device != 'cpu' else ''}{'CUDA graphs (ours), ' if args.cuda_graphs else ''}"
        f"{'compiled UNet, ' if args.compile else ''}{'C++ CPU attention (ours), ' if args.cpu_attention else ''}"
        f"{'first run on this machine (ours: no kept decisions), ' if args.first_run else ''}"
        f"median of {args.repeats}; "
        f"load average {load[0]:.2f} / {load[1]:.2f} (1 / 5 min) at the end\nCPU: {cpu_description()}"
    )
    print(table(results, errors, header))
    for label, runs in results.items():
        if runs[0]["impl"] != "ours":
            continue  # diffusers
        print(
            f"\nSpeed layer of {label} ({runs[-1].get('package') or 'audioldm2_core'}; fast.optimize's decisions "
            "in its last run, one line per rewrite):"
        )
        print("\n".join(runs[-1]["fast"]) or "- none (fast=False, or a checkout without the speed layer)")
        if len({tuple(r["fast_on"]) for r in runs}) > 1:  # each run times the rewrites in its own process
            listed = "; ".join(", ".join(r["fast_on"]) or "none" for r in runs)
            print(f"- the rewrites on differed between its runs: {listed}")


def _warm_page_cache(ckpt: Path) -> None:
    """Read every file once so neither side pays for the first cold read from disk."""
    for path in sorted(ckpt.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass


if __name__ == "__main__":
    main()
