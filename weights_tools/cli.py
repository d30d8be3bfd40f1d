"""``audioldm2-weights``: tools for AudioLDM 2 checkpoints (also ``python -m weights_tools``).

    audioldm2-weights fetch cvssp/audioldm2 [--revision REV]       download only the files we use
    audioldm2-weights inspect PATH_OR_REPO [--json]                 components, sizes, strict-load check
    audioldm2-weights convert SRC OUT [--dtype float16] [--force]   .bin -> .safetensors, dtype export
    audioldm2-weights parity PATH_OR_REPO [--steps 3] [--json]      this stack vs diffusers, stage by stage
    audioldm2-weights make-tiny OUT [--variant large]               a tiny random checkpoint for tests

Each subcommand is a module with ``add_arguments(parser)`` and ``run(args) -> exit status``. Exit status:
0 success, 1 a check failed (a parity stage, a component that does not load), 2 bad input (a one-line
message on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import sys

from audioldm2_core.errors import CheckpointError, ConfigError

from . import ToolError, convert, fetch, inspection, make_tiny_cmd, parity

COMMANDS = {
    "fetch": (fetch, "download a hub checkpoint, only the files this stack uses"),
    "inspect": (inspection, "list components, sizes and parameter counts; check strict loading"),
    "convert": (convert, "rewrite a checkpoint folder as safetensors, optionally in another dtype"),
    "parity": (parity, "compare this stack with diffusers on a checkpoint, stage by stage"),
    "make-tiny": (make_tiny_cmd, "write a tiny random checkpoint in the official layout"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="audioldm2-weights", description="Tools for AudioLDM 2 checkpoints.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = COMMANDS[args.command][0]
    try:
        return module.run(args)
    except (ToolError, CheckpointError, ConfigError, OSError) as e:
        message = " ".join(str(e).split())  # one line, whatever the exception's formatting
        print(f"audioldm2-weights {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"audioldm2-weights {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
