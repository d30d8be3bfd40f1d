"""The faster modes' cost in quality: each mode's audio against our float32 audio, over a fixed prompt set.

    python benchmarks/modes.py                         # the modes this CPU runs well, 4 prompts, 20 steps
    python benchmarks/modes.py --prompts 8 --modes float32,bfloat16
    python benchmarks/modes.py --tiny --prompts 2 --steps 2     # smoke run

Modes (ours, speed layer on): ``float32`` (the reference), ``float32+kernel`` (the C++ attention kernel,
``fast.cpu_attention``: a UNet on the same weights optimized with ``cpu_attention=True``), ``bfloat16`` and
``bfloat16+kernel``. The bfloat16 modes are offered only where the CPU
has native bfloat16 (AVX-512 BF16 or AMX: the pipeline's own test, oneDNN's bfloat16 matmul); elsewhere
oneDNN runs reference kernels hundreds of times slower, and they are left out, saying so.

For each prompt of ``PROMPTS`` (the first ``--prompts``), each mode generates one waveform from the same
starting noise (drawn once in float32 from the seed and rounded to the mode's dtype: torch 2.6 draws bfloat16
noise from a seed as other numbers than float32's, which would measure the draw, not the mode; 2.13 draws the
same);
reported per mode: the mean generation time and its speed against float32, the waveform's relative L2 error
against float32's (mean and max over prompts), and the CLAP text-audio score of the audio (the checkpoint's
CLAP, as the pipeline's re-ranking computes it, always in float32) with its change against float32's. Speed
against diffusers is ``pipeline_ab.py``'s (diffusers in the rotation); this script measures what a mode costs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A fixed, varied set: environmental sound, music, speech-like sound, effects, ambience.
PROMPTS = [
    "Rain falling on a tin roof with distant thunder.",
    "A jazz trio with upright bass, brushed drums and piano.",
    "A crowd cheering in a stadium.",
    "Birds singing in a forest at dawn.",
    "An electric guitar playing a distorted rock riff.",
    "A dog barking while a car passes by.",
    "Ocean waves crashing on the shore.",
    "A church organ playing a slow chord progression.",
]
MODES = ("float32", "float32+kernel", "bfloat16", "bfloat16+kernel")


def native_bf16() -> bool:
    """Whether bfloat16 runs on native instructions here (the pipeline's own test at load)."""
    import torch

    from audioldm2_core import fast

    return fast.decide("onednn-linear", torch.bfloat16, timed=False).supported


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--prompts", type=int, default=4, help=f"the first N of the {len(PROMPTS)} prompts (default 4)"
    )
    p.add_argument(
        "--modes", default=None, help=f"comma-separated, of {', '.join(MODES)} (default: all offered)"
    )
    p.add_argument("--steps", type=int, default=20, help="sampler steps (default 20)")
    p.add_argument("--length", type=float, default=10.24, help="audio length in seconds (default 10.24)")
    p.add_argument("--guidance", type=float, default=3.5, help="guidance scale (default 3.5)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--large", action="store_true", help="the cvssp/audioldm2-large UNet")
    p.add_argument("--tiny", action="store_true", help="tiny random checkpoint (smoke run)")
    p.add_argument("--checkpoint", help="a pipeline folder instead of the built random checkpoint")
    p.add_argument("--cache-dir", help="where bench.py builds its checkpoint")
    args = p.parse_args(argv)
    if not 1 <= args.prompts <= len(PROMPTS):
        p.error(f"--prompts must be between 1 and {len(PROMPTS)}")
    if args.steps < 1:
        p.error("--steps must be at least 1")

    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT))
    import bench
    import numpy as np
    import torch

    from audioldm2_core import fast
    from audioldm2_core.fast import cpu_attention
    from audioldm2_core.noise import randn
    from audioldm2_core.pipeline import AudioLDM2

    torch.set_num_threads(args.threads)
    offered = [
        m
        for m in MODES
        if ("bfloat16" not in m or native_bf16()) and ("kernel" not in m or cpu_attention.supported())
    ]
    modes = offered if args.modes is None else args.modes.split(",")
    for m in modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}: choose from {', '.join(MODES)}")
    left_out = [m for m in MODES if m not in offered]
    if "float32" not in modes:
        modes.insert(0, "float32")  # the reference
    ckpt = bench.resolve_checkpoint(args)
    prompts = PROMPTS[: args.prompts]

    pipes = {}
    for dtype in dict.fromkeys("bfloat16" if "bfloat16" in m else "float32" for m in modes):
        pipes[dtype] = AudioLDM2.from_pretrained(
            ckpt, dtype=getattr(torch, dtype), device="cpu", cpu_attention=False
        )
    unets = {}  # mode -> its UNet: the pipeline's, or with the kernel one on the same weights (built here)
    for m in modes:
        unets[m] = pipes["bfloat16" if "bfloat16" in m else "float32"].unet
        if "kernel" in m:
            unets[m] = bench.same_weights(unets[m])
            fast.optimize(unets[m], cpu_attention=True)

    # the starting noise of every mode, as the float32 pipeline draws it
    shape = pipes["float32"].latent_shape(args.length)
    noise = randn(shape, torch.Generator().manual_seed(bench.SEED), dtype=torch.float32)

    def generate(mode: str, prompt: str, steps: int = args.steps):
        pipe = pipes["bfloat16" if "bfloat16" in mode else "float32"]
        pipe.unet = unets[mode]
        return pipe(
            prompt,
            negative_prompt=bench.NEGATIVE,
            num_inference_steps=steps,
            guidance_scale=args.guidance,
            audio_length_in_s=args.length,
            latents=noise,
            generator=torch.Generator().manual_seed(bench.SEED),
        ).audios[0]

    for m in modes:  # warm-up: page faults of the mapped weights, kernel set-up
        generate(m, prompts[0], steps=1)
    waves: dict[str, list] = {m: [] for m in modes}
    times: dict[str, list[float]] = {m: [] for m in modes}
    for i, prompt in enumerate(prompts):
        for m in modes if i % 2 == 0 else modes[::-1]:
            t0 = time.perf_counter()
            waves[m].append(np.asarray(generate(m, prompt), dtype=np.float64))
            times[m].append(time.perf_counter() - t0)
            print(f"[{i + 1}/{len(prompts)}] {m}: {times[m][-1]:.2f} s", file=sys.stderr, flush=True)

    scorer = pipes["float32"]
    scores = {}
    for m in modes:
        audio = torch.from_numpy(np.stack(waves[m])).float()
        scores[m] = [
            float(scorer.score_waveforms([prompt], audio[i : i + 1], 1)[1][0, 0])
            for i, prompt in enumerate(prompts)
        ]

    print(
        f"{bench.weights_description(args, ckpt)}, {len(prompts)} prompts (benchmarks/modes.py), {args.length} s, "
        f"{args.steps} x dpmpp-2m, guidance {args.guidance}, {args.threads} threads, seed {bench.SEED}, one process, "
        f"torch {torch.__version__}"
    )
    print(f"CPU: {bench.cpu_description()}")
    if left_out:
        print(f"Not offered on this CPU (left out): {', '.join(left_out)}")
    print()
    print(
        "| mode | generation (mean) | speed vs float32 | waveform rel. error vs float32 (mean / max) | "
        "CLAP score (mean) | CLAP change vs float32 (mean / mean abs.) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    ref_t = statistics.mean(times["float32"])
    for m in modes:
        errs = [
            float(np.linalg.norm(w - r) / np.linalg.norm(r))
            for w, r in zip(waves[m], waves["float32"], strict=True)
        ]
        delta = [s - r for s, r in zip(scores[m], scores["float32"], strict=True)]
        print(
            f"| {m} | {statistics.mean(times[m]):.2f} s | {ref_t / statistics.mean(times[m]):.2f}x | "
            f"{statistics.mean(errs):.2e} / {max(errs):.2e} | {statistics.mean(scores[m]):.3f} | "
            f"{statistics.mean(delta):+.2e} / {statistics.mean(abs(d) for d in delta):.2e} |"
        )


if __name__ == "__main__":
    main()
