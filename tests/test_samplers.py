"""Samplers against diffusers 0.42.1's ``DDIMScheduler`` and ``DPMSolverMultistepScheduler``.

Schedules (timesteps, abar, sigmas) must be identical for every step count 1..250; trajectories are run
twice with the same deterministic fake denoiser, once through ``scheduler.step`` and once through our
sampler, and compared after every step.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor

from audioldm2_core.config import scheduler_config
from audioldm2_core.samplers import (
    SAMPLERS,
    ddim_schedule,
    dpm_schedule,
    randn,
    sample,
    sample_ddim,
    sample_dpmpp_2m,
)
from tests.helpers import rel_err

HUB = json.loads(
    (
        Path(__file__).resolve().parents[1]
        / "weights_tools/hub_configs/cvssp__audioldm2/scheduler/scheduler_config.json"
    ).read_text()
)
STEPS = (1, 2, 3, 10, 20, 50, 200, 250)
# diffusers' own DPM set_timesteps calls np.array() on a tensor, which numpy 2 flags; not our code.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
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


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sample_dispatch(name):
    cfg = scheduler_config(HUB)
    ref = ref_ddim(HUB) if name == "ddim" else ref_dpm(HUB, name.endswith("karras"))
    want = reference_trajectory(ref, 20, x_T())
    calls = []
    got = sample(name, FakeDenoiser(), x_T(), cfg, 20, callback=lambda i, t, x: calls.append((i, int(t))))
    assert rel_err(got, want[0][-1]) <= 1e-5
    assert calls == list(enumerate(want[1]))


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
    with pytest.raises(ValueError, match="unknown sampler"):
        sample("euler", model, x, cfg, 10)
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
