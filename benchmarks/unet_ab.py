"""The UNet alone, in one process: diffusers', our plain and our fast one (and optionally more) in rotation.

    python benchmarks/unet_ab.py                               # diffusers, plain, fast; float32, 7 rounds
    python benchmarks/unet_ab.py --dtype bfloat16 --rounds 9
    python benchmarks/unet_ab.py --baseline ../old-checkout    # + another checkout's audioldm2_core
    python benchmarks/unet_ab.py --cpu-attention               # + fast with the C++ attention kernel
    python benchmarks/unet_ab.py --compile                     # + fast under torch.compile (minutes to build)

Variants: "plain" is our UNet as ``audioldm2_core.unet.load_unet`` builds it (the reference computation),
"fast" a second load of the same weights through ``fast.optimize`` (``select="auto"``: the rewrites this CPU
supports and that pay here; the output lists each decision), "fast, cpu_attention" the same weights optimized
with ``cpu_attention=True``, "fast, compiled" the fast UNet under ``torch.compile`` (as ``compile=True``;
with the kernel when ``--cpu-attention`` is given). A ``--baseline`` checkout's UNet goes through that
checkout's own ``fast.optimize`` where it has one (as its pipeline loads it), inside ``reuse_context()``
where it has that (older checkouts, whose pipeline loop entered it).

Why next to ``bench.py``: this machine's speed drifts by ~10% over minutes, more than most single changes
are worth, and ``bench.py``'s fresh processes run minutes apart. Here every round calls each implementation
once on the same inputs, so drift hits all alike, and the per-round ratios show how steady the result is.

Inputs are the pipeline's under guidance: the conditions for [negative, positive] (8 GPT-2 states, ``--t5``
T5 states with the negative prompt's padded) and the latent of ``--length`` seconds repeated for both
halves (``torch.cat([latent] * 2)``), as both pipelines build it; every variant gets the same batch.
Weights: the random checkpoint ``bench.py`` builds (same options), or ``--checkpoint``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_baseline(root: Path, ckpt: Path, dtype):
    """The UNet of the ``audioldm2_core`` in ``root``, through that checkout's ``fast.optimize`` where it has
    one, and its decisions ({} where it has none); its modules are then forgotten, so that the next
    ``import audioldm2_core`` is this checkout's again (the loaded classes keep theirs)."""
    sys.path.insert(0, str(root))
    try:
        from audioldm2_core.loading import open_checkpoint
        from audioldm2_core.unet import load_unet

        unet = load_unet(open_checkpoint(ckpt), dtype=dtype)
        if importlib.util.find_spec("audioldm2_core.fast") is None:
            return unet, {}  # a checkout from before the speed layer: its speed is in the model
        from audioldm2_core import fast

        return unet, fast.optimize(unet)
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
    p.add_argument(
        "--cpu-attention",
        action="store_true",
        help="+ the fast UNet with audioldm2_core.fast.cpu_attention (the same weights)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="+ the fast UNet under torch.compile (with the kernel when --cpu-attention is given)",
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
    decisions = {}  # variant -> its fast.optimize decisions
    if args.baseline:
        impls["baseline"], decisions["baseline"] = _load_baseline(Path(args.baseline).resolve(), ckpt, dtype)
    sys.path.insert(0, str(ROOT))  # from here on, audioldm2_core is this checkout's
    from audioldm2_core import fast
    from audioldm2_core.loading import open_checkpoint
    from audioldm2_core.unet import load_unet

    checkpoint = open_checkpoint(ckpt)
    impls["plain"] = load_unet(checkpoint, dtype=dtype)
    impls["fast"] = load_unet(checkpoint, dtype=dtype)  # a second load: "plain" keeps the plain classes
    decisions["fast"] = fast.optimize(impls["fast"], cpu_attention=False)
    if args.cpu_attention:  # the kernel is built here if it is not yet, before anything is timed
        impls["fast, cpu_attention"] = bench.same_weights(impls["fast"])
        decisions["fast, cpu_attention"] = fast.optimize(impls["fast, cpu_attention"], cpu_attention=True)
    if args.compile:  # as compile=True, with the kernel when --cpu-attention is given
        unet = impls["fast, cpu_attention" if args.cpu_attention else "fast"]
        impls["fast, compiled"] = fast.compiled(unet, {}, torch.device("cpu"))

    cfg = impls["plain"].cfg
    g = torch.Generator().manual_seed(0)
    latent, gpt2, t5_states, mask, _ = bench.unet_inputs(checkpoint, cfg, args.length, args.t5, dtype, g)
    sample = torch.cat([latent] * 2)  # the guidance batch, as both pipelines build it

    def call(name: str):
        unet = impls[name]
        if name == "diffusers":
            return unet(
                sample,
                500,
                encoder_hidden_states=gpt2,
                encoder_hidden_states_1=t5_states,
                encoder_attention_mask_1=mask,
                return_dict=False,
            )[0]
        return unet(sample, 500, gpt2, t5_states, mask)

    times: dict[str, list[float]] = {name: [] for name in impls}
    outs = {}
    with torch.inference_mode(), contextlib.ExitStack() as stack:
        # an older --baseline checkout's UNet kept the conditions' projections while its pipeline's loop
        # entered this (the conditions are the same at every step); this checkout's have no such state
        for unet in {id(u): u for u in impls.values()}.values():
            if hasattr(unet, "reuse_context"):
                stack.enter_context(unet.reuse_context())
        for name in impls:  # warm-up: page faults of the mapped weights, kernel set-up, compilation
            start = time.perf_counter()
            call(name)
            if name == "fast, compiled":
                print(f"torch.compile: first call {time.perf_counter() - start:.1f} s", flush=True)
        for _ in range(args.rounds):
            for name in impls:
                start = time.perf_counter()
                outs[name] = call(name)
                times[name].append(time.perf_counter() - start)

    print(
        f"UNet of {bench.weights_description(args, ckpt)}, {args.dtype}, "
        f"{args.threads} threads, latent {tuple(latent.shape)} for a guidance batch of 2, {args.rounds} rounds"
    )
    print(f"CPU: {bench.cpu_description()}")
    print()
    print(
        'fast.optimize(unet, select="auto"), one line per rewrite: on or off (why): the variants it was for'
    )
    print("\n".join(bench.decision_lines(decisions)) or "- none (no variant has the speed layer)")
    print()
    outs = {name: out.float().numpy() for name, out in outs.items()}
    print("\n".join(bench.rotation_table(times, outs, outs["diffusers"], places=3)))


if __name__ == "__main__":
    main()
