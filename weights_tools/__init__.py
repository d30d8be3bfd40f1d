"""Developer tools for AudioLDM 2 checkpoints: ``audioldm2-weights fetch|inspect|convert|parity|make-tiny``.

Not imported by the runtime package. ``parity`` and ``make-tiny`` need the test extra (diffusers,
transformers); the others need only what ``audioldm2_core`` needs.
"""


class ToolError(Exception):
    """Bad input or a refused operation: the CLI prints the message on one line and exits with status 2."""
