"""Fine-tuning's optimizer step, ours against diffusers' UNet with the same PEFT LoRA, on full-size weights.

    python benchmarks/train_ab.py                      # LoRA rank 4, batch 2 x 10.24 s, float32: rotation + peaks
    python benchmarks/train_ab.py --rounds 5 --no-peaks
    python benchmarks/train_ab.py --tiny --rounds 1    # the tests' tiny checkpoint: a smoke run, seconds
    python benchmarks/train_ab.py --device cuda --dtype bfloat16 --batch 8     # on a GPU (autocast)
    python benchmarks/train_ab.py --saved ours         # what a forward keeps for the backward, by module kind
    python benchmarks/train_ab.py --floor ours         # the step's FLOPs against this CPU's GEMM peak: its floor

One optimizer step, as ``audioldm2-train`` computes it: z0, noise and t drawn once (the same for every variant),
the loss (ours: ``train.objective.item_losses``, the trainer's; diffusers: its scripts' ``add_noise``, the UNet,
``mse_loss``), the backward, gradient clipping to 1, and AdamW over the trained parameters. Variants: "diffusers"
(``AudioLDM2UNet2DConditionModel`` with ``peft.inject_adapter_in_model``), "ours" (``unet.load_unet`` with
``lora.inject``: the same LoraConfig; the adapters copied from ours to diffusers', so both start equal) as the
trainer prepares it (``train.memory.prepare``: the lean modules), "ours, plain modules" (the same without
the lean modules), and "ours, checkpointed" (``prepare`` with gradient
checkpointing: the lean modules, ``enable_gradient_checkpointing`` and the heap hand-back before each block).

Time: one process, every round runs each variant's step once (who goes first alternating), after a warm-up step
each; the table gives medians and the per-round ratio to diffusers, and the relative error of the first step's
loss against diffusers'. The time of each stage (forward, backward, optimizer) is the median over the rounds.
Peak memory: each variant again in a fresh subprocess (``--peak NAME``: load, two steps, its VmHWM).
diffusers' own gradient checkpointing is not a variant: in diffusers 0.42.1 its AudioLDM 2 blocks pass the
checkpointed ``Transformer2DModel`` its arguments by position, one place off (the T5 mask lands in
``attention_mask``), and the step fails with a shape error whenever the T5 stream has a mask. Weights: ``bench.py``'s random full-size checkpoint (built
once), or ``--checkpoint``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("diffusers", "ours, plain modules", "ours", "ours, checkpointed")
PEAK_VARIANTS = VARIANTS
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def build(name: str, ckpt: Path, args, rank: int, source=None):
    """A variant's UNet with its LoRA (``source``: a UNet whose adapters it copies) and its trained parameters."""
    import torch
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict

    dtype = getattr(torch, args.weights_dtype)
    if name.startswith("diffusers"):
        from diffusers.pipelines.audioldm2.modeling_audioldm2 import AudioLDM2UNet2DConditionModel

        unet = AudioLDM2UNet2DConditionModel.from_pretrained(ckpt / "unet", torch_dtype=dtype)
        config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGETS)
        torch.manual_seed(0)
        inject_adapter_in_model(config, unet)
        if source is not None:
            set_peft_model_state_dict(unet, get_peft_model_state_dict(source))
    else:
        from audioldm2_core import lora
        from audioldm2_core.loading import open_checkpoint
        from audioldm2_core.unet import load_unet

        unet = load_unet(open_checkpoint(ckpt), dtype=dtype)
        lora.inject(unet, rank, float(rank), tuple(TARGETS), seed=0)
    unet.to(args.device).train()
    for n, p in unet.named_parameters():
        p.requires_grad_(args.full or "lora_" in n)
    if name in ("ours", "ours, checkpointed"):  # as the trainer prepares it
        from audioldm2_core.train import memory

        memory.prepare(unet, name.endswith("checkpointed"), torch.device(args.device))
    params = [p for p in unet.parameters() if p.requires_grad]
    return unet, params, torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)


def inputs(ckpt: Path, args):
    """z0, noise, t, and the conditions (8 GPT-2 states, 28 T5 states, one prompt's padded) for a batch."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench

    from audioldm2_core.config import unet_config
    from audioldm2_core.loading import open_checkpoint

    checkpoint = open_checkpoint(ckpt)
    cfg = unet_config(checkpoint.config("unet"))
    g = torch.Generator().manual_seed(0)
    latent, gpt2, t5, mask, _ = bench.unet_inputs(checkpoint, cfg, args.length, 28, torch.float32, g)
    b = args.batch
    z0 = torch.randn((b, *latent.shape[1:]), generator=g)
    noise, t = torch.randn(z0.shape, generator=g), torch.randint(0, 1000, (b,), generator=g)
    rows = torch.arange(b) % 2  # conditions of two prompts, alternating
    dev = args.device
    return z0.to(dev), noise.to(dev), t.to(dev), gpt2[rows].to(dev), t5[rows].to(dev), mask[rows].to(dev)


def step_fn(name: str, unet, params, optimizer, batch, scheduler_config, args, timer: dict):
    """One optimizer step of a variant; ``timer[stage]`` gets each stage's seconds. Returns the loss."""
    import torch

    from audioldm2_core.generate import Conditions
    from audioldm2_core.schedules import alphas_cumprod
    from audioldm2_core.train import objective

    z0, noise, t, gpt2, t5, mask = batch
    abar = alphas_cumprod(scheduler_config).to(args.device)
    autocast = None if args.dtype == "float32" else getattr(torch, args.dtype)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    optimizer.zero_grad(set_to_none=True)
    sync()
    start = time.perf_counter()
    if name.startswith("diffusers"):  # diffusers' scripts: add_noise, the UNet, mse_loss
        with torch.autocast(z0.device.type, dtype=autocast, enabled=autocast is not None):
            noisy = objective.noised(z0, noise, t, abar)
            pred = unet(noisy, t, encoder_hidden_states=gpt2, encoder_hidden_states_1=t5,
                        encoder_attention_mask_1=mask).sample  # fmt: skip
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
    else:  # the trainer's
        losses = objective.item_losses(unet, z0, noise, t, Conditions(t5, mask, gpt2, False), abar, "epsilon",
                                       autocast=autocast)  # fmt: skip
        loss = losses.mean()
    sync()
    forward = time.perf_counter()
    loss.backward()
    sync()
    backward = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    sync()
    end = time.perf_counter()
    for stage, seconds in (("forward", forward - start), ("backward", backward - forward), ("optimizer", end - backward),
                           ("step", end - start)):  # fmt: skip
        timer.setdefault(stage, []).append(seconds)
    return loss.item()


def peak(name: str, ckpt: Path, args) -> None:
    """``--peak NAME``: this process loads one variant, runs two steps and prints its peak RSS (and on CUDA the
    peak of allocated memory) as JSON."""
    import torch

    from audioldm2_core.config import scheduler_config
    from audioldm2_core.loading import open_checkpoint

    torch.set_num_threads(args.threads)
    sched = scheduler_config(open_checkpoint(ckpt).config("scheduler"))
    unet, params, opt = build(name, ckpt, args, args.rank)
    batch = inputs(ckpt, args)
    timer: dict = {}
    for _ in range(2):
        step_fn(name, unet, params, opt, batch, sched, args, timer)
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's RSS at the fork (the rotation's models)
    from audioldm2_core.residency import heap_state

    hwm = heap_state()
    peak_bytes = hwm[1] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"variant": name, "peak_rss_gb": peak_bytes / 2**30}
    if args.device.startswith("cuda"):
        out["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 2**30
    out["step_s"] = timer["step"][-1]
    print(json.dumps(out))


def saved_for_backward(name: str, ckpt: Path, args) -> dict[str, float]:
    """``--saved NAME``: what one forward of a variant keeps for its backward, in GB by the kind of module that
    saved it (each storage counted once, parameters not counted; a group norm's share counted in the module
    that calls it): where the activations' memory goes."""
    import collections

    import torch

    from audioldm2_core.config import scheduler_config
    from audioldm2_core.loading import open_checkpoint
    from audioldm2_core.schedules import alphas_cumprod
    from audioldm2_core.train import objective

    unet, _, _ = build(name, ckpt, args, args.rank)
    z0, noise, t, gpt2, t5, mask = inputs(ckpt, args)
    abar = alphas_cumprod(scheduler_config(open_checkpoint(ckpt).config("scheduler")))
    stack: list[str] = []
    for m in unet.modules():
        if isinstance(m, torch.nn.GroupNorm):  # a hook would keep a lean resnet from fusing its norm and SiLU
            continue
        m.register_forward_pre_hook(lambda mod, _: stack.append(type(mod).__name__))
        # None whatever pop returns: a hook that returns a value replaces the module's output
        m.register_forward_hook(lambda *_: stack.pop() and None)
    weights = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    seen: set[int] = set()
    by_kind: collections.Counter = collections.Counter()

    def pack(x):
        ptr = x.untyped_storage().data_ptr()
        if ptr not in seen and ptr not in weights:
            seen.add(ptr)
            by_kind[stack[-1] if stack else "loss"] += x.untyped_storage().nbytes() / 2**30
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        x = objective.noised(z0, noise, t, abar)
        if name.startswith("diffusers"):
            unet(x, t, encoder_hidden_states=gpt2, encoder_hidden_states_1=t5, encoder_attention_mask_1=mask)
        else:
            unet(x, t, gpt2, t5, mask)
    return dict(by_kind.most_common())


def floor(name: str, ckpt: Path, args) -> None:
    """``--floor NAME``: the FLOPs of one optimizer step (``FlopCounterMode`` for the matmuls and convolutions;
    attention by its formula, which the counter does not know on the CPU: 4 B H N L d forward, 2.5 times that
    backward, as flash attention recomputes the scores) and the time they take at this CPU's float32 GEMM peak
    (4096^3, measured here): the fastest the step could be with every FLOP at that peak."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from audioldm2_core.config import scheduler_config
    from audioldm2_core.loading import open_checkpoint

    torch.set_num_threads(args.threads)
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    a @ b
    start = time.perf_counter()
    for _ in range(5):
        a @ b
    peak = 5 * 2 * 4096**3 / (time.perf_counter() - start)
    sched = scheduler_config(open_checkpoint(ckpt).config("scheduler"))
    unet, params, opt = build(name, ckpt, args, args.rank)
    attention = []

    def count(
        m, positional, kwargs, out
    ):  # ours: (x, context, bias); diffusers': (x, encoder_hidden_states=...)
        context = kwargs.get("encoder_hidden_states", positional[1] if len(positional) > 1 else None)
        keys = out.shape[1] if context is None else context.shape[1]
        attention.append(4 * out.shape[0] * out.shape[1] * keys * m.to_q.out_features)  # QK^T and PV

    for m in unet.modules():
        if type(m).__name__ == "Attention":
            m.register_forward_hook(count, with_kwargs=True)
    counter = FlopCounterMode(display=False)
    with counter:
        step_fn(name, unet, params, opt, inputs(ckpt, args), sched, args, {})
    counted = counter.get_flop_counts()["Global"]
    total = sum(counted.values()) + 3.5 * sum(attention)
    print(f"{name}: one step, {total / 1e9:.0f} GFLOP ({', '.join(f'{k}: {v / 1e9:.0f}' for k, v in counted.items())},"
          f" attention forward and backward: {3.5 * sum(attention) / 1e9:.0f}); float32 GEMM peak "
          f"{peak / 1e9:.0f} GFLOP/s on {args.threads} threads: floor {total / peak:.2f} s")  # fmt: skip


def rotation(ckpt: Path, args) -> dict:

    from audioldm2_core.config import scheduler_config
    from audioldm2_core.loading import open_checkpoint

    sched = scheduler_config(open_checkpoint(ckpt).config("scheduler"))
    models = {"ours": build("ours", ckpt, args, args.rank)}
    models["diffusers"] = build("diffusers", ckpt, args, args.rank, source=models["ours"][0])
    for name in ("ours, plain modules", "ours, checkpointed"):  # the same seeded LoRA
        models[name] = build(name, ckpt, args, args.rank)
    batch = inputs(ckpt, args)
    timers = {name: {} for name in VARIANTS}
    first = {name: step_fn(name, *models[name], batch, sched, args, {}) for name in VARIANTS}  # warm-up
    for r in range(args.rounds):
        order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
        for name in order:
            step_fn(name, *models[name], batch, sched, args, timers[name])
    return {"timers": timers, "first_loss": first}


def report(result: dict, peaks: list[dict], args, ckpt: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench

    timers, first = result["timers"], result["first_loss"]
    ref = timers["diffusers"]["step"]
    mode = "full fine-tuning" if args.full else f"LoRA rank {args.rank} on {', '.join(TARGETS)}"
    print(f"Optimizer steps of the UNet ({mode}), batch {args.batch} x {args.length} s, {args.dtype} on {args.device},"
          f" {args.threads} threads, {args.rounds} rounds; {bench.weights_description(args, ckpt)}")  # fmt: skip
    print(f"CPU: {bench.cpu_description()}\n")
    print(
        "| variant | step (median) | forward | backward | optimizer | diffusers / it (per round) | loss vs diffusers |"
    )
    print("|---|---:|---:|---:|---:|---|---:|")
    for name in VARIANTS:
        t = timers[name]
        ratios = [d / s for d, s in zip(ref, t["step"], strict=True)]
        err = abs(first[name] - first["diffusers"]) / abs(first["diffusers"])
        print(f"| {name} | {statistics.median(t['step']):.2f} s | {statistics.median(t['forward']):.2f} s | "
              f"{statistics.median(t['backward']):.2f} s | {statistics.median(t['optimizer']):.3f} s | "
              f"{statistics.median(ratios):.3f}x ({', '.join(f'{x:.2f}' for x in ratios)}) | {err:.1e} |")  # fmt: skip
    if peaks:
        base = next(p["peak_rss_gb"] for p in peaks if p["variant"] == "diffusers")
        print("\n| variant (fresh process, 2 steps) | peak RSS | vs diffusers | step |")
        print("|---|---:|---:|---:|")
        for p in peaks:
            cuda = f" (CUDA {p['peak_cuda_gb']:.2f} GB)" if "peak_cuda_gb" in p else ""
            print(f"| {p['variant']} | {p['peak_rss_gb']:.2f} GB{cuda} | {p['peak_rss_gb'] / base:.2f}x | "
                  f"{p['step_s']:.2f} s |")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=float, default=10.24, help="seconds per clip (default 10.24)")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--full", action="store_true", help="train every UNet weight instead of a LoRA")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="autocast dtype"
    )
    p.add_argument("--weights-dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-peaks", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--peak", choices=PEAK_VARIANTS, help=argparse.SUPPRESS)
    p.add_argument(
        "--saved", choices=VARIANTS, help="print what a forward keeps for the backward, by module kind"
    )
    p.add_argument(
        "--floor", choices=VARIANTS, help="print a step's FLOPs and their time at this CPU's GEMM peak"
    )
    p.add_argument("--large", action="store_true")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--checkpoint")
    p.add_argument("--cache-dir")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT))
    import bench
    import torch

    ckpt = bench.resolve_checkpoint(args)
    if args.peak:
        return peak(args.peak, ckpt, args)
    if args.floor:
        return floor(args.floor, ckpt, args)
    if args.saved:
        saved = saved_for_backward(args.saved, ckpt, args)
        print(f"{args.saved}: {sum(saved.values()):.2f} GB kept for the backward")
        print("\n".join(f"- {kind}: {gb:.3f} GB" for kind, gb in saved.items()))
        return None
    torch.set_num_threads(args.threads)
    result = rotation(ckpt, args)
    peaks = []
    if not args.no_peaks:
        forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--no-peaks"]
        for name in PEAK_VARIANTS:
            out = subprocess.run([sys.executable, __file__, *forwarded, "--peak", name], capture_output=True,
                                 text=True, check=True)  # fmt: skip
            peaks.append(json.loads(out.stdout.strip().splitlines()[-1]))
    report(result, peaks, args, ckpt)


if __name__ == "__main__":
    main()
