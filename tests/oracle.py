"""The parity oracle for the tests; it lives in ``weights_tools/reference.py``, shared with
``audioldm2-weights parity``."""

from weights_tools.reference import reference_pipeline, run_reference

__all__ = ["reference_pipeline", "run_reference"]
