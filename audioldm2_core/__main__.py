"""The ``audioldm2`` command (also ``python -m audioldm2_core``): one prompt (``cli.py``), or with
``--prompts-file`` / ``--merge-manifests`` a dataset (``synthesis.py``). Each program parses its own flags."""

from __future__ import annotations

import sys

__all__ = ["main"]

_DATASET_FLAGS = ("--prompts-file", "--merge-manifests")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a.split("=", 1)[0] in _DATASET_FLAGS for a in argv):
        from .synthesis import main as program
    else:
        from .cli import main as program
    return program(argv)


if __name__ == "__main__":
    sys.exit(main())
