"""Audio in, audio out (``editing.py`` and the pipeline's ``audio=``): style transfer against a loop built from
diffusers' own parts with the pinned convention, inpainting and super-resolution keeping the input's latents,
lengths, candidates and the errors for bad input and settings.

diffusers has no audio input for AudioLDM 2, so the reference is its img2img recipe on its AudioLDM 2 parts:
``pipe.encode_prompt``; z0 = ``AutoencoderKL.encode(mel).latent_dist.mean * scaling_factor`` (the mel from our
front end, checked against the original code in test_audio.py); noise = ``randn_tensor(z0.shape, generator)``
first; ``get_timesteps`` (init = min(int(steps * strength), steps), t_start = steps - init),
``set_begin_index(t_start * order)``, ``add_noise`` at the first kept timestep; the AudioLDM2Pipeline's own
loop body (``scale_model_input``, ``unet``, guidance, ``step``) over the kept timesteps; ``vae.decode``,
``mel_spectrogram_to_waveform``, trimmed to the input's length.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audioldm2_core import AudioLDM2
from audioldm2_core.audio import latent_mask, load_audio, log_mel, mel_frames
from audioldm2_core.editing import super_resolution_cutoff
from audioldm2_core.noise import randn
from audioldm2_core.request import AudioEdit
from audioldm2_core.samplers import SAMPLERS, add_noise
from tests.helpers import rel_err
from tests.oracle import reference_pipeline

WAVE_TOL = 1e-4  # whole generation, float32
pytestmark = [  # diffusers' numpy-on-tensor calls in its DPM schedulers, flagged by numpy 2; not our code
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning"),
]


@pytest.fixture(scope="module")
def pipe(tiny_base):
    return AudioLDM2.from_pretrained(tiny_base)


def clip(seconds=0.7, rate=22050, seed=0):
    """A stereo test input at a rate the model does not use (so it is resampled)."""
    return (0.2 * np.random.default_rng(seed).standard_normal((2, int(seconds * rate)))).astype(np.float32)


def reference_style_transfer(path, prompt, audio, rate, *, sampler, steps, strength, seed=0, guidance=3.5):
    """diffusers' parts, img2img's convention (see the module docstring)."""
    from diffusers.utils.torch_utils import randn_tensor

    from weights_tools.reference import diffusers_scheduler

    ref = reference_pipeline(str(path))
    ref.scheduler = scheduler = diffusers_scheduler(sampler, ref.hub_scheduler.config)  # as run_reference
    g = torch.Generator().manual_seed(seed)
    wave = load_audio(audio, rate)
    mel = log_mel(wave, mel_frames(wave.shape[0], 4))[None, None]  # (1, 1, frames, 64)
    with torch.no_grad():
        embeds, mask, generated = ref.encode_prompt(prompt, torch.device("cpu"), 1, guidance > 1)
        z0 = ref.vae.encode(mel).latent_dist.mean * ref.vae.config.scaling_factor
        noise = randn_tensor(z0.shape, generator=g, dtype=z0.dtype)
        scheduler.set_timesteps(steps)
        init = min(int(steps * strength), steps)
        t_start = max(steps - init, 0)
        timesteps = scheduler.timesteps[t_start * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):  # as img2img: DDIM, DDPM, PNDM have none (no step counter)
            scheduler.set_begin_index(t_start * scheduler.order)
        latents = scheduler.add_noise(z0, noise, timesteps[:1].repeat(z0.shape[0]))
        extra = ref.prepare_extra_step_kwargs(g, 0.0)
        for t in timesteps:  # the body of AudioLDM2Pipeline.__call__'s loop
            x = torch.cat([latents] * 2) if guidance > 1 else latents
            x = scheduler.scale_model_input(x, t)
            out = ref.unet(x, t, encoder_hidden_states=generated, encoder_hidden_states_1=embeds,
                           encoder_attention_mask_1=mask, return_dict=False)[0]  # fmt: skip
            if guidance > 1:
                uncond, cond = out.chunk(2)
                out = uncond + guidance * (cond - uncond)
            latents = scheduler.step(out, t, latents, **extra).prev_sample
        mel_out = ref.vae.decode(latents / ref.vae.config.scaling_factor).sample
        return ref.mel_spectrogram_to_waveform(mel_out)[:, : wave.shape[0]]


@pytest.mark.parametrize(
    "sampler, steps, strength",
    [("ddim", 4, 0.6), ("dpmpp-2m", 4, 0.6), ("euler", 4, 0.6), ("heun", 4, 0.6), ("euler-a", 3, 1.0)],
)
def test_style_transfer_matches_diffusers_parts(pipe, tiny_base, sampler, steps, strength):
    audio = clip()
    got = pipe("jazz version", audio=audio, audio_sample_rate=22050, strength=strength, sampler=sampler,
               num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt").audios  # fmt: skip
    want = reference_style_transfer(
        tiny_base, "jazz version", audio, 22050, sampler=sampler, steps=steps, strength=strength
    )
    assert got.shape == want.shape == (1, load_audio(audio, 22050).shape[0])  # the input's length
    assert rel_err(got, want) <= WAVE_TOL


def start_index(steps, strength):
    return AudioEdit("in.wav", strength=strength).start_index(steps)


def test_start_index_is_get_timesteps():
    assert [start_index(10, s) for s in (1.0, 0.6, 0.55, 0.1)] == [0, 4, 5, 9]
    assert start_index(3, 0.34) == 2  # int(1.02) = 1 step
    with pytest.raises(ValueError, match=r"runs no step \(int\(4 \* 0.2\) = 0\)"):
        start_index(4, 0.2)
    for bad in (0, 0.0, 1.5, -1, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match=r"strength must be a number in \(0, 1\]"):
            start_index(10, bad)


def encoded(pipe, *args):
    """z0 as the pipeline computes it inside a call: in inference mode, where the speed layer runs (under
    autograd it stands aside, and where a rewrite pays on this CPU, e.g. Winograd on an SSE-only one, the
    two differ by float32 rounding, while the kept latents must equal the call's own z0 exactly)."""
    with torch.inference_mode():
        return pipe.encode_audio(*args)


def kept_equal(latents, z0, mask):
    return torch.equal(torch.where(mask, 0.0, latents), torch.where(mask, 0.0, z0.expand_as(latents)))


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_inpainting_keeps_the_input_with_every_sampler(pipe, sampler):
    """The kept latents are the input's exactly after the last step, in the sampler's own x (the callback
    sees them) and in the output; the regenerated span is new."""
    audio = clip(0.5, 16000)
    z0 = encoded(pipe, audio, 16000)  # (1, 8, 13, 16)
    mask = latent_mask(z0.shape[2], [(0.2, 0.32)])
    last = {}
    steps = 4 if sampler == "pndm" else 2
    out = pipe("a bell", audio=audio, audio_sample_rate=16000, inpaint_spans_s=[(0.2, 0.32)], sampler=sampler,
               num_inference_steps=steps, generator=torch.Generator().manual_seed(1), output_type="latent",
               callback=lambda i, t, x: last.update(x=x.clone())).audios  # fmt: skip
    assert out.shape == z0.shape and kept_equal(out, z0, mask) and kept_equal(last["x"], z0, mask)
    assert not torch.allclose(out[..., mask], z0[..., mask])


def test_inpainting_follows_audioldm_masking(pipe):
    """Before each step the kept region holds z0 noised to that step's level with fresh noise (AudioLDM's
    ``q_sample`` before ``p_sample_ddim``); the draws: the start's noise, then one per step."""
    audio, steps, cfg = clip(0.5, 16000), 3, pipe.scheduler_config
    z0 = encoded(pipe, audio, 16000)
    mask = latent_mask(z0.shape[2], [(0.1, 0.2), (0.3, 0.4)])
    seen = []
    pipe("rain", audio=audio, audio_sample_rate=16000, inpaint_spans_s=[(0.1, 0.2), (0.3, 0.4)],
         num_inference_steps=steps, generator=torch.Generator().manual_seed(2), output_type="latent",
         callback=lambda i, t, x: seen.append(x.clone()))  # fmt: skip
    g = torch.Generator().manual_seed(2)
    start = add_noise("ddim", cfg, steps, z0, randn(z0.shape, g), 0)  # the whole start: strength 1
    known = [add_noise("ddim", cfg, steps, z0, randn(z0.shape, g), k) for k in (1, 2)] + [z0]
    assert not kept_equal(start, z0, mask)
    for x, want in zip(seen, known, strict=True):
        assert kept_equal(x, want, mask)


def test_inpainting_bands_and_strength(pipe):
    """A band within a span; a strength < 1 starts from the input there too, and the rest stays."""
    audio = clip(0.5, 16000)
    z0 = encoded(pipe, audio, 16000)
    mask = latent_mask(z0.shape[2], [(0.1, 0.3)], [(2000, 4000)])
    out = pipe("birds", audio=audio, audio_sample_rate=16000, inpaint_spans_s=[(0.1, 0.3)],
               inpaint_bands_hz=[(2000, 4000)], strength=0.5, num_inference_steps=4, output_type="latent",
               generator=torch.Generator().manual_seed(0)).audios  # fmt: skip
    assert kept_equal(out, z0, mask) and 0 < mask.sum() < mask.numel() // 4


def test_super_resolution_keeps_the_low_band(pipe, tmp_path):
    import soundfile as sf

    narrow = (0.3 * np.random.default_rng(4).standard_normal(4000)).astype(np.float32)  # 0.5 s at 8 kHz
    sf.write(tmp_path / "phone.wav", narrow, 8000, subtype="FLOAT")  # the same samples as the array
    z0 = encoded(pipe, tmp_path / "phone.wav")
    mask = latent_mask(z0.shape[2], bands_hz=[(4000, 8000)])
    kw = dict(num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0))
    out = pipe("speech", audio=tmp_path / "phone.wav", super_resolution=True, **kw).audios  # cutoff: 4 kHz
    bins = mask[0].tolist()  # the top latent bins, from the one holding 4 kHz up
    assert kept_equal(out, z0, mask) and bins == sorted(bins) and bins[-1] and not bins[0]
    assert not torch.allclose(out[..., mask], z0[..., mask])
    assert super_resolution_cutoff(8000) == 4000 and super_resolution_cutoff(44100, 3000) == 3000
    wide = pipe("speech", audio=narrow, audio_sample_rate=8000, super_resolution=True, cutoff_hz=6000,
                num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0)).audios  # fmt: skip
    assert kept_equal(wide, z0, latent_mask(z0.shape[2], bands_hz=[(6000, 8000)]))


def test_lengths_and_candidates(pipe):
    audio = clip(0.7, 22050)
    n = load_audio(audio, 22050).shape[0]
    kw = dict(audio=audio, audio_sample_rate=22050, num_inference_steps=2, output_type="pt")
    assert pipe("x", **kw).audios.shape == (1, n)
    assert pipe("x", audio_length_in_s=0.5, **kw).audios.shape == (1, 8000)  # cut
    assert pipe("x", audio_length_in_s=1.0, **kw).audios.shape == (1, 16000)  # padded with silence
    out = pipe("x", num_waveforms_per_prompt=2, **kw)  # candidates ranked by CLAP, as text-to-audio
    assert out.audios.shape == (2, n) and out.scores.shape == (1, 2) and out.scores[0, 0] >= out.scores[0, 1]
    two = pipe(["x", "y"], **kw).audios  # one input for a batch of prompts
    assert two.shape == (2, n)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(strength=0.1), ValueError, r"runs no step"),
        (dict(strength=1.2), ValueError, r"strength must be a number in \(0, 1\]"),
        (dict(latents=torch.zeros(1, 8, 18, 16)), ValueError, "latents or audio, not both"),
        (dict(cutoff_hz=3000), ValueError, "pass super_resolution=True"),
        (dict(super_resolution=True), ValueError, r"sample rate is 22050 Hz, so nothing"),
        (dict(super_resolution=True, cutoff_hz=9000), ValueError, "cutoff_hz must be between 0 and 8000"),
        (dict(inpaint_spans_s=[(2.0, 3.0)]), ValueError, r"starts after the audio's end"),
        (dict(inpaint_spans_s=[(0.3, 0.1)]), ValueError, r"need 0 <= start < end"),
        (dict(audio_length_in_s=0.0), ValueError, r"audio_length_in_s must be in \(0, 600"),
        (dict(audio=np.array([0.0, np.nan]), audio_sample_rate=16000), ValueError, "NaN"),
        (dict(audio=np.zeros(0, np.float32), audio_sample_rate=16000), ValueError, "empty"),
        (dict(audio="missing.wav", audio_sample_rate=None), ValueError, r"missing\.wav does not exist"),
        (dict(audio=np.zeros(601 * 100, np.float32), audio_sample_rate=100), ValueError, "at most 600"),
        (dict(audio=[0.0, 0.1], audio_sample_rate=16000), TypeError, "a file path, a numpy array"),
        (dict(audio_sample_rate=None), ValueError, "needs its sample_rate"),
    ],
)
def test_bad_input_and_settings(pipe, kwargs, error, message):
    kw = dict(audio=clip(0.7), audio_sample_rate=22050, num_inference_steps=4) | kwargs
    with pytest.raises(error, match=message):
        pipe("x", **kw)


@pytest.mark.parametrize("name", ["strength", "inpaint_spans_s", "super_resolution", "audio_sample_rate"])
def test_editing_options_need_audio(pipe, name):
    value = {"strength": 0.5, "inpaint_spans_s": [(0, 1)], "super_resolution": True}.get(name, 16000)
    with pytest.raises(ValueError, match=rf"{name}: only with input audio \(pass audio=\)"):
        pipe("x", num_inference_steps=2, **{name: value})
