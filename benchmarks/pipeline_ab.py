"""Whole generations in one process: diffusers' pipeline, our plain one and ours with the speed layer
(optionally also with the C++ attention kernel) called in rotation on the same weights.

    python benchmarks/pipeline_ab.py                    # the issue's workload (10.24 s, 20 DPM++ steps), 5 rounds
    python benchmarks/pipeline_ab.py --cpu-attention    # + ours with audioldm2_core.fast.cpu_attention
    python benchmarks/pipeline_ab.py --device cuda --dtype float16 --cuda-graphs --compile   # a GPU: + both

Why next to ``bench.py``: its fresh processes are the measure of a one-shot run (load time, peak memory), but
they run a minute apart, and this machine's speed for the same work moves by ~10% between half hours: three
float32 tables of the same code gave 1.21x-1.31x. Here every round generates once with each implementation,
so drift hits all alike, and the per-round ratios show how steady the result is. Not measured here: load
time, peak memory, and a fresh process's one-off costs (each implementation makes a 1-step generation before
the timed rounds). On a GPU, ``--cuda-graphs`` adds ours with the denoising loop replayed from a CUDA graph
and ``--compile`` ours with the UNet under ``torch.compile`` (compiled in the warm-up); both together, also
ours with both.

"ours" is ``AudioLDM2.from_pretrained`` as it loads by default, through the speed layer (``fast.optimize``
on every component; the output lists its decisions), and every other variant but "ours, plain" is that same
loaded pipeline with one option changed. "ours, plain" is a second pipeline loaded with ``fast=False``: the
plain reference model (in float32 it maps the same weight files, so it costs little memory).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class _NoStageTimes:
    """Stands in for ``bench.StageTimer``: whole generations only (its class-level wraps would stack here)."""

    def wrap(self, target: object, method: str, stage: str) -> None:
        pass


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="generations per implementation (default 5)")
    p.add_argument("--steps", type=int, default=20, help="sampler steps (default 20)")
    sys.path.insert(0, str(ROOT))
    from audioldm2_core.samplers import SAMPLERS

    p.add_argument("--sampler", default="dpmpp-2m", choices=list(SAMPLERS), help="sampler (default dpmpp-2m)")
    p.add_argument("--length", type=float, default=10.24, help="audio length in seconds (default 10.24)")
    p.add_argument("--guidance", type=float, default=3.5, help="guidance scale (default 3.5)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    p.add_argument(
        "--cuda-graphs", action="store_true", help="+ ours with the denoising loop from a CUDA graph"
    )
    p.add_argument("--compile", action="store_true", help="+ ours with the UNet under torch.compile")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--large", action="store_true", help="the cvssp/audioldm2-large UNet")
    p.add_argument("--tiny", action="store_true", help="tiny random checkpoint (the tests' smoke run)")
    p.add_argument("--checkpoint", help="a pipeline folder instead of the built random checkpoint")
    p.add_argument("--cache-dir", help="where bench.py builds its checkpoint")
    p.add_argument(
        "--cpu-attention", action="store_true", help="+ ours with audioldm2_core.fast.cpu_attention"
    )
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        p.error("--rounds and --steps must be at least 1")

    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT))
    import bench

    bench.check_device_options(p, args)
    import numpy as np
    import torch

    from audioldm2_core import fast

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    ckpt = bench.resolve_checkpoint(args)
    spec = bench.run_spec(args, ckpt) | dict(compile=False, low_memory=False)
    _, diffusers = bench._diffusers(spec, dtype, _NoStageTimes())
    plain, plain_call = bench._ours(spec | dict(fast=False), dtype, _NoStageTimes())
    pipe, call = bench._ours(spec, dtype, _NoStageTimes())
    # Each variant of ours: (its pipeline's call, the pipeline, CUDA graphs on, UNet module), the last two set
    # before each of its generations.
    unet = pipe.unet
    variants = {
        "ours, plain": (plain_call, plain, False, plain.unet),
        "ours": (call, pipe, False, unet),
    }
    kernel_unet = unet
    if args.cpu_attention:  # the same weights; the kernel is built here if it is not yet, before any timing
        kernel_unet = bench.same_weights(unet)
        fast.optimize(kernel_unet, cpu_attention=True)
        variants["ours, cpu_attention"] = (call, pipe, False, kernel_unet)
    if args.cuda_graphs:
        variants["ours, CUDA graphs"] = (call, pipe, True, unet)
    if args.compile:  # as compile=True does it; with the kernel when --cpu-attention is given
        compiled = fast.compiled(kernel_unet, {}, torch.device(args.device))
        variants["ours, compiled"] = (call, pipe, False, compiled)
        if args.cuda_graphs:  # (the kernel is the CPU's: without it)
            graphed = compiled if kernel_unet is unet else fast.compiled(unet, {}, torch.device(args.device))
            variants["ours, compiled + CUDA graphs"] = (call, pipe, True, graphed)
    names = ["diffusers", *variants]

    def generate(name: str, **overrides):
        if name == "diffusers":
            return np.asarray(diffusers(**overrides), dtype=np.float64)
        variant_call, ours, cuda_graphs, unet_module = variants[name]
        ours.options = dataclasses.replace(ours.options, cuda_graphs=cuda_graphs)
        ours.residency.modules["unet"] = unet_module
        return np.asarray(variant_call(**overrides), dtype=np.float64)

    times, waves = bench.rotate(names, generate, args.rounds)

    ref = waves["diffusers"]
    print(
        f"{bench.weights_description(args, ckpt)}, "
        f"{args.length} s, {args.steps} x {args.sampler}, guidance {args.guidance}, {args.dtype}, "
        f"{args.threads} threads, {f'device {args.device}, ' if args.device != 'cpu' else ''}"
        f"one process, {args.rounds} rounds"
    )
    print(f"CPU: {bench.cpu_description()}")
    print()
    print('"ours": fast.optimize(component), one line per rewrite: on or off (why): the components')
    print("\n".join(bench.decision_lines(pipe.fast_decisions)) or "- none (not on the CPU)")
    print()
    print("\n".join(bench.rotation_table(times, waves, ref)))


if __name__ == "__main__":
    main()
