"""Gaussian noise drawn as diffusers draws it, so that one seeded generator gives the same numbers.

Every random draw of a generation goes through ``randn``: the initial latents x_T, SDEdit's and RePaint's
noise, the stochastic samplers' per-step noise and the VAE posterior's sample. Its shapes, dtypes, devices
and order are diffusers' ``randn_tensor`` (``utils/torch_utils.py``): a CPU generator draws on the CPU and
the result moves to the device; a list of generators draws one batch row from each, in order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import UsageError

__all__ = ["Generators", "randn"]

Generators = torch.Generator | list[torch.Generator] | None


def randn(
    shape: tuple[int, ...],
    generator: Generators = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """N(0, I) noise of ``shape`` drawn exactly as diffusers' ``randn_tensor``."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    rand_device = device
    if generator is not None:
        gen_type = (generator[0] if isinstance(generator, list) else generator).device.type
        if gen_type == "cpu":
            rand_device = torch.device("cpu")
        elif gen_type != device.type:
            raise UsageError(f"cannot draw a {device.type} tensor from a {gen_type} generator")
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise UsageError(f"{len(generator)} generators for a batch of {shape[0]}")
        one = (1, *shape[1:])
        draws = [torch.randn(one, generator=g, device=rand_device, dtype=dtype) for g in generator]
        return torch.cat(draws, dim=0).to(device)
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)
