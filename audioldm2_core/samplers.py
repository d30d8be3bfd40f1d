"""Samplers: the denoising loops, one short function per method, over the schedules of ``schedules.py``.

Place in the AudioLDM 2 data flow: the pipeline draws Gaussian latents x_T (B, 8, t, 16), scales them by the
sampler's ``init_noise_sigma``, wraps the UNet, classifier-free guidance and both text conditions into a
denoiser closure ``model(x, t) -> model_output`` (epsilon or v), and hands both to a sampler here; the
sampler returns x_0 for the VAE. Samplers never see the conditions.

    x = sample("dpmpp-2m", model, x_T * init_noise_sigma("dpmpp-2m", cfg, 20), cfg, 20, generator=g)
    sched = dpm_schedule(cfg, 20); x = sample_dpmpp_2m(model, x_T, sched)      # the same, by hand

Every name in ``SAMPLERS`` reproduces, to float32 rounding, diffusers 0.42.1's ``AudioLDM2Pipeline`` with
``pipe.scheduler = <Scheduler>.from_config(pipe.scheduler.config, <options>)``, the scheduler and options of
``weights_tools.reference.DIFFUSERS_SCHEDULERS`` (and the table in docs/samplers.md): DDIM (the checkpoint's own),
DDPM, PNDM, DPM-Solver++ 2M (SDE, Karras) and 2S, UniPC, DEIS, Euler (ancestral), Heun, KDPM2 (ancestral),
LMS.

The stochastic ones (ddim with eta > 0, ddpm, euler-a, kdpm2-a, dpmpp-2m-sde) draw their noise where
diffusers' ``step`` does, with its shape, dtype and device (``randn`` = diffusers' ``randn_tensor``), so the
pipeline's one generator gives the same audio. Per-step scalars are 0-dim float32 tensors computed in
diffusers' order; the few numpy places (DEIS's logs) stay numpy. LMS's coefficients are integrals of
Lagrange polynomials, here by Gauss-Legendre quadrature (exact for them) where diffusers calls scipy.

Every sampler has the signature ``fn(model, x, sched, generator=None, callback=None, start=0) -> x_0`` (DDIM
adds ``eta``): ``x`` is the latents at schedule index ``start``, in the sampler's own scale; ``callback(i, t,
x)`` runs after step i. ``start`` = k runs the last steps only, as diffusers' img2img does
(``scheduler.set_begin_index(k * scheduler.order)``; ``timesteps[k * order:]``): multistep state starts
empty there, as it does in diffusers. The matching noisy start is ``add_noise(name, cfg, steps, x0, noise,
k)``, the scheduler's own ``add_noise`` at that index (also usable at any index, e.g. to re-noise known
latents to the level of the next step for RePaint-style inpainting). ``sample`` also takes a callable with
that signature: it gets a ``DPMSchedule`` (VP timesteps and sigmas) and N(0, I) latents.

Left out on purpose: the other diffusers options (thresholding, clipping, "sample" prediction, orders 1 and
3, other sigma spacings, ``s_churn``), ``set_timesteps``/``step`` state, ``return_dict``, training helpers.
Quirk kept: PNDM's step counter is not moved by ``set_begin_index``, so with ``start`` > 0 diffusers runs
its Runge-Kutta warm-up on the later timesteps (a meaningless schedule; we reproduce it, use another sampler).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from torch import Tensor

from .config import SchedulerConfig
from .errors import UsageError
from .noise import Generators, randn
from .request import SAMPLERS, check_sampler_name
from .schedules import (
    DDIMSchedule,
    DPMSchedule,
    KSchedule,
    PNDMSchedule,
    alpha_sigma,
    alphas_cumprod,
    ddim_schedule,
    ddpm_schedule,
    dpm_schedule,
    half_log_snr,
    k_schedule,
    kdpm2_schedule,
    pndm_schedule,
    scale_model_input,
    x0_ve,
    x0_vp,
)

__all__ = [
    "Denoiser",
    "Callback",
    "DDIMSchedule",
    "DPMSchedule",
    "KSchedule",
    "PNDMSchedule",
    "SAMPLERS",
    "add_noise",
    "alphas_cumprod",
    "ddim_schedule",
    "dpm_schedule",
    "init_noise_sigma",
    "sample",
    "schedule",
]

Denoiser = Callable[[Tensor, Tensor], Tensor]  # (x_t as the UNet takes it, t as a 0-dim tensor) -> eps or v
Callback = Callable[[int, Tensor, Tensor], None]  # (step index, t, x after the step)
Schedule = DDIMSchedule | DPMSchedule | KSchedule | PNDMSchedule


def _noise_like(out: Tensor, generator: Generators, dtype: torch.dtype | None = None) -> Tensor:
    return randn(tuple(out.shape), generator, out.device, dtype or out.dtype)


def _done(callback: Callback | None, i: int, t: Tensor, x: Tensor) -> None:
    if callback is not None:
        callback(i, t, x)


# --------------------------------------------------------------------------------- VP: DDIM family


def sample_ddim(
    model: Denoiser,
    x: Tensor,
    sched: DDIMSchedule,
    eta: float = 0.0,
    generator: Generators = None,
    callback: Callback | None = None,
    start: int = 0,
) -> Tensor:
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12), sigma_t = eta * eq. 16."""
    if not (isinstance(eta, int | float) and 0.0 <= eta <= 1.0):
        raise UsageError(f"eta must be a number in [0, 1] (0: DDIM, 1: DDPM-like), got {eta!r}")
    timesteps = sched.timesteps.to(x.device)
    for i in range(start, len(timesteps)):
        t = timesteps[i]
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
            x = x + std * _noise_like(out, generator)
        _done(callback, i, t, x)
    return x


def sample_ddpm(
    model: Denoiser,
    x: Tensor,
    sched: DDIMSchedule,
    generator: Generators = None,
    callback: Callback | None = None,
    start: int = 0,
) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2; posterior mean eq. 7, "fixed_small" variance)."""
    timesteps = sched.timesteps.to(x.device)
    for i in range(start, len(timesteps)):
        t = timesteps[i]
        out = model(x, t)
        a_t, a_prev = sched.alphas_cumprod[i], sched.alphas_cumprod_prev[i]
        b_t, b_prev = 1 - a_t, 1 - a_prev
        alpha, beta = a_t / a_prev, 1 - a_t / a_prev  # of this jump
        if sched.prediction_type == "epsilon":
            x0 = (x - b_t ** (0.5) * out) / a_t ** (0.5)
        else:
            x0 = a_t**0.5 * x - b_t**0.5 * out
        x_prev = (a_prev ** (0.5) * beta / b_t) * x0 + (alpha ** (0.5) * b_prev / b_t) * x
        if sched.timesteps[i] > 0:  # diffusers draws even at the last step, with a variance of ~1e-20
            noise = _noise_like(out, generator)
            variance = torch.clamp((1 - a_prev) / (1 - a_t) * beta, min=1e-20)
            x_prev = x_prev + variance**0.5 * noise
        x = x_prev
        _done(callback, i, t, x)
    return x


def _pndm_step(sched: PNDMSchedule, x: Tensor, t: int, t_prev: int, eps: Tensor) -> Tensor:
    """PNDM's transfer x_t -> x_{t_prev} given eps (Liu et al. 2022, eq. 9)."""
    a_t = sched.alphas_cumprod[t]
    a_prev = sched.alphas_cumprod[t_prev] if t_prev >= 0 else sched.final_alpha_cumprod
    b_t, b_prev = 1 - a_t, 1 - a_prev
    if sched.prediction_type == "v_prediction":
        eps = a_t**0.5 * eps + b_t**0.5 * x
    denom = a_t * b_prev ** (0.5) + (a_t * b_t * a_prev) ** (0.5)
    return (a_prev / a_t) ** (0.5) * x - (a_prev - a_t) * eps / denom


def sample_pndm(
    model: Denoiser,
    x: Tensor,
    sched: PNDMSchedule,
    generator: Generators = None,
    callback: Callback | None = None,
    start: int = 0,
) -> Tensor:
    """PNDM (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models"): 3 pseudo Runge-Kutta steps
    (4 calls each), then pseudo linear multistep, 4th order (one call per step)."""
    timesteps = sched.timesteps.to(x.device)
    ets: list[Tensor] = []  # eps at the start of each step, newest last
    rk = x_rk = 0  # the running Runge-Kutta combination of eps; x at the start of the RK step
    for j, i in enumerate(range(start, len(timesteps))):  # j: diffusers' counter (0 at ``start``)
        t, t_int = timesteps[i], int(sched.timesteps[i])
        out = model(x, t)
        if j < sched.num_prk:
            t_prev = t_int - (0 if j % 2 else sched.step_ratio // 2)  # calls at t, t-r/2, t-r/2, t-r
            t_from = int(sched.timesteps[j // 4 * 4])
            if j % 4 == 0:
                rk, x_rk = rk + 1 / 6 * out, x
                ets.append(out)
            elif j % 4 in (1, 2):
                rk = rk + 1 / 3 * out
            else:
                out, rk = rk + 1 / 6 * out, 0
            x = _pndm_step(sched, x_rk, t_from, t_prev, out)
        else:
            ets = [*ets[-3:], out]
            eps = 1 / 24 * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
            x = _pndm_step(sched, x, t_int, t_int - sched.step_ratio, eps)
        _done(callback, i, t, x)
    return x


# ------------------------------------------------------------------------- VP: DPM-Solver family


def sample_dpmpp_2m(
    model: Denoiser,
    x: Tensor,
    sched: DPMSchedule,
    generator: Generators = None,
    callback: Callback | None = None,
    start: int = 0,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): multistep, data prediction.

    First order (= DDIM) on the first step and on the last (which lands on sigma=0), second order
    ("midpoint" form, diffusers' default) in between.
    """
    timesteps = sched.timesteps.to(x.device)
    n = len(timesteps)
    x0_prev = lambda_prev = None
    for i in range(start, n):
        t = timesteps[i]
        out = model(x, t)
        alpha_s, sigma_s = alpha_sigma(sched.sigmas[i])  # 0-dim float32, as diffusers indexes
        alpha_t, sigma_t = alpha_sigma(sched.sigmas[i + 1])
        x0 = x0_vp(out, x, alpha_s, sigma_s, sched.prediction_type)
        lambda_s, lambda_t = half_log_snr(alpha_s, sigma_s), half_log_snr(alpha_t, sigma_t)
        h = lambda_t - lambda_s
        # diffusers steps in float32 and casts back to the model output's dtype
        x_next = sigma_t / sigma_s * x.to(torch.float32) - alpha_t * (torch.exp(-h) - 1.0) * x0
        if start < i < n - 1:  # second-order correction from the previous x0 (lower order at both ends)
            d1 = 1.0 / ((lambda_s - lambda_prev) / h) * (x0 - x0_prev)
            x_next = x_next - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
        x = x_next.to(x0.dtype)
        x0_prev, lambda_prev = x0, lambda_s
        _done(callback, i, t, x)
    return x


def sample_dpmpp_2m_sde(
    model: Denoiser,
    x: Tensor,
    sched: DPMSchedule,
    generator: Generators = None,
    callback: Callback | None = None,
    start: int = 0,
) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, "DPM-Solver++", sec. 5 / Appendix: the SDE variant): the 2M
    step with the noise part exp(-h) of the ODE step replaced by fresh noise (one float32 draw per step)."""
    timesteps = sched.timesteps.to(x.device)
    n = len(timesteps)
    x0_prev = lambda_prev = None
    for i in range(start, n):
        t = timesteps[i]
        out = model(x, t)
        alpha_s, sigma_s = alpha_sigma(sched.sigmas[i])
        alpha_t, sigma_t = alpha_sigma(sched.sigmas[i + 1])
        x0 = x0_vp(out, x, alpha_s, sigma_s, sched.prediction_type)
        noise = _noise_like(out, generator, torch.float32)
        lambda_s, lambda_t = half_log_snr(alpha_s, sigma_s), half_log_snr(alpha_t, sigma_t)
        h = lambda_t - lambda_s
        x_next = (
            sigma_t / sigma_s * torch.exp(-h) * x.to(torch.float32) + alpha_t * (1 - torch.exp(-2.0 * h)) * x0
        )
        if start < i < n - 1:
            d1 = 1.0 / ((lambda_s - lambda_prev) / h) * (x0 - x0_prev)
            x_next = x_next + 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h))) * d1
        x = (x_next + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise).to(x0.dtype)
        x0_prev, lambda_prev = x0, lambda_s
        _done(callback, i, t, x)
    return x


def _singlestep_orders(n: int) -> list[int]:
    """``DPMSolverSinglestepScheduler.get_order_list`` for order 2 with ``lower_order_final`` (forced on)."""
    orders = [1, 2] * (n // 2 - 1) + [1, 1] if n % 2 == 0 else [1, 2] * (n // 2) + [1]
    orders[-1] = 1  # final_sigmas_type "zero"
    return orders


def sample_dpmpp_2s(
    model: Denoiser,
    x: Tensor,
    sched: DPMSchedule,
    generator: Generators = None,
    callback: Callback | None = None,
    start: int = 0,
) -> Tensor:
    """DPM-Solver++(2S) (Lu et al. 2022, "DPM-Solver++", Algorithm 1, singlestep second order): steps in
    pairs, a first-order step to an intermediate sigma, then a second-order step over both from the pair's
    start (diffusers' order list 1, 2, 1, 2, ..., with a first-order last step)."""
    timesteps = sched.timesteps.to(x.device)
    orders = _singlestep_orders(len(timesteps))
    x0_prev = x_pair = None
    for i in range(start, len(timesteps)):
        t = timesteps[i]
        out = model(x, t)
        alpha_s0, sigma_s0 = alpha_sigma(sched.sigmas[i])
        alpha_t, sigma_t = alpha_sigma(sched.sigmas[i + 1])
        x0 = x0_vp(out, x, alpha_s0, sigma_s0, sched.prediction_type)
        lambda_t, lambda_s0 = half_log_snr(alpha_t, sigma_t), half_log_snr(alpha_s0, sigma_s0)
        if orders[i] == 1 or i == start:  # no previous x0 yet at ``start``
            x_pair = x
            h = lambda_t - lambda_s0
            x = sigma_t / sigma_s0 * x - alpha_t * (torch.exp(-h) - 1.0) * x0
        else:
            alpha_s1, sigma_s1 = alpha_sigma(sched.sigmas[i - 1])
            lambda_s1 = half_log_snr(alpha_s1, sigma_s1)
            h = lambda_t - lambda_s1
            d1 = 1.0 / ((lambda_s0 - lambda_s1) / h) * (x0 - x0_prev)
            e = alpha_t * (torch.exp(-h) - 1.0)
            x = sigma_t / sigma_s1 * x_pair - e * x0_prev - 0.5 * e * d1
        x0_prev = x0
        _done(callback, i, t, x)
    return x


def _unipc_rhos(h: Tensor, rks: list[Tensor], order: int) -> Tensor:
    """Solve UniPC's R rho = b for the corrector's weights (Zhao et al. 2023, Algorithm 1), as diffusers."""
    hh = -h  # data prediction
    h_phi_k, b_h = torch.expm1(hh) / hh - 1, torch.expm1(hh)
    r, b, factorial = [], [], 1
    rk = torch.stack([*rks, torch.ones((), device=h.device)])
    for k in range(1, order + 1):
        r.append(torch.pow(rk, k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return torch.linalg.solve(torch.stack(r), torch.stack(b))


def sample_unipc(
    model: Denoiser,
    x: Tensor,
    sched: DPMSchedule,
    generator: Generators = None,
    callback: Callback | None = None,
    start: int = 0,
) -> Tensor:
    """UniPC (Zhao et al. 2023, "UniPC", Algorithm 1, bh2, order 2): each step's model output first corrects
    the previous step (UniC, no extra call), then predicts the next (UniP); first order at both ends."""
    dev, n = x.device, len(sched.timesteps)
    timesteps = sched.timesteps.to(dev)
    lam = lambda k: half_log_snr(*alpha_sigma(sched.sigmas[k].to(dev)))  # noqa: E731
    ms: list[Tensor] = []  # data predictions of the last steps, newest last
    x_last = order = None
    for i in range(start, n):
        t = timesteps[i]
        out = model(x, t)
        m = x0_vp(out, x, *alpha_sigma(sched.sigmas[i]), sched.prediction_type)
        if i > start:  # UniC: redo the previous step from x_last with m, at the order it was predicted
            alpha_t, sigma_t = alpha_sigma(sched.sigmas[i].to(dev))
            _, sigma_s0 = alpha_sigma(sched.sigmas[i - 1].to(dev))
            h = lam(i) - lam(i - 1)
            rks, d1s = [], []
            if order == 2:
                rks = [(lam(i - 2) - lam(i - 1)) / h]
                d1s = [(ms[-2] - ms[-1]) / rks[0]]
            rhos = (
                torch.ones(1, dtype=x.dtype, device=dev) * 0.5 if order == 1 else _unipc_rhos(h, rks, order)
            )
            h_phi_1 = b_h = torch.expm1(-h)  # phi_1(-h) h and B(h) of "bh2"
            x_t = sigma_t / sigma_s0 * x_last - alpha_t * h_phi_1 * ms[-1]
            corr = torch.einsum("k,bkc...->bc...", rhos.to(x.dtype)[:-1], torch.stack(d1s, 1)) if d1s else 0
            x = (x_t - alpha_t * b_h * (corr + rhos.to(x.dtype)[-1] * (m - ms[-1]))).to(x_last.dtype)
        ms = [*ms[-1:], m]
        order = min(2, n - i, i - start + 1)
        x_last = x
        # UniP: x_{i+1} from x_i with m (and the previous m at order 2)
        alpha_t, sigma_t = alpha_sigma(sched.sigmas[i + 1].to(dev))
        _, sigma_s0 = alpha_sigma(sched.sigmas[i].to(dev))
        h = lam(i + 1) - lam(i)
        h_phi_1 = b_h = torch.expm1(-h)  # phi_1(-h) h and B(h) of "bh2"
        x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m
        if order == 2:
            rk = (lam(i - 1) - lam(i)) / h
            rhos_p = torch.ones(1, dtype=x.dtype, device=dev) * 0.5
            x_t = x_t - alpha_t * b_h * torch.einsum("k,bkc...->bc...", rhos_p, ((ms[-2] - m) / rk)[:, None])
        x = x_t.to(x.dtype)
        _done(callback, i, t, x)
    return x


def _np_log(v: Tensor) -> Tensor:
    return torch.as_tensor(np.log(v.numpy()))  # numpy's float32 log, as diffusers' np.log on tensors


def sample_deis(
    model: Denoiser,
    x: Tensor,
    sched: DPMSchedule,
    generator: Generators = None,
    callback: Callback | None = None,
    start: int = 0,
) -> Tensor:
    """DEIS (Zhang & Chen 2022, "Fast Sampling of Diffusion Models with Exponential Integrator"), the
    "logrho" multistep of order 2 on eps; first order at the start and, under 15 steps, at the end."""
    timesteps = sched.timesteps.to(x.device)
    n = len(timesteps)
    ind = lambda t, b, c: t * (-_np_log(c) + _np_log(t) - 1) / (_np_log(b) - _np_log(c))  # noqa: E731
    eps_prev = None
    for i in range(start, n):
        t = timesteps[i]
        out = model(x, t)
        alpha_s0, sigma_s0 = alpha_sigma(sched.sigmas[i])
        alpha_t, sigma_t = alpha_sigma(sched.sigmas[i + 1])
        x0 = x0_vp(out, x, alpha_s0, sigma_s0, sched.prediction_type)
        eps = (x - alpha_s0 * x0) / sigma_s0
        if i == start or (i == n - 1 and n < 15):
            h = half_log_snr(alpha_t, sigma_t) - half_log_snr(alpha_s0, sigma_s0)
            x = alpha_t / alpha_s0 * x - sigma_t * (torch.exp(h) - 1.0) * eps
        else:  # integrate the linear interpolation of eps in rho = sigma / alpha, in log rho
            alpha_s1, sigma_s1 = alpha_sigma(sched.sigmas[i - 1])
            rho_t, rho_s0, rho_s1 = sigma_t / alpha_t, sigma_s0 / alpha_s0, sigma_s1 / alpha_s1
            coef1 = ind(rho_t, rho_s0, rho_s1) - ind(rho_s0, rho_s0, rho_s1)
            coef2 = ind(rho_t, rho_s1, rho_s0) - ind(rho_s0, rho_s1, rho_s0)
            x = alpha_t * (x / alpha_s0 + coef1 * eps + coef2 * eps_prev)
        eps_prev = eps
        _done(callback, i, t, x)
    return x


# ------------------------------------------------------------------------ VE: the k-diffusion family


def sample_euler(
    model: Denoiser,
    x: Tensor,
    sched: KSchedule,
    generator: Generators = None,
    callback: Callback | None = None,
    start: int = 0,
) -> Tensor:
    """Euler (Karras et al. 2022, Algorithm 2 without churn): x += (x - x_0) / sigma * (sigma' - sigma)."""
    timesteps, s = sched.timesteps.to(x.device), sched.sigmas
    for i in range(start, len(timesteps)):
        t = timesteps[i]
        out = model(scale_model_input(x, s[i]), t)
        x = x.to(torch.float32)
        d = (x - x0_ve(out, x, s[i], sched.prediction_type)) / s[i]
        x = (x + d * (s[i + 1] - s[i])).to(out.dtype)
        _done(callback, i, t, x)
    return x


def sample_euler_ancestral(
    model: Denoiser,
    x: Tensor,
    sched: KSchedule,
    generator: Generators = None,
    callback: Callback | None = None,
    start: int = 0,
) -> Tensor:
    """Euler ancestral (k-diffusion's ``sample_euler_ancestral``, eta 1): an Euler step down to sigma_down,
    then fresh noise of std sigma_up, sigma_down^2 + sigma_up^2 = sigma_next^2."""
    timesteps, s = sched.timesteps.to(x.device), sched.sigmas
    for i in range(start, len(timesteps)):
        t = timesteps[i]
        out = model(scale_model_input(x, s[i]), t)
        x = x.to(torch.float32)
        x0 = x0_ve(out, x, s[i], sched.prediction_type)
        sigma_up = (s[i + 1] ** 2 * (s[i] ** 2 - s[i + 1] ** 2) / s[i] ** 2) ** 0.5
        sigma_down = (s[i + 1] ** 2 - sigma_up**2) ** 0.5
        x = x + (x - x0) / s[i] * (sigma_down - s[i])
        x = (x + _noise_like(out, generator) * sigma_up).to(out.dtype)  # drawn at the last step too
        _done(callback, i, t, x)
    return x


def sample_heun(
    model: Denoiser,
    x: Tensor,
    sched: KSchedule,
    generator: Generators = None,
    callback: Callback | None = None,
    start: int = 0,
) -> Tensor:
    """Heun (Karras et al. 2022, Algorithm 1): Euler, then the trapezoid with the slope at the landing point;
    two UNet calls per step, one on the last (it lands on sigma=0): 2 steps - 1 in all."""
    timesteps, s = sched.timesteps.to(x.device), sched.sigmas
    n = len(timesteps)
    for i in range(start, n):
        t = timesteps[i]
        out = model(scale_model_input(x, s[i]), t)
        d = (x - x0_ve(out, x, s[i], sched.prediction_type)) / s[i]
        dt = s[i + 1] - s[i]
        if i == n - 1:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            out = model(scale_model_input(x_2, s[i + 1]), timesteps[i + 1])
            d_2 = (x_2 - x0_ve(out, x_2, s[i + 1], sched.prediction_type)) / s[i + 1]
            x = x + (d + d_2) / 2 * dt
        _done(callback, i, t, x)
    return x


def sample_kdpm2(
    model: Denoiser,
    x: Tensor,
    sched: KSchedule,
    generator: Generators = None,
    callback: Callback | None = None,
    start: int = 0,
) -> Tensor:
    """DPM-Solver-2 as in Karras et al. 2022 / k-diffusion's ``sample_dpm_2``: an Euler half step to the
    log-midpoint sigma, then the full step with the slope there; the last step is plain Euler."""
    timesteps, s = sched.timesteps.to(x.device), sched.sigmas
    n = len(timesteps)
    for i in range(start, n):
        t, mid = timesteps[i], sched.sigmas_mid[i]
        out = model(scale_model_input(x, s[i]), t)
        d = (x - x0_ve(out, x, s[i], sched.prediction_type)) / s[i]
        if i == n - 1:
            x = x + d * (mid - s[i])
        else:
            x_2 = x + d * (mid - s[i])
            out = model(scale_model_input(x_2, mid), sched.timesteps_mid[i].to(x.device))
            d_2 = (x_2 - x0_ve(out, x_2, mid, sched.prediction_type)) / mid
            x = x + d_2 * (s[i + 1] - s[i])
        _done(callback, i, t, x)
    return x


def sample_kdpm2_ancestral(
    model: Denoiser,
    x: Tensor,
    sched: KSchedule,
    generator: Generators = None,
    callback: Callback | None = None,
    start: int = 0,
) -> Tensor:
    """DPM-Solver-2 ancestral (k-diffusion's ``sample_dpm_2_ancestral``): the KDPM2 step aimed at sigma_down,
    then fresh noise of std sigma_up; the last step is plain Euler to 0."""
    timesteps, s = sched.timesteps.to(x.device), sched.sigmas
    n = len(timesteps)
    for i in range(start, n):
        t, mid = timesteps[i], sched.sigmas_mid[i]
        out = model(scale_model_input(x, s[i]), t)
        d = (x - x0_ve(out, x, s[i], sched.prediction_type)) / s[i]
        if i == n - 1:
            x = x + d * (mid - s[i])
        else:
            x_2 = x + d * (mid - s[i])
            out = model(scale_model_input(x_2, mid), sched.timesteps_mid[i].to(x.device))
            d_2 = (x_2 - x0_ve(out, x_2, mid, sched.prediction_type)) / mid
            x = x + d_2 * (sched.sigmas_down[i] - s[i])
            x = x + _noise_like(out, generator) * sched.sigmas_up[i]
        _done(callback, i, t, x)
    return x


def _lms_coefficient(sigmas: Tensor, order: int, i: int, j: int) -> float:
    """int_{sigma_i}^{sigma_{i+1}} of the Lagrange basis polynomial of node sigma_{i-j} over the nodes
    sigma_i, ..., sigma_{i-order+1}: degree < 4, so 4-point Gauss-Legendre is exact (diffusers: scipy quad)."""
    s = sigmas.double().numpy()
    nodes, weights = np.polynomial.legendre.leggauss(4)
    a, b = s[i], s[i + 1]
    tau = (b - a) / 2 * nodes + (a + b) / 2
    basis = np.ones_like(tau)
    for k in range(order):
        if k != j:
            basis *= (tau - s[i - k]) / (s[i - j] - s[i - k])
    return float((b - a) / 2 * np.sum(weights * basis))


def sample_lms(
    model: Denoiser,
    x: Tensor,
    sched: KSchedule,
    generator: Generators = None,
    callback: Callback | None = None,
    start: int = 0,
) -> Tensor:
    """Linear multistep (k-diffusion's ``sample_lms``, order 4): the slope's Lagrange interpolant through
    the last 4 steps, integrated over the next (lower order while fewer are known)."""
    timesteps, s = sched.timesteps.to(x.device), sched.sigmas
    ds: list[Tensor] = []  # slopes (x - x_0) / sigma of the last steps, newest last
    for i in range(start, len(timesteps)):
        t = timesteps[i]
        out = model(scale_model_input(x, s[i]), t)
        ds = [*ds[-3:], (x - x0_ve(out, x, s[i], sched.prediction_type)) / s[i]]
        # diffusers' order counts from index 0 even after ``start``; the unknown slopes then drop out
        order = min(i + 1, 4)
        coeffs = [_lms_coefficient(s, order, i, j) for j in range(order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds), strict=False))
        _done(callback, i, t, x)
    return x


# --------------------------------------------------------------------------------------- by name

# Each name of ``request.SAMPLERS`` (which describes them) -> (the sampler, its schedule).
_METHODS: dict[str, tuple[Callable[..., Tensor], Callable[[SchedulerConfig, int], Schedule]]] = {
    "ddim": (sample_ddim, ddim_schedule),
    "dpmpp-2m": (sample_dpmpp_2m, dpm_schedule),
    "dpmpp-2m-karras": (sample_dpmpp_2m, partial(dpm_schedule, karras=True)),
    "dpmpp-2m-sde": (sample_dpmpp_2m_sde, dpm_schedule),
    "dpmpp-2m-sde-karras": (sample_dpmpp_2m_sde, partial(dpm_schedule, karras=True)),
    "unipc": (sample_unipc, dpm_schedule),
    "deis": (sample_deis, partial(dpm_schedule, final_sigma="min")),
    "dpmpp-2s": (sample_dpmpp_2s, partial(dpm_schedule, spacing="linspace")),
    "euler": (sample_euler, k_schedule),
    "euler-a": (sample_euler_ancestral, k_schedule),
    "heun": (sample_heun, k_schedule),
    "kdpm2": (sample_kdpm2, kdpm2_schedule),
    "kdpm2-a": (sample_kdpm2_ancestral, partial(kdpm2_schedule, ancestral=True)),
    "lms": (sample_lms, k_schedule),
    "pndm": (sample_pndm, pndm_schedule),
    "ddpm": (sample_ddpm, ddpm_schedule),
}
assert _METHODS.keys() == SAMPLERS.keys()

SamplerFn = Callable[..., Tensor]  # fn(model, x, sched, generator=, callback=, start=) -> x_0


def schedule(sampler: str | SamplerFn, cfg: SchedulerConfig, steps: int) -> Schedule:
    """The schedule sampler ``sampler`` runs on (a user's function gets the VP ``dpm_schedule``)."""
    check_sampler_name(sampler)
    return dpm_schedule(cfg, steps) if callable(sampler) else _METHODS[sampler][1](cfg, steps)


def init_noise_sigma(sampler: str | SamplerFn, cfg: SchedulerConfig, steps: int) -> Tensor | float:
    """The std the sampler's x_T has (diffusers' ``init_noise_sigma``): 1, or sigma_max-ish for the VE ones."""
    sched = schedule(sampler, cfg, steps)
    return sched.init_noise_sigma if isinstance(sched, KSchedule) else 1.0


def _check_index(index: int, n: int, what: str) -> None:
    if isinstance(index, bool) or not isinstance(index, int | np.integer) or not 0 <= index < n:
        raise UsageError(f"{what} must be an integer step index in [0, {n}), got {index!r}")


def add_noise(
    sampler: str | SamplerFn, cfg: SchedulerConfig, steps: int, x0: Tensor, noise: Tensor, index: int
) -> Tensor:
    """x_0 noised to the level of schedule index ``index`` (the latents step ``index`` starts from), in the
    sampler's own scale: the diffusers scheduler's ``add_noise`` after ``set_begin_index(index * order)``.

    VP samplers: sqrt(abar) x0 + sqrt(1 - abar) noise; VE ones: x0 + sigma noise. Computed in x0's dtype.
    For PNDM ``index`` counts UNet calls (its ``timesteps``), as diffusers' img2img does.
    """
    sched = schedule(sampler, cfg, steps)
    _check_index(index, len(sched.timesteps), "index")
    if isinstance(sched, KSchedule):
        return x0 + noise * sched.sigmas.to(x0.dtype)[index]
    if isinstance(sched, DPMSchedule):
        alpha, sigma = alpha_sigma(sched.sigmas.to(x0.dtype)[index].to(x0.device))
        return alpha * x0 + sigma * noise
    table = alphas_cumprod(cfg).to(x0.device, x0.dtype)
    abar = table[sched.timesteps[index]]
    return abar**0.5 * x0 + (1 - abar) ** 0.5 * noise


def sample(
    sampler: str | SamplerFn,
    model: Denoiser,
    x: Tensor,
    cfg: SchedulerConfig,
    steps: int,
    *,
    start: int = 0,
    eta: float = 0.0,
    generator: Generators = None,
    callback: Callback | None = None,
) -> Tensor:
    """Run ``sampler`` (a key of ``SAMPLERS`` or a function) for ``steps`` steps from step ``start``.

    ``x``: the latents at step ``start`` in the sampler's scale: ``noise * init_noise_sigma(...)`` for a
    generation, ``add_noise(...)`` for img2img. ``eta`` is DDIM's alone.
    """
    sched = schedule(sampler, cfg, steps)
    _check_index(start, len(sched.timesteps) if isinstance(sched, PNDMSchedule) else steps, "start")
    fn = sampler if callable(sampler) else _METHODS[sampler][0]
    if fn is sample_ddim:
        return fn(model, x, sched, eta, generator=generator, callback=callback, start=start)
    if eta != 0:  # the diffusers pipeline silently ignores eta here
        raise UsageError(f"eta is a DDIM option; {sampler!r} does not take it (got eta={eta!r})")
    return fn(model, x, sched, generator=generator, callback=callback, start=start)
