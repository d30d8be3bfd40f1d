"""The speech checkpoints' GPT-2 generation alone: transformers' GPT-2 in diffusers' loop against ours, in turn.

    python benchmarks/gpt2_ab.py                                       # full size: 512 states, one round
    python benchmarks/gpt2_ab.py --rounds 3 --new-tokens 512
    python benchmarks/gpt2_ab.py --checkpoint /path/to/anhnct/audioldm2_gigaspeech

What it measures: ``max_new_tokens`` (512 for ``anhnct/audioldm2_gigaspeech`` / ``_ljspeech``) GPT-2 steps for
one prompt under classifier-free guidance, which dominates the time of a short utterance. The GPT-2 weights
are those of ``--checkpoint``'s ``language_model/`` (default: the full-size random checkpoint ``bench.py``
builds, whose GPT-2 has the speech checkpoints' size: 12 layers of 768); its inputs are random 768-d vectors
of the speech shape, not a real projection's output (the time does not depend on the values):

    positive  [CLAP sos, CLAP, eos, sos_1, 310 phoneme states (--phonemes valid, the rest padding), eos_1]
    negative  [CLAP sos, CLAP, eos, sos_1, 310 zero phoneme states (all masked, float mask), eos_1]

Variants, each timed on the same inputs, in rotation (so that this machine's drift hits all alike):
- "diffusers": transformers' ``GPT2LMHeadModel`` (the file loaded as ``weights_tools/reference.py`` loads it)
  driven by diffusers' ``AudioLDM2Pipeline.generate_language_model``, called twice with one row each, as
  diffusers' ``encode_prompt`` does for the positive and the negative halves;
- "ours, plain": ``audioldm2_core.gpt2.generate`` (KV cache, both halves in one batch of two), the plain
  model; "ours": the same after ``fast.optimize`` (what the pipeline runs by default).
Errors are against diffusers' states, [negative, positive] stacked.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = ROOT / "benchmarks" / ".cache" / "audioldm2-random"


def speech_inputs(dim: int, phonemes: int, max_length: int = 310, seed: int = 0):
    """Random GPT-2 inputs (2, 3 + 1 + max_length + 1, dim) of the speech shape and their masks: row 0 the
    negative half (phoneme positions masked, a float mask as diffusers makes it), row 1 the positive."""
    import torch

    g = torch.Generator().manual_seed(seed)
    length = 3 + 1 + max_length + 1
    x = torch.randn(2, length, dim, generator=g)
    x[0, 4 : 4 + max_length] = 0  # the negative branch's zero phoneme states (before projection: not zero
    # after it, but the value does not change the time)
    positive = torch.ones(length, dtype=torch.long)
    positive[4 + phonemes : 4 + max_length] = 0
    negative = torch.ones(length)
    negative[4 : 4 + max_length] = 0
    return x, negative, positive


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint", default=str(DEFAULT_CHECKPOINT), help="pipeline folder with language_model/"
    )
    p.add_argument("--new-tokens", type=int, default=512, help="GPT-2 states to generate (default 512)")
    p.add_argument("--phonemes", type=int, default=60, help="valid phoneme positions of the positive row")
    p.add_argument("--rounds", type=int, default=1, help="generations per variant, in rotation (default 1)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.new_tokens < 1 or not 0 <= args.phonemes <= 310:
        p.error("--rounds and --new-tokens must be at least 1, --phonemes within 0..310")

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench
    import torch
    from diffusers import AudioLDM2Pipeline
    from transformers import GPT2LMHeadModel

    from audioldm2_core import fast, gpt2
    from audioldm2_core.loading import open_checkpoint

    torch.set_num_threads(args.threads)
    ckpt = Path(args.checkpoint)
    lm = GPT2LMHeadModel.from_pretrained(ckpt, subfolder="language_model", dtype=torch.float32).eval()
    plain = gpt2.load_gpt2(open_checkpoint(ckpt))
    ours = gpt2.load_gpt2(open_checkpoint(ckpt))  # a second load: "ours, plain" keeps the plain classes
    decisions = {"ours": fast.optimize(ours)}
    x, negative, positive = speech_inputs(plain.cfg.n_embd, args.phonemes)
    holder = SimpleNamespace(language_model=lm)  # what generate_language_model reads of the pipeline

    def diffusers_generate(n: int):
        halves = [
            AudioLDM2Pipeline.generate_language_model(
                holder, x[i : i + 1], attention_mask=m[None], max_new_tokens=n
            )
            for i, m in ((0, negative), (1, positive))
        ]
        return torch.cat(halves)

    mask = torch.stack([negative, positive.float()])  # one batch: the float mask, as torch.cat makes it
    impls = {
        "diffusers": diffusers_generate,
        "ours, plain": lambda n: gpt2.generate(plain, x, mask, n),
        "ours": lambda n: gpt2.generate(ours, x, mask, n),
    }
    times: dict[str, list[float]] = {name: [] for name in impls}
    outs = {}
    with torch.inference_mode():
        for run in impls.values():  # warm-up: page faults of the mapped weights, kernel set-up
            run(2)
        for _ in range(args.rounds):
            for name, run in impls.items():
                start = time.perf_counter()
                outs[name] = run(args.new_tokens)
                times[name].append(time.perf_counter() - start)

    print(
        f"GPT-2 of {ckpt} ({plain.cfg.n_layer} layers of {plain.cfg.n_embd}), float32, {args.threads} threads: "
        f"{args.new_tokens} states for a guidance batch of 2 from {x.shape[1]} inputs "
        f"({args.phonemes} valid phonemes), {args.rounds} round(s)"
    )
    print(f"CPU: {bench.cpu_description()}")
    print()
    print("\n".join(bench.decision_lines(decisions)) or "- none")
    print()
    outs = {name: out.float().numpy() for name, out in outs.items()}
    print("\n".join(bench.rotation_table(times, outs, outs["diffusers"], places=3)))


if __name__ == "__main__":
    main()
