"""The command line as a user runs it, beside diffusers float32 and OpenVINO's notebook route.

    pip install openvino                        # optional: never needed by the package or its tests
    python benchmarks/default_route.py          # full size, 10.24 s, 20 DPM++ steps, guidance 3.5 + negative
    python benchmarks/default_route.py --tiny --rounds 1 --no-first-run   # smoke run

Part 1, speed, in rotation in one process on the same weights (``bench.rotate``): diffusers float32, diffusers
bfloat16 (the distance bfloat16 costs there), the OpenVINO notebook route (``openvino_ab.py``'s conversion:
float16 IR, OpenVINO's default CPU configuration), and ours built exactly as ``audioldm2 PROMPT`` builds it with
no speed flags (``frontend``: ``--dtype auto``, the attention kernel where the CPU takes it, ``--low-memory``
as for one prompt, so each generation loads its components again, as a fresh command does). Each waveform's
relative L2 error is taken against diffusers' float32 one.

Part 2, the first-run cost, in fresh processes typing the command (``python -m audioldm2_core PROMPT ...``):
wall seconds of the command on a new machine (an empty cache: the speed layer's timing and the kernel's build
happen inside it), of ``audioldm2 --prepare LENGTH`` and then the same command, and of the command again warm.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))


def ours_as_the_cli(ckpt: Path, spec: dict):
    """Our pipeline as ``audioldm2 PROMPT --model CKPT`` loads it (no other flags), and a call of the workload."""
    import torch

    from audioldm2_core.frontend import (
        ONE,
        load_options,
        load_pipeline,
        parse,
        resolve_device_and_dtype,
        speed_lines,
    )

    args = parse(ONE, ["-", "--model", str(ckpt), "--device", "cpu"], "")
    device, dtype = resolve_device_and_dtype(args.device, args.dtype)
    options = speed_lines(
        "bench", load_options(args, device, dtype, low_memory=args.low_memory is not False), False
    )
    pipe = load_pipeline("bench", options)

    def call(**overrides):
        import bench

        return pipe(**bench._call_kwargs(spec, torch, **overrides), sampler=spec["sampler"]).audios

    return pipe, options, call


def first_run(ckpt: Path, args) -> list[tuple[str, float]]:
    """Wall seconds of the command typed in fresh processes: new machine, --prepare then the command, warm."""
    import bench

    command = [sys.executable, "-m", "audioldm2_core", bench.PROMPT, "--negative", bench.NEGATIVE, "--model",
               str(ckpt), "--steps", str(args.steps), "--sampler", args.sampler, "--guidance", str(args.guidance),
               "--length", str(args.length), "--seed", str(bench.SEED), "--device", "cpu", "--quiet"]  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(prefix="default-route-") as tmp:
        env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
        env.pop("AUDIOLDM2_CPU_ATTENTION", None)

        def timed(name: str, argv: list[str], cache: str) -> None:
            start = time.perf_counter()
            subprocess.run(argv, env=dict(env, XDG_CACHE_HOME=cache), check=True, capture_output=True)
            rows.append((name, time.perf_counter() - start))
            print(f"{name}: {rows[-1][1]:.1f} s", file=sys.stderr)

        timed("the command on a new machine (empty cache)", [*command, "-o", f"{tmp}/a.wav"], f"{tmp}/new")
        timed("the command again (warm)", [*command, "-o", f"{tmp}/b.wav"], f"{tmp}/new")
        prepare = [sys.executable, "-m", "audioldm2_core", "--prepare", str(args.length), "--model", str(ckpt),
                   "--device", "cpu"]  # fmt: skip
        timed("audioldm2 --prepare (empty cache)", prepare, f"{tmp}/prepared")
        timed("the command after --prepare", [*command, "-o", f"{tmp}/c.wav"], f"{tmp}/prepared")
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="generations per route (default 3)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="dpmpp-2m")
    p.add_argument("--length", type=float, default=10.24)
    p.add_argument("--guidance", type=float, default=3.5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--large", action="store_true")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--checkpoint")
    p.add_argument("--cache-dir")
    p.add_argument("--no-openvino", action="store_true", help="leave the OpenVINO route out")
    p.add_argument("--no-first-run", action="store_true", help="skip part 2")
    args = p.parse_args(argv)
    args.device = "cpu"
    import bench
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    ckpt = bench.resolve_checkpoint(args)
    spec = bench.run_spec(args, ckpt) | dict(compile=False, low_memory=False)
    diffusers_pipe, diffusers = bench._diffusers(spec, torch.float32, bench.StageTimer())
    _, diffusers_bf16 = bench._diffusers(spec, torch.bfloat16, bench.StageTimer())
    ours_pipe, options, ours = ours_as_the_cli(ckpt, spec)
    torch_parts = (diffusers_pipe.unet, diffusers_pipe.vae, diffusers_pipe.vocoder)
    routes = {"diffusers": diffusers, "diffusers bfloat16": diffusers_bf16, "ours, as audioldm2 runs": ours}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_openvino:
            import openvino_ab

            parts, _ = openvino_ab._openvino_parts(diffusers_pipe, spec, Path(tmp), args.threads, f32=False)

            def notebook(**overrides):
                for attr, module in zip(("unet", "vae", "vocoder"), parts, strict=True):
                    diffusers_pipe.__dict__[attr] = module  # the config-registered attributes, set directly
                try:
                    return diffusers(**overrides)
                finally:
                    for attr, module in zip(("unet", "vae", "vocoder"), torch_parts, strict=True):
                        diffusers_pipe.__dict__[attr] = module

            routes["openvino, notebook"] = notebook

        def generate(name: str, **overrides):
            return np.asarray(routes[name](**overrides), dtype=np.float64)

        times, waves = bench.rotate(list(routes), generate, args.rounds)
    rows = [] if args.no_first_run else first_run(ckpt, args)
    kernel = ", the C++ attention kernel" if options.cpu_attention else ""
    print(f"{bench.weights_description(args, ckpt)}, {args.length} s, {args.steps} x {args.sampler}, guidance "
          f"{args.guidance} + negative, {args.threads} threads, {args.rounds} rounds, torch {torch.__version__}; "
          f"ours as audioldm2 runs with no flags: {options.dtype}{kernel}, low_memory")  # fmt: skip
    print(f"CPU: {bench.cpu_description()}\n")
    print(
        "\n".join(bench.rotation_table(times, waves, waves["diffusers"], "rel. error vs diffusers float32"))
    )
    if rows:
        print("\n| the command in a fresh process | wall seconds |\n|---|---:|")
        print("\n".join(f"| {name} | {seconds:.1f} |" for name, seconds in rows))


if __name__ == "__main__":
    main()
