"""``python -m weights_tools SUBCOMMAND ...``: the same as ``audioldm2-weights``."""

import sys

from weights_tools.cli import main

sys.exit(main())
