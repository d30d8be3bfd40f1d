"""``python -m audioldm2_core.train``: the ``audioldm2-train`` command (``train/cli.py``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
