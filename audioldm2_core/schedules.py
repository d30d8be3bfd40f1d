"""Noise schedules: which timesteps the UNet sees and which noise levels a sampler steps between.

Place in the AudioLDM 2 data flow: ``samplers.py`` asks a builder here for the schedule of ``steps`` steps
on the checkpoint's training schedule (``scheduler/scheduler_config.json``, read by ``config.py``), then
loops over it. Every builder reproduces the ``set_timesteps`` of one diffusers 0.42.1 scheduler built with
``from_config(<that config>)``, to the bit; nothing here holds state.

Two parametrisations of the same forward process x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps:
- variance preserving (VP; DDIM, DDPM, PNDM, the DPM-Solver family): the table abar_t, or the VE noise level
  sigma_t = sqrt((1 - abar_t) / abar_t) from which alpha = 1 / sqrt(sigma^2 + 1) and sigma * alpha return;
- variance exploding (VE; Karras et al. 2022, k-diffusion; Euler, Heun, KDPM2, LMS): x / sqrt(abar_t)
  = x_0 + sigma_t eps. These samplers start from N(0, sigma_max^2) (``init_noise_sigma``) and divide the
  UNet's input by sqrt(sigma^2 + 1) to give it back the VP x_t it was trained on.

Timestep spacings, as diffusers names them (T = num_train_timesteps, N = steps):
- "leading": 0, r, 2r, ... with r = T // N (T // (N + 1) for the DPM family), plus ``steps_offset`` (the hub's);
- "trailing": T - 1, T - 1 - T / N, ... (float steps, rounded);
- "linspace": N points from 0 to T - 1, rounded (N + 1 points, the last dropped, for the DPM family).
The VE samplers keep fractional timesteps where they interpolate (KDPM2's midpoints, Karras sigmas): the
UNet's sinusoidal embedding takes any real t.

The conversions between the two (x_0 from an epsilon or v prediction in either form, the UNet's input from a
VE x, half log-SNR) are here too, once, for all samplers. Quirks of the reference kept on purpose are listed
at each builder; schedules diffusers builds wrong
(timesteps outside [0, T), repeated, or one too many from numpy's float ``arange``) are refused with a
``ValueError`` (see ``_check_timesteps``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .config import SchedulerConfig
from .errors import UnsupportedConfigError, UsageError, UsageTypeError

__all__ = [
    "DDIMSchedule",
    "DPMSchedule",
    "KSchedule",
    "PNDMSchedule",
    "alphas_cumprod",
    "ddim_schedule",
    "ddpm_schedule",
    "dpm_schedule",
    "k_schedule",
    "kdpm2_schedule",
    "pndm_schedule",
]


@dataclass(frozen=True)
class DDIMSchedule:  # DDIM and DDPM
    timesteps: Tensor  # (N,) int64, descending: the t given to the UNet at step i
    alphas_cumprod: Tensor  # (N,) float32: abar at timesteps[i]
    alphas_cumprod_prev: Tensor  # (N,) float32: abar step i lands on
    prediction_type: str  # "epsilon" or "v_prediction"


@dataclass(frozen=True)
class DPMSchedule:  # DPM-Solver++ (2M, 2M SDE, 2S), UniPC, DEIS; also what a user's own sampler gets
    timesteps: Tensor  # (N,) int64: the t given to the UNet at step i
    sigmas: Tensor  # (N + 1,) float32, descending: sqrt((1 - abar) / abar) at each step, then the last
    prediction_type: str  # "epsilon" or "v_prediction"


@dataclass(frozen=True)
class KSchedule:  # Euler, Euler ancestral, Heun, LMS, KDPM2, KDPM2 ancestral (VE, k-diffusion)
    timesteps: Tensor  # (N,) float32: the t given to the UNet at step i
    sigmas: Tensor  # (N + 1,) float32, descending, ending at 0
    init_noise_sigma: Tensor  # 0-dim float32: the std of x_T (sigma_max, or sqrt(sigma_max^2 + 1) "leading")
    prediction_type: str  # "epsilon" or "v_prediction"
    # KDPM2 only, (N,) each: the midpoint sigma and UNet timestep of step i's second evaluation, and (the
    # ancestral variant) the noise split sigma_{i+1}^2 = down^2 + up^2 of its landing point.
    sigmas_mid: Tensor | None = None
    timesteps_mid: Tensor | None = None
    sigmas_up: Tensor | None = None
    sigmas_down: Tensor | None = None


@dataclass(frozen=True)
class PNDMSchedule:
    timesteps: Tensor  # (M,) int64: the t given to the UNet at call j, the Runge-Kutta warm-up first
    num_prk: int  # how many of those calls are the Runge-Kutta (PRK) warm-up
    step_ratio: int  # T // N: the distance a PLMS step goes down (PRK: half of it, twice)
    alphas_cumprod: Tensor  # (T,) float32: the training table, indexed by timestep
    final_alpha_cumprod: Tensor  # 0-dim: abar "before" t=0 (abar[0] on the hub, set_alpha_to_one false)
    prediction_type: str


# ----------------------------------------------------------------------------------- shared pieces


def alphas_cumprod(cfg: SchedulerConfig) -> Tensor:
    """abar_t = prod_{s <= t} (1 - beta_s) for t in [0, T), float32 (T,), computed as diffusers does."""
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "scaled_linear":  # linear in sqrt(beta), the latent-diffusion schedule
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float32) ** 2
    elif cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
    else:
        raise UnsupportedConfigError(
            f"beta_schedule {cfg.beta_schedule!r} is not supported ('scaled_linear', 'linear')"
        )
    return torch.cumprod(1.0 - betas, dim=0)


def _sigma_table(cfg: SchedulerConfig) -> np.ndarray:
    """sigma_t = sqrt((1 - abar_t) / abar_t) for t in [0, T): float32 (T,), increasing in t."""
    abar = alphas_cumprod(cfg)
    return (((1 - abar) / abar) ** 0.5).numpy()


def _check_steps(cfg: SchedulerConfig, steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer):
        raise UsageTypeError(f"steps must be an integer, got {steps!r}")
    if not 1 <= steps <= cfg.num_train_timesteps:
        raise UsageError(f"steps must be in [1, num_train_timesteps={cfg.num_train_timesteps}], got {steps}")


def _check_timesteps(t: np.ndarray, cfg: SchedulerConfig, steps: int, sampler: str) -> None:
    """Refuse the schedules that diffusers builds wrong rather than copy them (see the module docstring)."""
    where = f"{sampler} with {steps} steps and {cfg.timestep_spacing!r} spacing"
    if len(t) != steps:  # "trailing": float arange(T, 0, -T / steps) overshoots and yields one more, -1
        raise UsageError(f"{where}: the reference schedule has {len(t)} timesteps; choose another step count")
    if t.min() < 0 or t.max() >= cfg.num_train_timesteps:
        raise UsageError(f"{where} asks for timesteps outside [0, {cfg.num_train_timesteps}): {t.max()}")
    if len(np.unique(t)) != len(t):
        raise UsageError(f"{where} repeats timesteps; choose fewer steps")


def _spaced(cfg: SchedulerConfig, steps: int, plus_one: bool, spacing: str | None = None) -> np.ndarray:
    """The integer timesteps of ``spacing`` (default: the config's), descending, numpy float64 arithmetic.

    ``plus_one``: the DPM family's variant, which spaces ``steps + 1`` points and drops the last (t=0).
    """
    T, spacing = cfg.num_train_timesteps, spacing or cfg.timestep_spacing
    k = steps + 1 if plus_one else steps
    if spacing == "leading":
        t = np.arange(0, k)[::-1][:steps] * (T // k) + cfg.steps_offset
    elif spacing == "trailing":
        t = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    elif spacing == "linspace":
        t = np.linspace(0, T - 1, k).round()[::-1][:steps].astype(np.int64)
    else:
        raise UnsupportedConfigError(f"timestep_spacing {spacing!r} is not supported")
    return t.astype(np.int64)


def _sigma_to_t(sigma, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional timestep whose sigma is ``sigma``: linear interpolation in log sigma.

    diffusers' ``_sigma_to_t``, in the precision of ``sigma``: float64 for the Karras sigmas, float32 for
    KDPM2's midpoints (diffusers passes float32 tensors there, and torch keeps the arithmetic in float32).
    """
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    low = low.astype(w.dtype)
    return ((1 - w) * low + w * (low + 1)).reshape(np.shape(sigma))


def _karras(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. (5): sigmas evenly spaced in sigma^(1/rho), descending, float64 (steps,)."""
    ramp = np.linspace(0, 1, steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


# ------------------------------------------------------------------- conversions between parametrisations


def alpha_sigma(sigma: Tensor) -> tuple[Tensor, Tensor]:
    """From the VE noise level sigma = sqrt((1 - abar) / abar) to the VP pair (sqrt(abar), sqrt(1 - abar))."""
    alpha_t = 1 / (sigma**2 + 1) ** 0.5
    return alpha_t, sigma * alpha_t


def half_log_snr(alpha: Tensor, sigma: Tensor) -> Tensor:
    return torch.log(alpha) - torch.log(sigma)  # half log-SNR; +inf at sigma=0


def x0_vp(out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """x_0 from a VP x_t = alpha x_0 + sigma eps and the model's eps (or v = alpha eps - sigma x_0)."""
    if prediction_type == "epsilon":
        return (x - sigma * out) / alpha
    return alpha * x - sigma * out


def x0_ve(out: Tensor, x: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """x_0 from a VE x = x_0 + sigma eps (the model saw x / sqrt(sigma^2 + 1)) and its eps or v."""
    if prediction_type == "epsilon":
        return x - sigma * out
    return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)


def scale_model_input(x: Tensor, sigma: Tensor) -> Tensor:
    """VE x -> the VP x_t the UNet was trained on (diffusers' ``scale_model_input``)."""
    return x / ((sigma**2 + 1) ** 0.5)


# --------------------------------------------------------------------------------------- VP builders


def ddim_schedule(cfg: SchedulerConfig, steps: int) -> DDIMSchedule:
    """DDIM's timesteps and the abar each step goes from and to (``DDIMScheduler.set_timesteps``).

    Quirk: DDIM steps from abar[t] to abar[t - T // steps] whatever the spacing, not to the next timestep of
    the schedule (the two agree only for "leading"); before t=0 it lands on abar[0] (the hub's
    ``set_alpha_to_one`` false) or 1.
    """
    _check_steps(cfg, steps)
    t = _spaced(cfg, steps, plus_one=False)
    _check_timesteps(t, cfg, steps, "DDIM")
    timesteps = torch.from_numpy(t)
    abar = alphas_cumprod(cfg)
    final = torch.tensor(1.0) if cfg.set_alpha_to_one else abar[0]
    prev = timesteps - cfg.num_train_timesteps // steps
    abar_prev = torch.where(prev >= 0, abar[prev.clamp(min=0)], final)
    return DDIMSchedule(timesteps, abar[timesteps], abar_prev, cfg.prediction_type)


def ddpm_schedule(cfg: SchedulerConfig, steps: int) -> DDIMSchedule:
    """DDPM's timesteps (``DDPMScheduler.set_timesteps``): each step lands on the next timestep, the last on
    abar = 1 (``set_alpha_to_one`` does not exist for DDPM)."""
    _check_steps(cfg, steps)
    t = _spaced(cfg, steps, plus_one=False)
    _check_timesteps(t, cfg, steps, "DDPM")
    timesteps = torch.from_numpy(t)
    abar = alphas_cumprod(cfg)
    abar_prev = torch.cat([abar[timesteps[1:]], torch.ones(1)])
    return DDIMSchedule(timesteps, abar[timesteps], abar_prev, cfg.prediction_type)


def pndm_schedule(cfg: SchedulerConfig, steps: int) -> PNDMSchedule:
    """PNDM's model calls (``PNDMScheduler.set_timesteps``, ``skip_prk_steps`` false as ``from_config``):
    three Runge-Kutta steps over the 4 highest timesteps, each of 4 calls (t, t - r/2, t - r/2, t - r), then
    one pseudo linear multistep call per remaining timestep: steps + 9 UNet calls.
    """
    _check_steps(cfg, steps)
    if steps < 4:  # diffusers fails to broadcast its warm-up arrays
        raise UsageError(f"PNDM needs at least 4 steps (its Runge-Kutta warm-up spans 4), got {steps}")
    T = cfg.num_train_timesteps
    t = _spaced(cfg, steps, plus_one=False)
    _check_timesteps(t, cfg, steps, "PNDM")
    t = t[::-1]  # ascending, as diffusers keeps it
    half = T // steps // 2
    prk = np.array(t[-4:]).repeat(2) + np.tile(np.array([0, half]), 4)
    prk = prk[:-1].repeat(2)[1:-1][::-1]
    plms = t[:-3][::-1]
    abar = alphas_cumprod(cfg)
    final = torch.tensor(1.0) if cfg.set_alpha_to_one else abar[0]
    timesteps = torch.from_numpy(np.concatenate([prk, plms]).astype(np.int64))
    return PNDMSchedule(timesteps, len(prk), T // steps, abar, final, cfg.prediction_type)


def dpm_schedule(
    cfg: SchedulerConfig,
    steps: int,
    karras: bool = False,
    spacing: str | None = None,
    final_sigma: str = "zero",
) -> DPMSchedule:
    """The DPM-Solver family's timesteps and sigmas (``DPMSolverMultistepScheduler.set_timesteps``, and
    UniPC's, DEIS's and ``DPMSolverSinglestepScheduler``'s, which differ only in the two options below).

    ``karras=True`` spaces the sigmas as Karras et al. 2022 (rho=7) between the training schedule's
    extremes and ignores the spacing; the UNet then gets the nearest integer timestep (several repeat at
    many steps: harmless, the solver steps between distinct sigmas). ``spacing`` overrides the config's
    (the singlestep solver always uses "linspace"). ``final_sigma``: "zero" lands on the clean x_0, "min"
    on sigma_0 (DEIS).
    """
    _check_steps(cfg, steps)
    sigmas = _sigma_table(cfg)
    if karras:
        sig = _karras(float(sigmas[0]), float(sigmas[-1]), steps)
        log_sigmas = np.log(sigmas)
        # One call per sigma, as diffusers does (a vectorised log may differ in the last bit).
        t = np.array([_sigma_to_t(s, log_sigmas) for s in sig]).round().astype(np.int64)
    else:
        t = _spaced(cfg, steps, plus_one=True, spacing=spacing)
        _check_timesteps(t, cfg, steps, "DPM-Solver++")
        sig = sigmas[t]  # diffusers interpolates at integer t: the table entries themselves
    last = 0.0 if final_sigma == "zero" else sigmas[0]
    sig = np.concatenate([sig, [last]]).astype(np.float32)
    return DPMSchedule(torch.from_numpy(t.astype(np.int64)), torch.from_numpy(sig), cfg.prediction_type)


# --------------------------------------------------------------------------------------- VE builders


def _k_base(cfg: SchedulerConfig, steps: int, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Timesteps (float32), their sigmas (float64, interpolated) and the log-sigma table of the VE family."""
    _check_steps(cfg, steps)
    if cfg.timestep_spacing == "linspace":  # not rounded here: fractional timesteps
        t = np.linspace(0, cfg.num_train_timesteps - 1, steps, dtype=np.float32)[::-1].copy()
    else:
        t = _spaced(cfg, steps, plus_one=False)
    _check_timesteps(t, cfg, steps, name)
    table = _sigma_table(cfg)
    t = t.astype(np.float32)
    return t, np.interp(t, np.arange(0, len(table)), table), np.log(table)


def _init_noise_sigma(cfg: SchedulerConfig, sigmas: Tensor) -> Tensor:
    # diffusers: sigma_max for "linspace"/"trailing", sqrt(sigma_max^2 + 1) for "leading" (the hub's).
    if cfg.timestep_spacing in ("linspace", "trailing"):
        return sigmas.max()
    return (sigmas.max() ** 2 + 1) ** 0.5


def k_schedule(cfg: SchedulerConfig, steps: int) -> KSchedule:
    """The VE timesteps and sigmas of ``EulerDiscreteScheduler`` (and of Euler ancestral, Heun and LMS,
    whose ``set_timesteps`` compute the same): the training sigma at each spaced timestep, then 0."""
    t, sig, _ = _k_base(cfg, steps, "Euler")
    sigmas = torch.from_numpy(np.concatenate([sig, [0.0]]).astype(np.float32))
    return KSchedule(torch.from_numpy(t), sigmas, _init_noise_sigma(cfg, sigmas), cfg.prediction_type)


def kdpm2_schedule(cfg: SchedulerConfig, steps: int, ancestral: bool = False) -> KSchedule:
    """``KDPM2DiscreteScheduler`` (``ancestral``: ``KDPM2AncestralDiscreteScheduler``): Karras et al. 2022's
    DPM-Solver-2 evaluates the UNet a second time at the geometric midpoint of each step's sigmas; the
    ancestral variant aims at sigma_down and adds sigma_up noise (k-diffusion's ``get_ancestral_step``).

    Quirks kept: the midpoints are found as exp(lerp(log)), their timesteps by log-sigma interpolation of a
    float32 sigma (diffusers passes a float32 tensor); the last step is a plain Euler step to 0.
    """
    t, sig, log_sigmas = _k_base(cfg, steps, "KDPM2")
    sigmas = torch.from_numpy(np.concatenate([sig, [0.0]]).astype(np.float32))
    up = down = None
    if ancestral:
        nxt = sigmas.roll(-1)
        nxt[-1] = 0.0
        up = (nxt**2 * (sigmas**2 - nxt**2) / sigmas**2) ** 0.5
        down = (nxt**2 - up**2) ** 0.5
        down[-1] = 0.0
        mid = sigmas.log().lerp(down.log(), 0.5).exp()  # step i: between sigma_i and its down
        mid[-2:] = 0.0
        mid_i = mid[:steps]
        up, down = up[:steps], down[:steps]
    else:
        mid = sigmas.log().lerp(sigmas.roll(1).log(), 0.5).exp()  # mid[i]: between sigma_{i-1} and sigma_i
        mid_i = mid[1:]
    t_mid = np.array([_sigma_to_t(s, log_sigmas) for s in mid_i.numpy()])
    return KSchedule(
        torch.from_numpy(t),
        sigmas,
        _init_noise_sigma(cfg, sigmas),
        cfg.prediction_type,
        sigmas_mid=mid_i,
        timesteps_mid=torch.from_numpy(t_mid).to(torch.float32),
        sigmas_up=up,
        sigmas_down=down,
    )
