"""Where the time goes: a per-operator profile of one UNet call, the VAE decoder and the vocoder, diffusers'
and ours, beside this CPU's measured GEMM and convolution peaks.

    python benchmarks/profile_ops.py                                          # this CPU as it is
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/profile_ops.py   # held to AVX2
    python benchmarks/profile_ops.py --tiny --calls 1                         # smoke run

Each component runs (after a warm-up call) on the pipeline's inputs for ``--length`` seconds under guidance
(the UNet sees a batch of 2), every operator timed as it is called (see ``profile``); its time goes to one of
six classes: GEMM (linears, matmuls), convolution, attention (SDPA's kernels, ours), norm (group and layer norm),
layout (copies, concatenations, pads, permutes made contiguous) and elementwise (everything else: adds,
activations, softmax outside attention, upsampling). FLOPs are counted from the recorded shapes for GEMMs and
convolutions, so each of those classes gets an achieved rate, set against the peak measured here: the best of
a large square GEMM (``torch.mm``) and of a large 3x3 convolution, at the same thread count.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CLASSES = ("GEMM", "convolution", "attention", "norm", "layout", "elementwise")
# Operators as Python code calls them and as composite ones decompose (``main`` profiles under no_grad, where
# the dispatch mode sees ``addmm`` for a linear; in inference mode it would see ``linear``): both are listed.
GEMM = {
    "aten.linear",
    "aten.matmul",
    "aten.einsum",
    "aten.mm",
    "aten.addmm",
    "aten.bmm",
    "aten.baddbmm",
    "mkldnn._linear_pointwise",
}
CONV = {
    "aten.conv1d",
    "aten.conv2d",
    "aten.conv_transpose1d",
    "aten.conv_transpose2d",
    "aten.convolution",
    "mkldnn._convolution_pointwise",
}
ATTENTION = {
    "aten.scaled_dot_product_attention",
    "aten._scaled_dot_product_flash_attention_for_cpu",
    "audioldm2.attention",
}
NORM = {"aten.group_norm", "aten.layer_norm", "aten.native_group_norm", "aten.native_layer_norm"}
LAYOUT = {
    "aten.contiguous",
    "aten.copy_",
    "aten.clone",
    "aten.cat",
    "aten.pad",
    "aten.constant_pad_nd",
    "aten.to",
    "aten._to_copy",
    "aten.index",
    "aten.repeat",
    "aten.stack",
    "aten.empty",
    "aten.empty_like",
    "aten.empty_strided",
    "aten.new_empty",
    "aten.zeros",
    "aten.fill_",
    "aten.zero_",
}


def category(name: str) -> str:
    for cls, names in (("GEMM", GEMM), ("convolution", CONV), ("attention", ATTENTION), ("norm", NORM)):
        if name in names:
            return cls
    return "layout" if name in LAYOUT else "elementwise"


def flops(name: str, args: tuple, out) -> float:
    """2 x the multiply-adds of a GEMM or convolution, from its arguments and result."""
    if name in ("aten.linear", "mkldnn._linear_pointwise"):
        return 2.0 * args[0].numel() * args[1].shape[0]
    if name in ("aten.matmul", "aten.mm", "aten.bmm"):
        return 2.0 * out.numel() * args[0].shape[-1]
    if name in ("aten.addmm", "aten.baddbmm"):
        return 2.0 * out.numel() * args[1].shape[-1]
    if name == "aten.einsum":  # two operands: every combination of the indices' values is one multiply-add
        inputs = args[0].replace(" ", "").split("->")[0].split(",")
        sizes = {
            c: n for sub, t in zip(inputs, args[1], strict=True) for c, n in zip(sub, t.shape, strict=True)
        }
        return 2.0 * math.prod(sizes.values())
    if name in CONV:  # weight (O, I / groups, k...), or (I, O / groups, k...) transposed
        w = args[1]
        transposed = "transpose" in name or (name == "aten.convolution" and args[6])
        return 2.0 * (args[0] if transposed else out).numel() * w.shape[1] * math.prod(w.shape[2:])
    return 0.0


def profile(fn, calls: int):
    """Per operator class, the wall time (s) and FLOPs of one call of ``fn`` (means over ``calls`` calls after
    one warm-up), and the call's wall time unprofiled (the best of ``calls``).

    Each ATen (or custom) operator the model calls is timed as it returns, from a ``TorchDispatchMode``: one
    timer per operator at the level Python code calls it (``aten.convolution``, not the oneDNN kernel it runs),
    so the times do not overlap, and they add up to the call's time less the Python between them (reported
    as "Python and dispatch"). ``torch.profiler``'s self times were tried first: with 2 OpenMP threads they
    overlapped (their sum exceeded the wall time by up to 3x on the vocoder) and could not be added up."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seconds: dict[str, float] = defaultdict(float)
    work: dict[str, float] = defaultdict(float)
    top: dict[str, float] = defaultdict(float)

    class Timer(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket).replace("::", ".")
            if not name.startswith(("aten.", "mkldnn.", "audioldm2.")):
                name = "aten." + name
            t0 = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            dt = time.perf_counter() - t0
            cls = category(name)
            seconds[cls] += dt / calls
            top[name] += dt / calls
            if cls in ("GEMM", "convolution"):
                work[cls] += flops(name, args, out) / calls
            return out

    fn()
    profiled = []
    for _ in range(calls):
        t0 = time.perf_counter()
        with Timer():
            fn()
        profiled.append(time.perf_counter() - t0)
    wall = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
    seconds["Python and dispatch"] = max(0.0, sum(profiled) / calls - sum(seconds.values()))
    return dict(seconds), dict(work), dict(top), min(wall)


def peaks(dtype) -> dict[str, float]:
    """GFLOP/s of a 2048^3 GEMM (the better of MKL's ``torch.mm`` and oneDNN's matmul) and of a 3x3
    convolution 256 -> 256 channels on 128 x 64 (the VAE's and the UNet's widest layers' kind; the better of
    NCHW and channels-last) in ``dtype``, best of 5 after warm-up."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    x, w = torch.randn(1, 256, 128, 64, dtype=dtype), torch.randn(256, 256, 3, 3, dtype=dtype)

    def best(fn, work):
        fn()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return work / min(times) / 1e9

    with torch.inference_mode():
        gemm = 2.0 * 2048**3
        conv = 2.0 * 128 * 64 * 256 * 256 * 9
        xl, wl = (
            x.contiguous(memory_format=torch.channels_last),
            w.contiguous(memory_format=torch.channels_last),
        )
        found = {
            "GEMM, MKL": best(lambda: torch.mm(a, b), gemm),
            "convolution, NCHW": best(lambda: F.conv2d(x, w, padding=1), conv),
            "convolution, channels-last": best(lambda: F.conv2d(xl, wl, padding=1), conv),
        }
        try:
            found["GEMM, oneDNN"] = best(
                lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "none"), gemm
            )
        except RuntimeError:  # e.g. bfloat16 without AVX-512 BF16
            pass
    found["GEMM"] = max(v for k, v in found.items() if k.startswith("GEMM"))
    found["convolution"] = max(v for k, v in found.items() if k.startswith("convolution"))
    return found


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=3, help="profiled calls per component (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--length", type=float, default=10.24, help="audio seconds (default 10.24)")
    p.add_argument("--cpu-attention", action="store_true", help="ours with audioldm2_core.fast.cpu_attention")
    p.add_argument(
        "--top", type=int, default=8, help="the slowest operators listed per component (default 8)"
    )
    p.add_argument("--large", action="store_true", help="the cvssp/audioldm2-large UNet")
    p.add_argument("--tiny", action="store_true", help="tiny random checkpoint (smoke run)")
    p.add_argument("--checkpoint", help="a pipeline folder instead of the built random checkpoint")
    p.add_argument("--cache-dir", help="where bench.py builds its checkpoint")
    args = p.parse_args(argv)
    if args.calls < 1:
        p.error("--calls must be at least 1")

    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT))
    import bench
    import torch
    from diffusers import AutoencoderKL
    from diffusers.pipelines.audioldm2.modeling_audioldm2 import AudioLDM2UNet2DConditionModel
    from transformers import SpeechT5HifiGan as HFHifiGan

    from audioldm2_core import fast
    from audioldm2_core.config import vocoder_config
    from audioldm2_core.loading import open_checkpoint
    from audioldm2_core.unet import load_unet
    from audioldm2_core.vae import load_vae
    from audioldm2_core.vocoder import load_vocoder

    torch.set_num_threads(args.threads)
    ckpt = bench.resolve_checkpoint(args)
    checkpoint = open_checkpoint(ckpt)
    dtype = getattr(torch, args.dtype)
    ours = {
        "UNet": load_unet(checkpoint, dtype=dtype),
        "VAE decoder": load_vae(checkpoint, dtype=dtype),
        "vocoder": load_vocoder(checkpoint, dtype=dtype),
    }
    decisions = {name: fast.optimize(m, cpu_attention=args.cpu_attention or None) for name, m in ours.items()}
    theirs = {
        "UNet": AudioLDM2UNet2DConditionModel.from_pretrained(ckpt / "unet", torch_dtype=dtype).eval(),
        "VAE decoder": AutoencoderKL.from_pretrained(ckpt / "vae", torch_dtype=dtype).eval(),
        "vocoder": HFHifiGan.from_pretrained(ckpt / "vocoder", torch_dtype=dtype).eval(),
    }

    g = torch.Generator().manual_seed(0)
    latent, gpt2, t5_states, mask, frames = bench.unet_inputs(
        checkpoint, ours["UNet"].cfg, args.length, 28, dtype, g
    )
    sample = torch.cat([latent] * 2)
    bins = vocoder_config(checkpoint.config("vocoder")).model_in_dim
    mel = torch.randn(1, 1, frames, bins, generator=g).to(dtype)

    calls = {
        ("UNet", "diffusers"): lambda: theirs["UNet"](
            sample,
            500,
            encoder_hidden_states=gpt2,
            encoder_hidden_states_1=t5_states,
            encoder_attention_mask_1=mask,
            return_dict=False,
        ),  # fmt: skip
        ("UNet", "ours"): lambda: ours["UNet"](sample, 500, gpt2, t5_states, mask),
        ("VAE decoder", "diffusers"): lambda: theirs["VAE decoder"].decode(latent),
        ("VAE decoder", "ours"): lambda: ours["VAE decoder"].decode(latent),
        ("vocoder", "diffusers"): lambda: theirs["vocoder"](mel[0]),
        ("vocoder", "ours"): lambda: ours["vocoder"](mel[0]),
    }
    peak = peaks(dtype)
    results = {}
    # no_grad, not inference_mode as the pipeline: under a dispatch mode in inference mode a view (the UNet's
    # flattened 1x1 projections) loses its base, and fast.linears.packed_weight, which keeps packed weights per
    # parameter, would repack those on every profiled call (25 ms of a bfloat16 call), which a generation never
    # does
    with torch.no_grad():
        for key, fn in calls.items():
            results[key] = profile(fn, args.calls)
            print(f"{key[0]}, {key[1]}: {results[key][3]:.3f} s", file=sys.stderr, flush=True)

    print(
        f"{bench.weights_description(args, ckpt)}, {args.length} s, {args.dtype}, {args.threads} threads, "
        f"{args.calls} profiled calls each, torch {torch.__version__}"
    )
    print(f"CPU: {bench.cpu_description()}")
    print(
        f"Measured {args.dtype} peaks ({args.threads} threads, GFLOP/s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in peak.items() if "," in k)
        + " (GEMM 2048^3; convolution 3x3, 256 -> 256 channels, 128 x 64); the better of each is the peak below"
    )
    print("Ours: fast.optimize's decisions:")
    print("\n".join(bench.decision_lines(decisions)))
    for component in ("UNet", "VAE decoder", "vocoder"):
        print()
        print(f"#### {component}: time per operator class, per call")
        print()
        print("| class | diffusers | share | GFLOP/s (% of peak) | ours | share | GFLOP/s (% of peak) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        rows = {impl: results[(component, impl)] for impl in ("diffusers", "ours")}
        totals = {impl: sum(r[0].values()) for impl, r in rows.items()}
        for cls in (*CLASSES, "Python and dispatch"):
            cells = []
            for impl, (sec, work, _, _) in rows.items():
                s = sec.get(cls, 0.0)
                rate = ""
                if cls in peak and work.get(cls) and s > 0:
                    gf = work[cls] / s / 1e9
                    rate = f"{gf:.0f} ({100 * gf / peak[cls]:.0f}%)"
                cells += [f"{1000 * s:.1f} ms", f"{100 * s / totals[impl]:.0f}%", rate]
            print(f"| {cls} | " + " | ".join(cells) + " |")
        cells = []
        for impl, r in rows.items():
            cells += [f"{1000 * totals[impl]:.1f} ms (unprofiled {1000 * r[3]:.1f})", "100%", ""]
        print("| total | " + " | ".join(cells) + " |")
        for impl, r in rows.items():
            slow = sorted(r[2].items(), key=lambda kv: -kv[1])[: args.top]
            listing = ", ".join(f"{name.split('.')[-1]} {1000 * s:.1f}" for name, s in slow)
            print(f"\n{impl}'s slowest operators (ms per call): {listing}")


if __name__ == "__main__":
    main()
