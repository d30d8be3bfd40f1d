"""The OpenVINO route as a benchmark peer: diffusers, diffusers with its UNet, VAE decoder and vocoder run by
OpenVINO, and ours, called in rotation in one process on the same weights.

    pip install openvino                                   # optional: never needed by the package or its tests
    python benchmarks/openvino_ab.py                       # the issue's workload (10.24 s, 20 DPM++ steps), 3 rounds
    python benchmarks/openvino_ab.py --cpu-attention       # + ours with audioldm2_core.fast.cpu_attention
    python benchmarks/openvino_ab.py --dtype bfloat16 --cpu-attention   # the bfloat16 routes (see below)
    python benchmarks/openvino_ab.py --tiny --rounds 1     # smoke run on a tiny random checkpoint
    python benchmarks/openvino_ab.py --rounds 0 --profile 3   # OpenVINO's per-node profile only (see below)

The conversion is the one OpenVINO's AudioLDM 2 notebook (openvino_notebooks, "270-sound-generation") does:
the three heavy parts of diffusers' ``AudioLDM2Pipeline`` (the UNet, ``vae.decode`` and the HiFi-GAN vocoder)
traced with ``openvino.convert_model`` from example inputs of the run's shapes, saved as IR, compiled for
the CPU and put back into the diffusers pipeline behind thin wrappers; the text encoders, the projection and
GPT-2 stay in PyTorch, as in the notebook. Two variants:

- "openvino, notebook": the IR saved with OpenVINO's default weight compression to float16 and compiled
  with the default CPU configuration (whose inference precision is bfloat16 on CPUs with native bfloat16),
  i.e. what a user following the notebook runs;
- "openvino, f32": the IR kept in float32 and compiled with ``INFERENCE_PRECISION_HINT=f32``: the exact
  route, the fair peer of a float32 PyTorch run.

Both use ``INFERENCE_NUM_THREADS`` = ``--threads``, the torch thread count of the others. ``--dtype bfloat16``
compares the reduced-precision routes instead: diffusers and ours in bfloat16 beside the notebook's variant
(bfloat16 inference where the CPU has it natively), each waveform's error measured against diffusers' float32
one. Held to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``, which OpenVINO's oneDNN obeys), the notebook variant is given
``INFERENCE_PRECISION_HINT=f32``: OpenVINO reads the CPU's own bfloat16 flags, and the bfloat16 it would pick
cannot compile under the hold (on a real AVX2 CPU it picks f32 itself). **The hold does not reach the f32
variant's linears**: OpenVINO runs float32 FullyConnected layers without fused post-ops on MLAS, which picks its
kernels from the CPU's own flags (on an AVX-512 CPU held to AVX2 it measured 436 GFLOP/s, twice oneDNN's AVX2
GEMM, ``gemm_mlas_f32`` in OpenVINO's per-node profile; ~27% of its UNet call). Held to AVX2, the f32 row is
then faster than OpenVINO on a real AVX2 CPU (issue 21's Zen 3: 1.04x diffusers, against 1.31-1.39x held here);
the notebook variant (float16 weights, f32 inference) runs its linears on oneDNN's AVX2 brgemm and is the
closer proxy (a UNet call within 2% of ours held to AVX2). The script prints this under a hold. The int8 (nncf)
variant of the notebook
is left out: it needs nncf and a calibration set, and loses accuracy.
Reported: each implementation's median generation time, its per-round ratio to diffusers, and its waveform's
relative L2 error against diffusers'. Conversion time and memory are printed but are not part of the rounds.
``--profile CALLS`` adds OpenVINO's own per-node profile (``PERF_COUNT``) of each variant's UNet call, VAE decode
and vocoder call on the run's inputs: milliseconds per call by node type and the kernel that ran it (e.g.
``FullyConnected`` on ``gemm_mlas_f32`` or ``brgemm_avx2_f32``), beside ``profile_ops.py``'s tables of diffusers
and ours; with ``--rounds 0`` it is all that runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class _NoStageTimes:
    def wrap(self, target: object, method: str, stage: str) -> None:
        pass


def _openvino_parts(pipe, spec: dict, out_dir: Path, threads: int, f32: bool):
    """The UNet, VAE decoder and vocoder of diffusers' ``pipe`` as OpenVINO models behind torch modules."""
    import numpy as np
    import openvino as ov
    import torch

    from audioldm2_core.pipeline import audio_shape

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads}
    held = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if f32 or (held and "AVX512" not in held and "AMX" not in held):
        # f32 variant; or oneDNN held below AVX-512 (how an AVX2-only CPU is emulated here): OpenVINO reads the
        # CPU's own bfloat16 flags and picks bfloat16, whose primitives the hold removes (compiling fails), so it
        # is given the f32 it picks itself on a CPU without native bfloat16
        config["INFERENCE_PRECISION_HINT"] = "f32"

    # Example inputs of the run's shapes: under guidance the UNet sees a batch of 2.
    factor = np.prod(pipe.vocoder.config.upsample_rates) / pipe.vocoder.config.sampling_rate
    height, _ = audio_shape(spec["length"], factor, pipe.vae_scale_factor, pipe.vocoder.config.sampling_rate)
    bins = pipe.vocoder.config.model_in_dim
    lat = torch.randn(
        2, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, bins // pipe.vae_scale_factor
    )
    lm_states = torch.randn(2, 8, pipe.language_model.config.n_embd)
    t5_states = torch.randn(2, 7, pipe.text_encoder_2.config.d_model)
    t5_mask = torch.ones(2, 7, dtype=torch.int64)

    class UNetWrapper(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(
            self, sample, timestep, encoder_hidden_states, encoder_hidden_states_1, encoder_attention_mask_1
        ):
            return self.unet(
                sample,
                timestep,
                encoder_hidden_states=encoder_hidden_states,
                encoder_hidden_states_1=encoder_hidden_states_1,
                encoder_attention_mask_1=encoder_attention_mask_1,
                return_dict=False,
            )[0]

    class VAEDecoderWrapper(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, latents):
            return self.vae.decode(latents, return_dict=False)[0]

    profiled = {}  # for --profile: each part's IR, its compile configuration and inputs

    def convert(part: str, name: str, module: torch.nn.Module, example: tuple) -> ov.CompiledModel:
        t0 = time.perf_counter()
        with torch.no_grad():
            model = ov.convert_model(module.eval(), example_input=example)
        path = out_dir / f"{name}.xml"
        ov.save_model(model, path, compress_to_fp16=not f32)
        compiled = core.compile_model(core.read_model(path), "CPU", config)
        print(f"  {name}: converted and compiled in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        profiled[part] = (path, config, [x.numpy() for x in example])
        return compiled

    unet = convert(
        "UNet", "unet", UNetWrapper(pipe.unet), (lat, torch.tensor(999), lm_states, t5_states, t5_mask)
    )
    vae = convert("VAE decoder", "vae_decoder", VAEDecoderWrapper(pipe.vae), (lat[:1],))
    vocoder = convert("vocoder", "vocoder", pipe.vocoder, (torch.randn(1, height, bins),))

    def run(compiled: ov.CompiledModel, *inputs: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(compiled([x.numpy() for x in inputs])[0].copy())

    class OVUNet(torch.nn.Module):  # what diffusers' pipeline reads of its UNet
        config, dtype, device = pipe.unet.config, torch.float32, torch.device("cpu")

        def forward(self, sample, t, encoder_hidden_states, encoder_hidden_states_1, encoder_attention_mask_1,
                    return_dict=False):  # fmt: skip
            t = torch.as_tensor(t).reshape(())
            return (
                run(
                    unet, sample, t, encoder_hidden_states, encoder_hidden_states_1, encoder_attention_mask_1
                ),
            )

    class OVVAE(torch.nn.Module):
        config, dtype, device = pipe.vae.config, torch.float32, torch.device("cpu")

        def decode(self, latents, return_dict=True):
            from types import SimpleNamespace

            return SimpleNamespace(sample=run(vae, latents))

    class OVVocoder(torch.nn.Module):
        config, dtype, device = pipe.vocoder.config, torch.float32, torch.device("cpu")

        def forward(self, mel):
            return run(vocoder, mel)

    return (OVUNet(), OVVAE(), OVVocoder()), profiled


def node_profile(xml: Path, config: dict, inputs: list, calls: int) -> dict[tuple[str, str], float]:
    """OpenVINO's own profile of one model: {(node type, kernel): milliseconds per call}, the mean over
    ``calls`` inferences after a warm-up, compiled as the rotation compiles it plus ``PERF_COUNT``."""
    import openvino as ov

    compiled = ov.Core().compile_model(xml, "CPU", {**config, "PERF_COUNT": True})
    request = compiled.create_infer_request()
    request.infer(inputs)
    ms: dict[tuple[str, str], float] = {}
    for _ in range(calls):
        request.infer(inputs)
        for info in request.profiling_info:
            if info.status == ov.ProfilingInfo.Status.EXECUTED:
                key = (info.node_type, info.exec_type)
                ms[key] = ms.get(key, 0.0) + info.real_time.total_seconds() * 1e3 / calls
    return ms


def node_table(ms: dict[tuple[str, str], float], top: int = 12) -> list[str]:
    """``node_profile``'s result as a markdown table, the slowest ``top`` (node type, kernel) pairs first and
    the rest summed, with the total."""
    total = sum(ms.values())
    ranked = sorted(ms.items(), key=lambda kv: -kv[1])
    rows = ranked[:top]
    if len(ranked) > top:
        rows.append((("other", f"{len(ranked) - top} pairs"), sum(t for _, t in ranked[top:])))
    lines = ["| node type | kernel | ms per call | share |", "|---|---|---:|---:|"]
    for (node, kernel), t in rows:
        lines.append(f"| {node} | {kernel} | {t:.1f} | {t / total:.0%} |")
    lines.append(f"| total | | {total:.1f} | 100% |")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="generations per implementation (default 3)")
    p.add_argument("--steps", type=int, default=20, help="sampler steps (default 20)")
    p.add_argument("--sampler", default="dpmpp-2m", choices=["ddim", "dpmpp-2m", "dpmpp-2m-karras"])
    p.add_argument("--length", type=float, default=10.24, help="audio length in seconds (default 10.24)")
    p.add_argument("--guidance", type=float, default=3.5, help="guidance scale (default 3.5)")
    p.add_argument("--threads", type=int, default=2, help="torch and OpenVINO threads (default 2)")
    p.add_argument("--large", action="store_true", help="the cvssp/audioldm2-large UNet")
    p.add_argument("--tiny", action="store_true", help="tiny random checkpoint (smoke run)")
    p.add_argument("--checkpoint", help="a pipeline folder instead of the built random checkpoint")
    p.add_argument("--cache-dir", help="where bench.py builds its checkpoint")
    p.add_argument(
        "--cpu-attention", action="store_true", help="+ ours with audioldm2_core.fast.cpu_attention"
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="diffusers' and ours")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="CALLS",
        help="+ OpenVINO's per-node profile over CALLS calls",
    )
    args = p.parse_args(argv)
    args.device = "cpu"
    if args.steps < 1 or args.rounds < (0 if args.profile else 1) or args.profile < 0:
        p.error("--steps and --rounds must be at least 1 (--rounds 0 with --profile: the profile only)")
    try:
        import openvino  # noqa: F401
    except ImportError:
        p.error("this benchmark needs OpenVINO: pip install openvino")

    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT))
    import bench
    import numpy as np
    import openvino
    import torch

    torch.set_num_threads(args.threads)
    ckpt = bench.resolve_checkpoint(args)
    spec = bench.run_spec(args, ckpt) | dict(compile=False, low_memory=False)
    dtype = getattr(torch, args.dtype)
    diffusers_pipe, diffusers = bench._diffusers(spec, torch.float32, _NoStageTimes())  # OpenVINO's source
    diffusers_own = diffusers
    if dtype != torch.float32:  # diffusers itself in bfloat16, beside the float32 pipeline the IR comes from
        _, diffusers_own = bench._diffusers(spec, dtype, _NoStageTimes())
    ours_pipe, ours = bench._ours(spec, dtype, _NoStageTimes()) if args.rounds else (None, None)
    from audioldm2_core import fast

    ours_unets = {}  # "ours" and "ours, cpu_attention": their UNets, on the same weights
    if args.rounds:
        ours_unets["ours"] = ours_unets["ours, cpu_attention"] = ours_pipe.unet
    if args.rounds and args.cpu_attention:  # the kernel is built here if it is not yet, before any timing
        ours_unets["ours, cpu_attention"] = bench.same_weights(ours_pipe.unet)
        fast.optimize(ours_unets["ours, cpu_attention"], cpu_attention=True)
    torch_parts = (diffusers_pipe.unet, diffusers_pipe.vae, diffusers_pipe.vocoder)
    ov_parts, profiled, nodes = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        variants = (("openvino, notebook", False), ("openvino, f32", True))
        for name, f32 in variants if dtype == torch.float32 else variants[:1]:
            print(f"{name}:", file=sys.stderr)
            folder = Path(tmp) / name.replace(", ", "-")
            folder.mkdir()
            ov_parts[name], profiled[name] = _openvino_parts(diffusers_pipe, spec, folder, args.threads, f32)
        print(f"peak RSS after conversions: {bench._peak_rss_mb():.0f} MB", file=sys.stderr)
        for name, parts in profiled.items() if args.profile else ():
            for part, (xml, config, inputs) in parts.items():
                nodes[name, part] = node_profile(xml, config, inputs, args.profile)

    def generate(name: str, **overrides):
        parts = ov_parts.get(name, torch_parts)
        # diffusers' pipeline keeps its modules in its config-registered attributes; set them directly
        for attr, module in zip(("unet", "vae", "vocoder"), parts, strict=True):
            diffusers_pipe.__dict__[attr] = module
        if name.startswith("ours"):
            ours_pipe.unet = ours_unets[name]
        call = ours if name.startswith("ours") else diffusers_own if name == "diffusers" else diffusers
        return np.asarray(call(**overrides), dtype=np.float64)

    names = ["diffusers", *ov_parts, "ours", *(["ours, cpu_attention"] if args.cpu_attention else [])]
    times, waves = bench.rotate(names, generate, args.rounds) if args.rounds else ({}, {})

    ref = waves.get("diffusers")
    if args.rounds and dtype != torch.float32:  # errors against diffusers' float32 pipeline, once, untimed
        for attr, module in zip(("unet", "vae", "vocoder"), torch_parts, strict=True):
            diffusers_pipe.__dict__[attr] = module
        ref = np.asarray(diffusers(), dtype=np.float64)
    print(
        f"{bench.weights_description(args, ckpt)}, {args.length} s, {args.steps} x {args.sampler}, "
        f"guidance {args.guidance}, {args.dtype}, {args.threads} threads, one process, {args.rounds} rounds, "
        f"OpenVINO {openvino.__version__}, torch {torch.__version__}"
    )
    print(f"CPU: {bench.cpu_description()}")
    held = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    if held and "openvino, f32" in ov_parts:
        print(
            f"Note: ONEDNN_MAX_CPU_ISA={held} does not hold OpenVINO's MLAS, which runs the f32 variant's linears "
            "with this CPU's own instruction set: the f32 row overstates OpenVINO on a CPU without it (the module "
            "docstring)."
        )
    if times:
        print()
        print("\n".join(bench.rotation_table(times, waves, ref, "rel. error vs diffusers float32")))
    for (name, part), ms in nodes.items():
        print(f"\n{name}: {part}, OpenVINO's per-node profile (PERF_COUNT), mean of {args.profile} calls\n")
        print("\n".join(node_table(ms)))


if __name__ == "__main__":
    main()
