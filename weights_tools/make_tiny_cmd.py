"""``audioldm2-weights make-tiny OUT [--variant V] [--seed 0] [--force]``: a tiny random checkpoint in the
official layout (``weights_tools.make_tiny``), written atomically like every output of these tools."""

from __future__ import annotations

import argparse
from pathlib import Path

from .files import atomic_output

VARIANTS = ("base", "large", "gigaspeech", "ljspeech")  # make_tiny.VARIANTS (imported lazily: diffusers)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="folder to write")
    p.add_argument("--variant", default="base", choices=VARIANTS, help="checkpoint shape (default: base)")
    p.add_argument("--seed", type=int, default=0, help="random seed for weights and tokenizers (default: 0)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    from .make_tiny import make_tiny  # needs the test extra (diffusers, transformers)

    out = Path(args.out).expanduser().absolute()
    with atomic_output(out, args.force) as tmp:
        make_tiny(tmp, variant=args.variant, seed=args.seed)
    print(out)
    return 0
