"""Every sampler in one run: UNet calls per step and the time of a whole generation, on one loaded pipeline.

    python benchmarks/samplers_ab.py                          # full size: 10.24 s, 20 steps, every sampler
    python benchmarks/samplers_ab.py --samplers ddim,unipc,heun --rounds 3
    python benchmarks/samplers_ab.py --tiny --steps 4         # a tiny random checkpoint (tests/test_bench.py)

What it answers: what a sampler costs at a given step count. Heun and KDPM2 call the UNet twice per step
(2 steps - 1 in all), PNDM adds 9 warm-up calls, the rest once per step; classifier-free guidance runs both
halves in one (batch-doubled) call, counted once. The time is ``AudioLDM2.__call__`` end to end (text
encoders, GPT-2, the denoising loop, VAE, vocoder), median over ``--rounds``; "denoising" is the time spent
inside the UNet. Samplers run in rotation within each round, so that this machine's drift hits all alike; a
1-step generation first takes the one-off costs. Weights as ``bench.py`` builds them (``--checkpoint`` for
another folder); ours only, loaded by default (through the speed layer). Quality is not measured here: the
same seed gives different audio per sampler (each equals diffusers with that scheduler, see the tests).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Techno music with a strong, upbeat tempo and high melodic riffs"
NEGATIVE = "Low quality."


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT))
    import bench

    from audioldm2_core.samplers import SAMPLERS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samplers", default=",".join(SAMPLERS), help="comma-separated names (default: all)")
    p.add_argument("--steps", type=int, default=20, help="sampler steps (default 20)")
    p.add_argument("--rounds", type=int, default=1, help="generations per sampler (default 1)")
    p.add_argument("--length", type=float, default=10.24, help="audio length in seconds (default 10.24)")
    p.add_argument("--guidance", type=float, default=3.5, help="guidance scale (default 3.5)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--large", action="store_true", help="the cvssp/audioldm2-large UNet")
    p.add_argument("--tiny", action="store_true", help="tiny random checkpoint (the tests' smoke run)")
    p.add_argument("--checkpoint", help="a pipeline folder instead of the built random checkpoint")
    p.add_argument("--cache-dir", help="where bench.py builds its checkpoint")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.samplers.split(",") if n.strip()]
    unknown = [n for n in names if n not in SAMPLERS]
    if unknown or not names:
        p.error(f"unknown sampler(s) {unknown}; choose from {', '.join(SAMPLERS)}")

    ckpt = bench.resolve_checkpoint(args)
    import torch

    from audioldm2_core import AudioLDM2, fast  # noqa: F401  (fast: its UNet subclass exists from here)
    from audioldm2_core.unet import AudioLDM2UNet

    torch.set_num_threads(args.threads)
    pipe = AudioLDM2.from_pretrained(ckpt, dtype=getattr(torch, args.dtype))

    # Count and time every UNet forward: the plain class's and the speed layer's subclass (FastUNet
    # swaps the class of the loaded UNet), the outermost call only.
    calls, unet_s, depth = [0], [0.0], [0]

    def counted(forward):
        def wrapper(self, *a, **k):
            if depth[0]:
                return forward(self, *a, **k)
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                return forward(self, *a, **k)
            finally:
                depth[0] -= 1
                calls[0] += 1
                unet_s[0] += time.perf_counter() - t0

        return wrapper

    for cls in (AudioLDM2UNet, *AudioLDM2UNet.__subclasses__()):
        if "forward" in vars(cls):
            cls.forward = counted(vars(cls)["forward"])

    def generate(name: str, steps: int) -> float:
        g = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=args.guidance,
             audio_length_in_s=args.length, generator=g, sampler=name)  # fmt: skip
        return time.perf_counter() - t0

    generate("ddim", 1)  # warm-up: the one-off costs
    rows: dict[str, dict[str, list[float]]] = {n: {"generate": [], "unet": [], "calls": []} for n in names}
    for _ in range(args.rounds):
        for name in names:
            calls[0], unet_s[0] = 0, 0.0
            rows[name]["generate"].append(generate(name, args.steps))
            rows[name]["unet"].append(unet_s[0])
            rows[name]["calls"].append(calls[0])

    print(
        f"{bench.weights_description(args, ckpt)}; {args.length} s, {args.steps} steps, guidance "
        f"{args.guidance}, {args.dtype}, {args.threads} threads, median of {args.rounds} round(s)"
    )
    print(f"CPU: {bench.cpu_description()}\n")
    print("| sampler | UNet calls | per step | generate | denoising | denoising per step |")
    print("|---|---|---|---|---|---|")
    for name in names:
        r = rows[name]
        n_calls = int(statistics.median(r["calls"]))
        gen, unet = statistics.median(r["generate"]), statistics.median(r["unet"])
        print(
            f"| {name} | {n_calls} | {n_calls / args.steps:.2f} | {gen:.2f} s | {unet:.2f} s | "
            f"{unet / args.steps:.3f} s |"
        )


if __name__ == "__main__":
    main()
