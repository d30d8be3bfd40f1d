"""Samplers: schedule builders and denoising loops, as plain functions.

Place in the AudioLDM 2 data flow: the pipeline draws Gaussian latents x_T (B, 8, t, 16), wraps the UNet,
classifier-free guidance and both text conditions into a denoiser closure ``model(x, t) -> model_output``,
and hands both to a sampler here; the sampler returns x_0 for the VAE. Samplers never see the conditions.

    sched = ddim_schedule(cfg, steps)       # or dpm_schedule(cfg, steps, karras=...)
    x = sample_ddim(model, x, sched, eta=0.0, generator=g, callback=cb)
    x = sample("dpmpp-2m", model, x, cfg, steps)   # the same, chosen by name (``SAMPLERS``)

Both reproduce diffusers 0.42.1 to the bit, as ``AudioLDM2Pipeline`` drives them:
- ``DDIMScheduler`` with the hub config (scaled-linear betas 0.0015..0.0195, "leading" spacing,
  ``steps_offset`` 1, ``set_alpha_to_one`` false, epsilon prediction), ``eta`` included;
- ``DPMSolverMultistepScheduler.from_config(<that DDIM config>)``: the DDIM fields it knows (betas, spacing,
  offset, prediction type) plus its own defaults: order 2, "dpmsolver++", "midpoint", ``lower_order_final``,
  ``final_sigmas_type="zero"``, no ``lambda_min_clipped``; optionally ``use_karras_sigmas=True``.

Both are variance-preserving: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, so diffusers'
``init_noise_sigma`` is 1.0 for both (the initial latents are plain N(0, I) noise, see ``randn``) and
``scale_model_input`` is the identity (the UNet sees x_t as is). Nothing here scales either; that is the
whole equivalent.

Numerics follow diffusers' operation by operation: the per-step scalars (abar, sigma, lambda) are 0-dim
float32 CPU tensors computed one at a time, in the same order, so every step matches ``scheduler.step`` bit
for bit; timestep arithmetic uses numpy float64 like diffusers, so round-half-even ties fall the same way.

Quirks of the reference kept on purpose:
- DDIM steps from abar[t] to abar[t - T // steps] whatever the spacing, not to the next timestep of the
  schedule (the two agree only for "leading" spacing).
- DPM-Solver's "leading" spacing divides T by ``steps + 1``, not ``steps``: its timesteps differ from DDIM's.
- With Karras sigmas the solver runs on the Karras sigmas, and the UNet is given the nearest integer
  timestep (log-sigma interpolation, rounded); at many steps several UNet timesteps repeat.

Refused with a ``ValueError`` where diffusers goes wrong (mostly silently): a schedule whose timesteps leave
[0, T) or repeat (DDIM "leading" at 1000 steps asks for t=1000, an IndexError in diffusers; DPM "leading"
at 999/1000 steps; DPM "linspace" at 1000 steps), and "trailing" step counts where numpy's float ``arange`` overshoots and appends
a spurious timestep -1 (61, 103, 121, ... steps for T=1000); ``eta`` outside [0, 1].

Left out on purpose: the other diffusers options (thresholding, clipping, "sample" prediction, SDE variants,
orders 1 and 3, other sigma spacings), ``set_timesteps``/``step`` state, ``return_dict``, training helpers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .config import SchedulerConfig

__all__ = [
    "Denoiser",
    "Callback",
    "DDIMSchedule",
    "DPMSchedule",
    "SAMPLERS",
    "alphas_cumprod",
    "ddim_schedule",
    "dpm_schedule",
    "randn",
    "sample",
    "sample_ddim",
    "sample_dpmpp_2m",
]

Denoiser = Callable[[Tensor, Tensor], Tensor]  # (x_t, t as a 0-dim int64 tensor) -> eps or v prediction
Callback = Callable[[int, Tensor, Tensor], None]  # (step index, t, x after the step)
Generators = torch.Generator | list[torch.Generator] | None

SAMPLERS: dict[str, str] = {
    "ddim": "DDIM (Song et al. 2021); eta=0 deterministic, eta=1 DDPM-like; the AudioLDM 2 default",
    "dpmpp-2m": "DPM-Solver++(2M) (Lu et al. 2022), multistep second order",
    "dpmpp-2m-karras": "DPM-Solver++(2M) on the Karras et al. 2022 sigma spacing (rho=7)",
}


@dataclass(frozen=True)
class DDIMSchedule:
    timesteps: Tensor  # (N,) int64, descending: the t given to the UNet at step i
    alphas_cumprod: Tensor  # (N,) float32: abar at timesteps[i]
    alphas_cumprod_prev: Tensor  # (N,) float32: abar step i lands on (at t - T // N; the final abar if < 0)
    prediction_type: str  # "epsilon" or "v_prediction"


@dataclass(frozen=True)
class DPMSchedule:
    timesteps: Tensor  # (N,) int64: the t given to the UNet at step i
    sigmas: Tensor  # (N + 1,) float32, descending: sqrt((1 - abar) / abar) at each step, then 0
    prediction_type: str  # "epsilon" or "v_prediction"


# ------------------------------------------------------------------------------------------ schedules


def alphas_cumprod(cfg: SchedulerConfig) -> Tensor:
    """abar_t = prod_{s <= t} (1 - beta_s) for t in [0, T), float32 (T,), computed as diffusers does."""
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "scaled_linear":  # linear in sqrt(beta), the latent-diffusion schedule
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float32) ** 2
    elif cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
    else:
        raise ValueError(f"beta_schedule {cfg.beta_schedule!r} is not supported ('scaled_linear', 'linear')")
    return torch.cumprod(1.0 - betas, dim=0)


def _check_steps(cfg: SchedulerConfig, steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer):
        raise ValueError(f"steps must be an integer, got {steps!r}")
    if not 1 <= steps <= cfg.num_train_timesteps:
        raise ValueError(f"steps must be in [1, num_train_timesteps={cfg.num_train_timesteps}], got {steps}")


def _check_timesteps(t: np.ndarray, cfg: SchedulerConfig, steps: int, sampler: str) -> None:
    """Refuse the schedules that diffusers builds wrong rather than copy them (see the module docstring)."""
    where = f"{sampler} with {steps} steps and {cfg.timestep_spacing!r} spacing"
    if len(t) != steps:  # "trailing": float arange(T, 0, -T / steps) overshoots and yields one more, -1
        raise ValueError(f"{where}: the reference schedule has {len(t)} timesteps; choose another step count")
    if t.min() < 0 or t.max() >= cfg.num_train_timesteps:
        raise ValueError(f"{where} asks for timesteps outside [0, {cfg.num_train_timesteps}): {t.max()}")
    if len(np.unique(t)) != len(t):
        raise ValueError(f"{where} repeats timesteps; choose fewer steps")


def ddim_schedule(cfg: SchedulerConfig, steps: int) -> DDIMSchedule:
    """DDIM's timesteps and the abar each step goes from and to (``DDIMScheduler.set_timesteps``)."""
    _check_steps(cfg, steps)
    T = cfg.num_train_timesteps
    if cfg.timestep_spacing == "leading":  # 0, r, 2r, ... shifted by steps_offset (1 on the hub)
        t = np.arange(0, steps)[::-1] * (T // steps) + cfg.steps_offset
    elif cfg.timestep_spacing == "trailing":  # T-1, T-1-r, ... with r = T / steps (float)
        t = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    elif cfg.timestep_spacing == "linspace":
        t = np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64)
    else:
        raise ValueError(f"timestep_spacing {cfg.timestep_spacing!r} is not supported")
    _check_timesteps(t, cfg, steps, "DDIM")

    timesteps = torch.from_numpy(t.astype(np.int64))
    abar = alphas_cumprod(cfg)
    # Before t=0 there is no abar; the hub's set_alpha_to_one=false reuses abar[0] (DDIM paper: 1).
    final = torch.tensor(1.0) if cfg.set_alpha_to_one else abar[0]
    prev = timesteps - T // steps  # diffusers' rule for every spacing (see the module docstring)
    abar_prev = torch.where(prev >= 0, abar[prev.clamp(min=0)], final)
    return DDIMSchedule(timesteps, abar[timesteps], abar_prev, cfg.prediction_type)


def _sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> float:
    """The fractional timestep whose sigma is ``sigma``: linear interpolation in log sigma."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    low = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def dpm_schedule(cfg: SchedulerConfig, steps: int, karras: bool = False) -> DPMSchedule:
    """DPM-Solver's timesteps and sigmas (``DPMSolverMultistepScheduler.set_timesteps``).

    ``karras=True`` spaces the sigmas as Karras et al. 2022, eq. (5), with rho=7 between the training
    schedule's extremes, and ignores ``timestep_spacing``.
    """
    _check_steps(cfg, steps)
    T = cfg.num_train_timesteps
    abar = alphas_cumprod(cfg)
    sigmas = (((1 - abar) / abar) ** 0.5).numpy()  # (T,) float32, increasing in t
    if karras:
        rho = 7.0
        ramp = np.linspace(0, 1, steps)
        min_inv_rho, max_inv_rho = float(sigmas[0]) ** (1 / rho), float(sigmas[-1]) ** (1 / rho)
        sig = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho  # float64, descending
        log_sigmas = np.log(sigmas)
        # One call per sigma, as diffusers does (a vectorised log may differ in the last bit).
        # Repeated timesteps are harmless here: the solver steps between distinct sigmas.
        t = np.array([_sigma_to_t(s, log_sigmas) for s in sig]).round().astype(np.int64)
    else:
        if cfg.timestep_spacing == "leading":  # steps + 1 points, the last (t=0) dropped
            t = np.arange(0, steps + 1)[::-1][:-1] * (T // (steps + 1)) + cfg.steps_offset
        elif cfg.timestep_spacing == "trailing":
            t = np.arange(T, 0, -T / steps).round().astype(np.int64) - 1
        elif cfg.timestep_spacing == "linspace":
            t = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
        else:
            raise ValueError(f"timestep_spacing {cfg.timestep_spacing!r} is not supported")
        _check_timesteps(t, cfg, steps, "DPM-Solver++")
        sig = sigmas[t]  # diffusers interpolates at integer t: the table entries themselves
    # final_sigmas_type="zero": the last step lands on sigma=0, i.e. on the clean x_0.
    sig = np.concatenate([sig, [0.0]]).astype(np.float32)
    return DPMSchedule(torch.from_numpy(t.astype(np.int64)), torch.from_numpy(sig), cfg.prediction_type)


# -------------------------------------------------------------------------------------------- noise


def randn(
    shape: tuple[int, ...],
    generator: Generators = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """N(0, I) noise drawn exactly as diffusers' ``randn_tensor``, so one generator gives the same numbers.

    Used for the initial latents x_T (diffusers' ``init_noise_sigma`` is 1: no scaling) and for DDIM's
    eta noise. A CPU generator draws on the CPU and the result moves to ``device``; a list of generators
    draws one sample of the batch from each, in order.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    rand_device = device
    if generator is not None:
        gen_type = (generator[0] if isinstance(generator, list) else generator).device.type
        if gen_type == "cpu":
            rand_device = torch.device("cpu")
        elif gen_type != device.type:
            raise ValueError(f"cannot draw a {device.type} tensor from a {gen_type} generator")
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        one = (1, *shape[1:])
        draws = [torch.randn(one, generator=g, device=rand_device, dtype=dtype) for g in generator]
        return torch.cat(draws, dim=0).to(device)
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


# ------------------------------------------------------------------------------------------ samplers


def sample_ddim(
    model: Denoiser,
    x: Tensor,
    sched: DDIMSchedule,
    eta: float = 0.0,
    generator: Generators = None,
    callback: Callback | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12), sigma_t = eta * eq. 16.

    ``x`` is x_T ~ N(0, I). With eta > 0 each step draws its noise like ``DDIMScheduler.step`` (shape,
    dtype and device of the model output, one draw per step), so the pipeline's generator reproduces it.
    """
    if not (isinstance(eta, int | float) and 0.0 <= eta <= 1.0):
        raise ValueError(f"eta must be a number in [0, 1] (0: DDIM, 1: DDPM-like), got {eta!r}")
    timesteps = sched.timesteps.to(x.device)
    for i, t in enumerate(timesteps):
        out = model(x, t)
        a_t, a_prev = sched.alphas_cumprod[i], sched.alphas_cumprod_prev[i]  # 0-dim, as diffusers indexes
        b_t = 1 - a_t
        if sched.prediction_type == "epsilon":
            x0 = (x - b_t ** (0.5) * out) / a_t ** (0.5)
            eps = out
        else:  # v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022)
            x0 = (a_t**0.5) * x - (b_t**0.5) * out
            eps = (a_t**0.5) * out + (b_t**0.5) * x
        variance = ((1 - a_prev) / b_t) * (1 - a_t / a_prev)  # eq. 16 squared, without eta
        std = eta * variance ** (0.5)
        x = a_prev ** (0.5) * x0 + (1 - a_prev - std**2) ** (0.5) * eps
        if eta > 0:
            x = x + std * randn(out.shape, generator, out.device, out.dtype)
        if callback is not None:
            callback(i, t, x)
    return x


def _alpha_sigma(sigma: Tensor) -> tuple[Tensor, Tensor]:
    """From the VE noise level sigma = sqrt((1 - abar) / abar) to the VP pair (sqrt(abar), sqrt(1 - abar))."""
    alpha_t = 1 / (sigma**2 + 1) ** 0.5
    return alpha_t, sigma * alpha_t


def sample_dpmpp_2m(
    model: Denoiser, x: Tensor, sched: DPMSchedule, callback: Callback | None = None
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): multistep, data prediction.

    First order (= DDIM) on the first step and on the last (which lands on sigma=0), second order
    ("midpoint" form, diffusers' default) in between. ``x`` is x_T ~ N(0, I); no stochasticity.
    """
    timesteps = sched.timesteps.to(x.device)
    n = len(timesteps)
    x0_prev = lambda_prev = None
    for i, t in enumerate(timesteps):
        out = model(x, t)
        alpha_s, sigma_s = _alpha_sigma(sched.sigmas[i])  # 0-dim float32, as diffusers indexes
        alpha_t, sigma_t = _alpha_sigma(sched.sigmas[i + 1])
        if sched.prediction_type == "epsilon":
            x0 = (x - sigma_s * out) / alpha_s
        else:
            x0 = alpha_s * x - sigma_s * out
        lambda_s = torch.log(alpha_s) - torch.log(sigma_s)  # half log-SNR
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)  # +inf at sigma=0: exp(-h) = 0 below
        h = lambda_t - lambda_s
        # diffusers steps in float32 and casts back to the model output's dtype
        x_next = sigma_t / sigma_s * x.to(torch.float32) - alpha_t * (torch.exp(-h) - 1.0) * x0
        if 0 < i < n - 1:  # second-order correction from the previous x0 (lower order at both ends)
            r = (lambda_s - lambda_prev) / h
            d1 = 1.0 / r * (x0 - x0_prev)
            x_next = x_next - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
        x = x_next.to(x0.dtype)
        x0_prev, lambda_prev = x0, lambda_s
        if callback is not None:
            callback(i, t, x)
    return x


def sample(
    name: str,
    model: Denoiser,
    x: Tensor,
    cfg: SchedulerConfig,
    steps: int,
    *,
    eta: float = 0.0,
    generator: Generators = None,
    callback: Callback | None = None,
) -> Tensor:
    """Build the schedule for sampler ``name`` (a key of ``SAMPLERS``) and run it from x_T = ``x``."""
    if name == "ddim":
        return sample_ddim(model, x, ddim_schedule(cfg, steps), eta, generator, callback)
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    if eta != 0:  # the diffusers pipeline silently ignores eta here
        raise ValueError(f"eta is a DDIM option; {name!r} is deterministic (got eta={eta!r})")
    return sample_dpmpp_2m(model, x, dpm_schedule(cfg, steps, karras=name.endswith("-karras")), callback)
