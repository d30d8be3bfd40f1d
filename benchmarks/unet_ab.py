"""The UNet alone, in one process: diffusers' and ours (and optionally another checkout's) called in rotation.

    python benchmarks/unet_ab.py                               # diffusers vs ours, float32, 7 rounds
    python benchmarks/unet_ab.py --dtype bfloat16 --rounds 9
    python benchmarks/unet_ab.py --baseline ../old-checkout    # + another checkout's audioldm2_core
    python benchmarks/unet_ab.py --cpu-attention               # + ours with the C++ attention kernel
    python benchmarks/unet_ab.py --compile                     # + ours under torch.compile (minutes to build)

Why next to ``bench.py``: this machine's speed drifts by ~10% over minutes, more than most single changes
are worth, and ``bench.py``'s fresh processes run minutes apart. Here every round calls each implementation
once on the same inputs, so drift hits all alike, and the per-round ratios show how steady the result is.
An implementation with ``reuse_context()`` (ours) is called inside it, as the pipeline's denoising loop does.

Inputs are the pipeline's under guidance: the conditions for [negative, positive] (8 GPT-2 states, ``--t5``
T5 states with the negative prompt's padded), the latent of ``--length`` seconds. diffusers gets the latent
repeated for both halves, as its pipeline builds it; ours gets it once (the UNet's shared-sample form). A
``--baseline`` checkout gets it repeated unless ``--baseline-shared`` says that it takes the shared form.
Weights: the random checkpoint ``bench.py`` builds (same options), or ``--checkpoint``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_baseline(root: Path, ckpt: Path, dtype):
    """The UNet of the ``audioldm2_core`` in ``root``; its modules are then forgotten, so that the next
    ``import audioldm2_core`` is this checkout's again."""
    sys.path.insert(0, str(root))
    try:
        from audioldm2_core.loading import open_checkpoint
        from audioldm2_core.unet import load_unet

        return load_unet(open_checkpoint(ckpt), dtype=dtype)
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m == "audioldm2_core" or m.startswith("audioldm2_core.")]:
            del sys.modules[name]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7, help="calls per implementation, in rotation (default 7)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--length", type=float, default=10.24, help="audio seconds the latent stands for")
    p.add_argument("--t5", type=int, default=28, help="T5 states per prompt (default 28: the bench prompt)")
    p.add_argument("--large", action="store_true", help="the cvssp/audioldm2-large UNet")
    p.add_argument("--tiny", action="store_true", help="tiny random checkpoint (the tests' smoke run)")
    p.add_argument("--checkpoint", help="a pipeline folder to take the UNet from instead")
    p.add_argument("--cache-dir", help="where bench.py builds its checkpoint")
    p.add_argument("--baseline", help="another checkout whose audioldm2_core UNet joins the rotation")
    p.add_argument("--baseline-shared", action="store_true", help="the baseline takes the shared latent")
    p.add_argument(
        "--cpu-attention",
        action="store_true",
        help="+ ours with audioldm2_core.cpu_attention (the same UNet)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="+ ours under torch.compile (the same UNet; with the kernel when --cpu-attention is given)",
    )
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench
    import torch
    from diffusers.pipelines.audioldm2.modeling_audioldm2 import AudioLDM2UNet2DConditionModel

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    ckpt = bench.resolve_checkpoint(args)
    impls = {"diffusers": AudioLDM2UNet2DConditionModel.from_pretrained(ckpt / "unet", torch_dtype=dtype)}
    impls["diffusers"].eval()
    if args.baseline:
        impls["baseline"] = _load_baseline(Path(args.baseline).resolve(), ckpt, dtype)
    sys.path.insert(0, str(ROOT))  # from here on, audioldm2_core is this checkout's
    from audioldm2_core import cpu_attention
    from audioldm2_core.config import vae_config, vocoder_config
    from audioldm2_core.loading import open_checkpoint
    from audioldm2_core.pipeline import audio_shape
    from audioldm2_core.unet import load_unet

    checkpoint = open_checkpoint(ckpt)
    impls["ours"] = load_unet(checkpoint, dtype=dtype)
    if args.cpu_attention:
        cpu_attention.enable()  # built here if it is not yet, before anything is timed
        impls["ours, cpu_attention"] = impls["ours"]
    if args.compile:
        from audioldm2_core.pipeline import _compiled

        impls["ours, compiled"] = _compiled(impls["ours"], {}, torch.device("cpu"))  # as compile=True
    cpu_attention.enable(False)

    cfg = impls["ours"].cfg
    lm, t5 = cfg.cross_attention_dims[0][1], cfg.cross_attention_dims[0][2]
    # The latent the pipeline makes for --length seconds: (frames, mel bins) / the VAE's scale.
    vocoder = vocoder_config(checkpoint.config("vocoder"))
    scale = vae_config(checkpoint.config("vae")).scale_factor
    factor = math.prod(vocoder.upsample_rates) / vocoder.sampling_rate
    frames, _ = audio_shape(args.length, factor, scale, vocoder.sampling_rate)
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(1, cfg.in_channels, frames // scale, vocoder.model_in_dim // scale, generator=g)
    latent = latent.to(dtype)
    gpt2 = torch.randn(2, 8, lm, generator=g).to(dtype)
    t5_states = torch.randn(2, args.t5, t5, generator=g).to(dtype)
    mask = torch.ones(2, args.t5, dtype=torch.long)
    mask[0, min(6, args.t5) :] = 0  # the negative prompt is the shorter one
    wide = torch.cat([latent] * 2)

    def call(name: str):
        unet = impls[name]
        if name == "diffusers":
            return unet(
                wide,
                500,
                encoder_hidden_states=gpt2,
                encoder_hidden_states_1=t5_states,
                encoder_attention_mask_1=mask,
                return_dict=False,
            )[0]
        shared = name.startswith("ours") or args.baseline_shared
        if name.startswith("ours"):
            cpu_attention.enable(
                name == "ours, cpu_attention" or (name == "ours, compiled" and args.cpu_attention)
            )
        return unet(latent if shared else wide, 500, gpt2, t5_states, mask)

    times: dict[str, list[float]] = {name: [] for name in impls}
    outs = {}
    with torch.inference_mode(), contextlib.ExitStack() as stack:
        for unet in {id(u): u for u in impls.values()}.values():  # as in the pipeline's loop: the conditions
            if hasattr(unet, "reuse_context"):  # are the same at every step
                stack.enter_context(unet.reuse_context())
        for name in impls:  # warm-up: page faults of the mapped weights, kernel set-up, compilation
            start = time.perf_counter()
            call(name)
            if name == "ours, compiled":
                print(f"torch.compile: first call {time.perf_counter() - start:.1f} s", flush=True)
        for _ in range(args.rounds):
            for name in impls:
                start = time.perf_counter()
                outs[name] = call(name)
                times[name].append(time.perf_counter() - start)

    ref = outs["diffusers"].double()
    print(
        f"UNet {'large' if args.large else 'base'}{' tiny' if args.tiny else ''}, {args.dtype}, "
        f"{args.threads} threads, latent {tuple(latent.shape)} for a guidance batch of 2, {args.rounds} rounds"
    )
    print()
    print("| implementation | median | min | diffusers / it (median of rounds) | rel. error vs diffusers |")
    print("|---|---:|---:|---:|---:|")
    for name, ts in times.items():
        ratio = statistics.median(d / t for d, t in zip(times["diffusers"], ts, strict=True))
        err = ((outs[name].double() - ref).norm() / ref.norm()).item()
        print(f"| {name} | {statistics.median(ts):.3f} s | {min(ts):.3f} s | {ratio:.3f}x | {err:.2e} |")


if __name__ == "__main__":
    main()
