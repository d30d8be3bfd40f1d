"""Small shared test helpers."""

from __future__ import annotations

import numpy as np
import torch

from audioldm2_core.fast import cpu_attention


def rel_err(ours, ref) -> float:
    """Relative L2 error ||ours - ref|| / ||ref|| in float64 (0 when both are exactly zero)."""
    a = torch.as_tensor(np.asarray(ours) if not torch.is_tensor(ours) else ours).double()
    b = torch.as_tensor(np.asarray(ref) if not torch.is_tensor(ref) else ref).double()
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != reference {tuple(b.shape)}"
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff / denom if denom > 0 else diff


# audioldm2_core.fast.cpu_attention is built for AVX-512 or AVX2 and refuses other CPUs with a clear error; the tests
# that run the kernel need such a CPU (this workplace's have one), those of the refusal run everywhere.
CPU_KERNEL = cpu_attention.supported()
