"""End to end, every sampler name: our pipeline against diffusers' AudioLDM2Pipeline with the scheduler that
name stands for swapped in (``weights_tools.reference.DIFFUSERS_SCHEDULERS``), same seed, same audio.

Split from test_pipeline.py to keep that file about the pipeline itself; the samplers are checked step by
step in test_samplers.py.
"""

from __future__ import annotations

import pytest
import torch

from audioldm2_core import AudioLDM2
from audioldm2_core.samplers import SAMPLERS, sample_dpmpp_2m
from tests.helpers import rel_err
from tests.oracle import run_reference

WAVE_TOL = 1e-4  # whole generation, float32
# diffusers' numpy-on-tensor calls in the DPM, DEIS and KDPM2 schedulers, flagged by numpy 2; not our code
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning"),
]


@pytest.fixture(scope="module")
def pipe(tiny_base):
    return AudioLDM2.from_pretrained(tiny_base)


# Short and few steps to keep the time low: what this adds to the step-by-step tests is the wiring (initial
# latents scaled by init_noise_sigma, the UNet's input scaled under guidance, float timesteps, the generator's
# draws shared by x_T and the steps), which two steps exercise. PNDM's warm-up needs 4 (13 UNet calls).
KW = dict(audio_length_in_s=0.64, guidance_scale=3.5)


def generate(pipe, sampler, steps, **kw):
    g = torch.Generator().manual_seed(0)
    return pipe("a dog barks", generator=g, sampler=sampler, num_inference_steps=steps, output_type="pt",
                **KW, **kw).audios  # fmt: skip


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_same_seed_same_audio(pipe, tiny_base, name):
    steps = 4 if name == "pndm" else 2
    got = generate(pipe, name, steps)
    want = run_reference(tiny_base, "a dog barks", seed=0, sampler=name, num_inference_steps=steps, **KW)[
        "audio"
    ]
    assert got.shape == want.shape == (1, 10240)
    assert rel_err(got, want) <= WAVE_TOL


def test_given_latents_are_scaled_like_diffusers(pipe, tiny_base):
    """User latents are N(0, I) draws: the VE samplers scale them by init_noise_sigma, as diffusers does."""
    latents = torch.randn(1, 8, 25, 16, generator=torch.Generator().manual_seed(42))
    latents = latents[:, :, :16]  # 0.64 s
    kw = dict(num_inference_steps=2, sampler="euler", **KW)
    got = pipe("wind chimes", latents=latents.clone(), output_type="pt", **kw).audios
    want = run_reference(tiny_base, "wind chimes", seed=None, latents=latents.clone(), **kw)["audio"]
    assert rel_err(got, want) <= WAVE_TOL


def test_a_function_as_sampler(pipe):
    calls = []

    def mine(model, x, sched, generator=None, callback=None, start=0):
        calls.append(len(sched.timesteps))
        return sample_dpmpp_2m(model, x, sched, generator=generator, callback=callback, start=start)

    assert torch.equal(generate(pipe, mine, 3), generate(pipe, "dpmpp-2m", 3)) and calls == [3]
