"""Samplers against diffusers 0.42.1's schedulers, every name against the one it stands for.

DDIM's and DPM-Solver++'s schedules (timesteps, abar, sigmas) must be identical for every step count
1..250; every sampler's trajectory is run twice with the same deterministic fake denoiser and generator,
once through ``scheduler.step`` as the pipeline drives it and once through ours, and compared after every
step (<= 1e-6; bit for bit but for LMS, whose diffusers coefficients come from scipy's adaptive quadrature);
img2img starts (``start``, ``add_noise``) against ``set_begin_index`` + ``add_noise``.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor

from audioldm2_core.config import scheduler_config
from audioldm2_core.samplers import (
    SAMPLERS,
    KSchedule,
    _lms_coefficient,
    add_noise,
    ddim_schedule,
    dpm_schedule,
    init_noise_sigma,
    randn,
    sample,
    sample_ddim,
    sample_dpmpp_2m,
    sample_euler,
)
from tests.helpers import rel_err
from weights_tools.reference import DIFFUSERS_SCHEDULERS, diffusers_scheduler

HUB = json.loads(
    (
        Path(__file__).resolve().parents[1]
        / "weights_tools/hub_configs/cvssp__audioldm2/scheduler/scheduler_config.json"
    ).read_text()
)
STEPS = (1, 2, 3, 10, 20, 50, 200, 250)
# diffusers' own DPM, DEIS and KDPM2 code calls numpy functions on tensors, which numpy 2 flags; not our code.
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning"),
]
SHAPE = (2, 4, 8, 6)  # (B, C, t, f) latents, tiny


def hub(**overrides) -> dict:
    return {**HUB, **overrides}


def ref_ddim(d: dict) -> DDIMScheduler:
    return DDIMScheduler.from_config(d)


def ref_dpm(d: dict, karras: bool) -> DPMSolverMultistepScheduler:
    # What the AudioLDM 2 pipeline gets when a user swaps in DPM-Solver++ for the hub's DDIM.
    return DPMSolverMultistepScheduler.from_config(
        DDIMScheduler.from_config(d).config, use_karras_sigmas=karras
    )


class FakeDenoiser:
    """A fixed random channel-mixing map of x plus a t-dependent bias; records the timesteps it sees."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        c = SHAPE[1]
        self.w = 0.5 * torch.randn(c, c, generator=g) / c**0.5
        self.b = torch.randn(1, c, 1, 1, generator=g)
        self.seen: list[int] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append(int(t))
        mix = torch.einsum("oc,bchw->bohw", self.w.to(x.dtype), x)
        return mix + (torch.sin(t.to(torch.float32) / 150) * self.b).to(x.dtype)


def x_T(dtype=torch.float32) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1234)).to(dtype)


def reference_trajectory(sched, steps: int, x: torch.Tensor, **step_kwargs) -> tuple[list, list]:
    model = FakeDenoiser()
    sched.set_timesteps(steps)
    xs = []
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x, **step_kwargs).prev_sample
        xs.append(x)
    return xs, model.seen


def our_trajectory(sampler, x: torch.Tensor, sched, **kwargs) -> tuple[list, list]:
    model = FakeDenoiser()
    xs: list[torch.Tensor] = []
    steps: list[int] = []

    def callback(i: int, t: torch.Tensor, x_i: torch.Tensor) -> None:
        steps.append(i)
        xs.append(x_i)

    out = sampler(model, x, sched, callback=callback, **kwargs)
    assert out is xs[-1] and steps == list(range(len(sched.timesteps)))
    return xs, model.seen


def compare(ours: tuple[list, list], ref: tuple[list, list]) -> float:
    (xs, seen), (ref_xs, ref_seen) = ours, ref
    assert seen == ref_seen, "the denoiser was called at different timesteps"
    assert len(xs) == len(ref_xs)
    for a, b in zip(xs, ref_xs, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
    err = max(rel_err(a, b) for a, b in zip(xs, ref_xs, strict=True))
    assert err <= 1e-5, err
    return err


# ------------------------------------------------------------------------------------------ schedules


def _ref_is_broken(timesteps: torch.Tensor, steps: int) -> bool:
    t = timesteps.tolist()
    return len(t) != steps or min(t) < 0 or max(t) > 999 or len(set(t)) != len(t)


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # the hub: leading, steps_offset 1, set_alpha_to_one false
        {"steps_offset": 0, "set_alpha_to_one": True, "beta_schedule": "linear"},
        {"timestep_spacing": "trailing"},
        {"timestep_spacing": "linspace"},
    ],
)
def test_ddim_schedule_matches_for_all_step_counts(overrides):
    d = hub(**overrides)
    cfg, ref = scheduler_config(d), ref_ddim(d)
    refused = []
    for n in range(1, 251):
        ref.set_timesteps(n)
        try:
            s = ddim_schedule(cfg, n)
        except ValueError:
            assert _ref_is_broken(ref.timesteps, n), n
            refused.append(n)
            continue
        assert torch.equal(s.timesteps, ref.timesteps), n
        assert torch.equal(s.alphas_cumprod, ref.alphas_cumprod[ref.timesteps]), n
        prev = ref.timesteps - 1000 // n
        want = torch.stack(
            [ref.alphas_cumprod[p] if p >= 0 else ref.final_alpha_cumprod for p in prev.tolist()]
        )
        assert torch.equal(s.alphas_cumprod_prev, want), n
    if d["timestep_spacing"] == "trailing":  # numpy's float arange overshoot, see the module docstring
        assert refused == [61, 103, 121, 122, 201, 206, 217, 223, 227, 233, 242, 244]
    else:
        assert refused == []


@pytest.mark.parametrize(
    "spacing, karras",
    [
        ("leading", False),
        ("trailing", False),
        ("linspace", False),
        ("leading", True),
    ],  # Karras ignores spacing
)
def test_dpm_schedule_matches_for_all_step_counts(spacing, karras):
    d = hub(timestep_spacing=spacing)
    cfg, ref = scheduler_config(d), ref_dpm(d, karras)
    for n in range(1, 251):
        ref.set_timesteps(n)
        try:
            s = dpm_schedule(cfg, n, karras=karras)
        except ValueError:
            assert not karras and _ref_is_broken(ref.timesteps, n), n
            continue
        assert torch.equal(s.timesteps, ref.timesteps), n
        assert torch.equal(s.sigmas, ref.sigmas), n


def test_trailing_refusals_are_diffusers_overshoot():
    ref = ref_ddim(hub(timestep_spacing="trailing"))
    ref.set_timesteps(61)
    assert len(ref.timesteps) == 62 and ref.timesteps[-1] == -1  # the schedule we refuse to copy


# ----------------------------------------------------------------------------------------- trajectories


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_step_by_step(prediction_type, eta):
    d = hub(prediction_type=prediction_type)
    cfg, ref = scheduler_config(d), ref_ddim(d)
    for n in STEPS:
        g_ref, g_ours = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        want = reference_trajectory(ref, n, x_T(), eta=eta, generator=g_ref)
        compare(our_trajectory(sample_ddim, x_T(), ddim_schedule(cfg, n), eta=eta, generator=g_ours), want)


@pytest.mark.parametrize(
    "overrides",
    [
        {"steps_offset": 0, "set_alpha_to_one": True},
        {"beta_schedule": "linear", "timestep_spacing": "trailing"},
        {"timestep_spacing": "linspace", "prediction_type": "v_prediction"},
    ],
)
def test_ddim_config_options(overrides):
    d = hub(**overrides)
    cfg, ref = scheduler_config(d), ref_ddim(d)
    for n in (1, 10, 50):
        g_ref, g_ours = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        want = reference_trajectory(ref, n, x_T(), eta=0.5, generator=g_ref)
        compare(our_trajectory(sample_ddim, x_T(), ddim_schedule(cfg, n), eta=0.5, generator=g_ours), want)


def test_ddim_eta_noise_generators():
    """A list of per-sample generators, and the global RNG (generator=None), draw what diffusers draws."""
    cfg, ref = scheduler_config(HUB), ref_ddim(HUB)
    s = ddim_schedule(cfg, 10)
    gens = lambda: [torch.Generator().manual_seed(i) for i in (5, 6)]  # noqa: E731
    want = reference_trajectory(ref, 10, x_T(), eta=1.0, generator=gens())
    compare(our_trajectory(sample_ddim, x_T(), s, eta=1.0, generator=gens()), want)

    torch.manual_seed(11)
    want = reference_trajectory(ref, 10, x_T(), eta=1.0, generator=None)
    torch.manual_seed(11)
    compare(our_trajectory(sample_ddim, x_T(), s, eta=1.0, generator=None), want)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("karras", [False, True])
def test_dpmpp_2m_matches_step_by_step(prediction_type, karras):
    d = hub(prediction_type=prediction_type)
    cfg, ref = scheduler_config(d), ref_dpm(d, karras)
    for n in STEPS:
        want = reference_trajectory(ref, n, x_T(), generator=torch.Generator().manual_seed(0))
        compare(our_trajectory(sample_dpmpp_2m, x_T(), dpm_schedule(cfg, n, karras=karras)), want)


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_dpmpp_2m_other_spacings(spacing):
    d = hub(timestep_spacing=spacing)
    cfg, ref = scheduler_config(d), ref_dpm(d, False)
    for n in (3, 20):
        want = reference_trajectory(ref, n, x_T())
        compare(our_trajectory(sample_dpmpp_2m, x_T(), dpm_schedule(cfg, n)), want)


def test_bfloat16_latents_keep_diffusers_dtypes():
    cfg = scheduler_config(HUB)
    x = x_T(torch.bfloat16)
    want = reference_trajectory(ref_ddim(HUB), 10, x, eta=1.0, generator=torch.Generator().manual_seed(1))
    s = ddim_schedule(cfg, 10)
    g = torch.Generator().manual_seed(1)
    compare(our_trajectory(sample_ddim, x, s, eta=1.0, generator=g), want)
    want = reference_trajectory(ref_dpm(HUB, True), 10, x)
    s = dpm_schedule(cfg, 10, karras=True)
    compare(our_trajectory(sample_dpmpp_2m, x, s), want)


def test_randn_matches_randn_tensor():
    for gen in (
        lambda: torch.Generator().manual_seed(0),
        lambda: [torch.Generator().manual_seed(i) for i in (1, 2)],
    ):
        for dtype in (torch.float32, torch.float16):
            assert torch.equal(
                randn(SHAPE, gen(), "cpu", dtype), randn_tensor(SHAPE, gen(), torch.device("cpu"), dtype)
            )


# -------------------------------------------------------------------------------------- bad arguments


def test_bad_arguments():
    cfg = scheduler_config(HUB)
    x, model = x_T(), FakeDenoiser()
    for steps in (0, -1, 1001, 2.5, True, "10"):
        with pytest.raises(ValueError, match="steps"):
            ddim_schedule(cfg, steps)
        with pytest.raises(ValueError, match="steps"):
            dpm_schedule(cfg, steps)
    s = ddim_schedule(cfg, 2)
    for eta in (-0.1, 1.5, float("nan"), None):
        with pytest.raises(ValueError, match="eta"):
            sample_ddim(model, x, s, eta=eta)
    with pytest.raises(ValueError, match="unknown sampler 'eulr'; choose one of ddim, dpmpp-2m, "):
        sample("eulr", model, x, cfg, 10)
    with pytest.raises(ValueError, match="eta"):
        sample("dpmpp-2m", model, x, cfg, 10, eta=0.5)
    with pytest.raises(ValueError, match="generators"):
        randn(SHAPE, [torch.Generator()] * 3)


def test_refuses_schedules_diffusers_gets_wrong():
    # DDIM leading at T steps would feed t = 1000 (diffusers raises IndexError inside step()).
    with pytest.raises(ValueError, match="outside"):
        ddim_schedule(scheduler_config(HUB), 1000)
    # DPM leading: 999 steps reach t = 1000; 1000 steps give 1000 copies of t = 1.
    with pytest.raises(ValueError, match="outside"):
        dpm_schedule(scheduler_config(HUB), 999)
    with pytest.raises(ValueError, match="repeats"):
        dpm_schedule(scheduler_config(HUB), 1000)
    with pytest.raises(ValueError, match="timesteps"):
        ddim_schedule(scheduler_config(hub(timestep_spacing="trailing")), 61)
    assert len(dpm_schedule(scheduler_config(HUB), 1000, karras=True).timesteps) == 1000


# ------------------------------------------------------------------ every name against its scheduler
#
# The loop below is diffusers' AudioLDM2Pipeline's, with the fake denoiser for the UNet + guidance:
# latents * init_noise_sigma, then per timestep scale_model_input, the model, step (with the generator
# where step takes one). Ours goes through ``sample`` by name. Compared: the timesteps the model is given
# (exactly), and the latents after every step (Heun/KDPM2: after each step's second call).

HUB_CONFIGS = {  # the five checkpoints' scheduler configs, deduplicated (today they are all the same)
    json.dumps(c, sort_keys=True): c
    for c in (
        json.loads(f.read_text())
        for f in sorted(
            (Path(__file__).resolve().parents[1] / "weights_tools/hub_configs").glob("*/scheduler/*")
        )
    )
}
STEP_TOL = 1e-6
NAMES = list(DIFFUSERS_SCHEDULERS)
TWO_CALLS = {"heun", "kdpm2", "kdpm2-a"}  # diffusers' order 2: the timesteps are doubled


def test_the_table_names_every_sampler():
    assert list(SAMPLERS) == NAMES


class RecordingDenoiser(FakeDenoiser):
    def __call__(self, x, t):
        self.seen.append(float(t))  # fractional for the KDPM2 midpoints and Karras sigmas
        mix = torch.einsum("oc,bchw->bohw", self.w.to(x.dtype), x)
        return mix + (torch.sin(t.to(torch.float32) / 150) * self.b).to(x.dtype)


def diffusers_run(name, d, steps, x, *, start=0, x0=None, noise=None, seed=5):
    """diffusers' loop for sampler ``name``; from ``start`` as its img2img pipelines do (then x = add_noise)."""
    sched = diffusers_scheduler(name, d)
    sched.set_timesteps(steps)
    order = sched.order
    timesteps = sched.timesteps[start * order :]
    if start == 0:
        x = x * sched.init_noise_sigma
    else:
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(start * order)
        x = sched.add_noise(x0, noise, timesteps[:1].repeat(x0.shape[0]))
    model, g = RecordingDenoiser(), torch.Generator().manual_seed(seed)
    takes = inspect.signature(sched.step).parameters
    xs = []
    for t in timesteps:
        out = model(sched.scale_model_input(x, t), t)
        x = sched.step(out, t, x, **({"generator": g} if "generator" in takes else {})).prev_sample
        xs.append(x)
    if name in TWO_CALLS:  # one entry per step: after its second call, and the last (single-call) step
        xs = xs[1::2][: len(xs) // 2] + xs[-1:]
    return xs, model.seen


def our_run(name, d, steps, x, *, start=0, x0=None, noise=None, seed=5):
    cfg, model, xs, idx = scheduler_config(d), RecordingDenoiser(), [], []
    if start == 0:
        x = x * init_noise_sigma(name, cfg, steps)
    else:
        x = add_noise(name, cfg, steps, x0, noise, start)

    def callback(i, t, x_i):
        idx.append(i)
        xs.append(x_i)

    g = torch.Generator().manual_seed(seed)
    out = sample(name, model, x, cfg, steps, start=start, generator=g, callback=callback)
    assert out is xs[-1] and idx == list(range(start, start + len(idx)))
    return xs, model.seen


def compare_runs(ours, ref, tol=STEP_TOL) -> None:
    (xs, seen), (ref_xs, ref_seen) = ours, ref
    assert seen == ref_seen, "the denoiser was given different timesteps"
    assert len(xs) == len(ref_xs)
    for a, b in zip(xs, ref_xs, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert rel_err(a, b) <= tol, rel_err(a, b)


def _diffusers_refuses(name, d, steps) -> bool:
    try:
        diffusers_scheduler(name, d).set_timesteps(steps)
    except ValueError:  # PNDM under 4 steps: numpy cannot broadcast its warm-up
        return True
    return False


@pytest.mark.parametrize("name", NAMES)
def test_matches_diffusers_step_by_step(name):
    for d in HUB_CONFIGS.values():
        for steps in (1, 2, 3, 7, 20, 250):
            if _diffusers_refuses(name, d, steps):
                with pytest.raises(ValueError, match="at least 4 steps"):
                    sample(name, RecordingDenoiser(), x_T(), scheduler_config(d), steps)
                continue
            compare_runs(our_run(name, d, steps, x_T()), diffusers_run(name, d, steps, x_T()))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "overrides",
    [
        {"timestep_spacing": "trailing"},
        {"timestep_spacing": "linspace", "prediction_type": "v_prediction"},
        {"beta_schedule": "linear", "steps_offset": 0, "set_alpha_to_one": True},
    ],
    ids=["trailing", "linspace-v", "linear-offset0"],
)
def test_other_config_options(name, overrides):
    d = hub(**overrides)
    for steps in (4, 9, 20):
        compare_runs(our_run(name, d, steps, x_T()), diffusers_run(name, d, steps, x_T()))


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_latents_every_sampler(name):
    x = x_T(torch.bfloat16)
    compare_runs(our_run(name, HUB, 6, x), diffusers_run(name, HUB, 6, x), tol=0.0)


# -------------------------------------------------------------------- img2img: start and add_noise


def _model_calls(name, d, steps) -> int:
    sched = diffusers_scheduler(name, d)
    sched.set_timesteps(steps)
    return len(sched.timesteps)


@pytest.mark.parametrize("name", NAMES)
def test_start_matches_diffusers_img2img(name):
    """``add_noise(..., k)`` then ``sample(..., start=k)`` = diffusers' img2img loop from t_start = k."""
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(21))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(22))
    for steps in (5, 20):
        last = _model_calls(name, HUB, steps) - 1 if name == "pndm" else steps - 1  # PNDM: k counts calls
        for k in (1, 2, steps // 2, last):
            kw = dict(start=k, x0=x0, noise=noise)
            compare_runs(our_run(name, HUB, steps, None, **kw), diffusers_run(name, HUB, steps, None, **kw))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_noise_at_every_index(name, dtype):
    """The scheduler's own ``add_noise`` after ``set_begin_index(k * order)``, for every k (RePaint re-noises
    the known latents to the level of the next step)."""
    x0, noise = x_T(dtype), torch.randn(SHAPE, generator=torch.Generator().manual_seed(9)).to(dtype)
    cfg, steps = scheduler_config(HUB), 12
    ref = diffusers_scheduler(name, HUB)
    ref.set_timesteps(steps)
    indices = range(len(ref.timesteps)) if name == "pndm" else range(steps)
    for k in indices:
        if hasattr(ref, "set_begin_index"):
            ref.set_begin_index(k * ref.order)
        t = ref.timesteps[k * ref.order : k * ref.order + 1].repeat(SHAPE[0])
        want = ref.add_noise(x0, noise, t)
        got = add_noise(name, cfg, steps, x0, noise, k)
        assert got.dtype == want.dtype and torch.equal(got, want), (k, rel_err(got, want))


def test_start_and_index_are_checked():
    cfg, model = scheduler_config(HUB), RecordingDenoiser()
    for bad in (-1, 10, 2.0, True):
        with pytest.raises(ValueError, match="start must be an integer step index in"):
            sample("euler", model, x_T(), cfg, 10, start=bad)
        with pytest.raises(ValueError, match="index must be an integer step index in"):
            add_noise("unipc", cfg, 10, x_T(), x_T(), bad)
    with pytest.raises(ValueError, match="eta is a DDIM option"):
        sample("euler-a", model, x_T(), cfg, 10, eta=0.5)
    with pytest.raises(ValueError, match="unknown sampler"):
        init_noise_sigma("heun2", cfg, 10)


# ------------------------------------------------------------------------------- your own sampler


def test_a_function_is_a_sampler():
    """A callable with the built-ins' signature gets the VP ``dpm_schedule`` and the latents as they are."""
    cfg, seen = scheduler_config(HUB), []

    def mine(model, x, sched, generator=None, callback=None, start=0):
        seen.append((type(sched).__name__, start))
        return sample_dpmpp_2m(model, x, sched, generator=generator, callback=callback, start=start)

    assert init_noise_sigma(mine, cfg, 20) == 1.0
    got = sample(mine, RecordingDenoiser(), x_T(), cfg, 20)
    assert torch.equal(got, sample("dpmpp-2m", RecordingDenoiser(), x_T(), cfg, 20))
    assert seen == [("DPMSchedule", 0)]


def test_readme_example_sampler():
    """The README's ten-line sampler is Euler: ``sample_euler`` on the same sigmas and timesteps."""
    cfg = scheduler_config(HUB)
    got = sample(_readme_sampler(), RecordingDenoiser(), x_T(), cfg, 20)
    vp = dpm_schedule(cfg, 20)
    s0 = vp.sigmas[0]
    ve = KSchedule(vp.timesteps.float(), vp.sigmas, (s0**2 + 1) ** 0.5, "epsilon")
    want = sample_euler(RecordingDenoiser(), x_T() * ve.init_noise_sigma, ve)
    assert rel_err(got, want) <= 1e-5


def _readme_sampler():
    """The README's example sampler, executed from the README itself (so the two cannot drift apart)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in readme.split("```python")[1:] if "def my_euler" in b).split("```")[0]
    scope: dict = {}
    exec(block.split("\naudio = ")[0], scope)  # the definition, without the pipeline call after it
    return scope["my_euler"]


# --------------------------------------------------------------------------------------------- LMS


def test_lms_coefficients_equal_scipy_quadrature():
    ref = diffusers_scheduler("lms", HUB)
    ref.set_timesteps(30)
    for i in (0, 1, 2, 3, 10, 29):
        order = min(i + 1, 4)
        for j in range(order):
            want = ref.get_lms_coefficient(order, i, j)
            assert abs(_lms_coefficient(ref.sigmas, order, i, j) - want) <= 1e-6 * abs(want)
