"""End-to-end parity with diffusers' AudioLDM2Pipeline on reference-made tiny checkpoints: same seed, same audio."""

from __future__ import annotations

import copy
import platform
import re
import types

import numpy as np
import pytest
import torch

from audioldm2_core import AudioLDM2
from tests.helpers import rel_err
from tests.oracle import run_reference

WAVE_TOL = 1e-4  # whole generation, float32
SAMPLER_NAMES = {"ddim": "ddim", "dpmpp": "dpmpp-2m", "dpmpp-karras": "dpmpp-2m-karras"}


@pytest.fixture(scope="module")
def pipe(tiny_base):
    return AudioLDM2.from_pretrained(tiny_base)


def ours(pipe, prompt, *, seed=0, sampler="ddim", **kw):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return pipe(prompt, generator=g, sampler=SAMPLER_NAMES[sampler], output_type="pt", **kw).audios


def reference(path, prompt, *, seed=0, sampler="ddim", rerank=True, **kw):
    out = run_reference(path, prompt, seed=seed, sampler=sampler, **kw)
    if rerank:
        return out["audio"]
    keep = out["audio"].shape[1]
    return out["waveform_full"][:, :keep]  # the generation order, before diffusers' CLAP re-ranking


CASES = {
    "ddim-eta0": dict(sampler="ddim", eta=0.0),
    "ddim-eta1": dict(sampler="ddim", eta=1.0),
    "dpmpp": dict(sampler="dpmpp"),
    "dpmpp-karras": dict(sampler="dpmpp-karras"),
    "no-guidance": dict(guidance_scale=1.0),
    "negative": dict(negative_prompt="low quality, noise"),
    "guidance-7": dict(guidance_scale=7.0, negative_prompt="static"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_seed_same_audio(pipe, tiny_base, case):
    kw = dict(num_inference_steps=4, audio_length_in_s=1.0, **CASES[case])
    got = ours(pipe, "a dog barks in the rain", **kw)
    want = reference(tiny_base, "a dog barks in the rain", **kw)
    assert got.shape == want.shape == (1, 16000)
    assert rel_err(got, want) <= WAVE_TOL


@pytest.mark.parametrize("length", [1.0, 5.12, 10.24, 2.3])
def test_lengths(pipe, tiny_base, length):
    kw = dict(num_inference_steps=3, audio_length_in_s=length, negative_prompt="noise")
    got = ours(pipe, "thunder and heavy rain", **kw)
    want = reference(tiny_base, "thunder and heavy rain", **kw)
    assert got.shape == want.shape == (1, int(length * 16000))
    assert rel_err(got, want) <= WAVE_TOL


def test_batch_of_two_prompts(pipe, tiny_base):
    prompts = ["a cat meows", "an orchestra tunes up before the concert begins, strings and brass"]
    kw = dict(num_inference_steps=3, audio_length_in_s=1.0, negative_prompt=["noise", "hiss and hum"])
    got = ours(pipe, prompts, **kw)
    want = reference(tiny_base, prompts, **kw)
    assert got.shape == want.shape == (2, 16000)
    assert rel_err(got, want) <= WAVE_TOL


def test_waveforms_per_prompt_generation_order(pipe, tiny_base):
    kw = dict(num_inference_steps=3, audio_length_in_s=1.0, num_waveforms_per_prompt=2)
    got = ours(pipe, ["birdsong at dawn", "a train passes"], rerank=False, **kw)
    want = reference(tiny_base, ["birdsong at dawn", "a train passes"], rerank=False, **kw)
    assert got.shape == want.shape == (4, 16000)
    assert rel_err(got, want) <= WAVE_TOL


def test_given_latents(pipe, tiny_base):
    latents = torch.randn(1, 8, 25, 16, generator=torch.Generator().manual_seed(42))
    kw = dict(num_inference_steps=3, audio_length_in_s=1.0)
    got = ours(pipe, "wind chimes", seed=None, latents=latents.clone(), **kw)
    want = reference(tiny_base, "wind chimes", seed=None, latents=latents.clone(), **kw)
    assert rel_err(got, want) <= WAVE_TOL
    with pytest.raises(
        ValueError, match=r"latents have shape \(1, 8, 20, 16\); this request needs \(1, 8, 25, 16\)"
    ):
        ours(pipe, "wind chimes", latents=torch.zeros(1, 8, 20, 16), **kw)
    # the shape a request needs, as the call draws it from a seed (DDIM, eta 0: no other draw)
    assert pipe.latent_shape(1.0) == (1, 8, 25, 16) and pipe.latent_shape(1.0, batch=2) == (2, 8, 25, 16)
    drawn = torch.randn(pipe.latent_shape(1.0), generator=torch.Generator().manual_seed(7))
    assert torch.equal(
        ours(pipe, "wind chimes", seed=None, latents=drawn, **kw), ours(pipe, "wind chimes", seed=7, **kw)
    )


def test_output_types_and_dtype(pipe):
    kw = dict(num_inference_steps=2, audio_length_in_s=1.0)
    out = pipe("rain", generator=torch.Generator().manual_seed(0), **kw)
    assert (
        isinstance(out.audios, np.ndarray)
        and out.audios.dtype == np.float32
        and out.audios.shape == (1, 16000)
    )
    assert out.sample_rate == 16000
    lat = pipe("rain", generator=torch.Generator().manual_seed(0), output_type="latent", **kw).audios
    assert lat.shape == (1, 8, 25, 16)


def test_callback_and_encode_prompt(pipe, tiny_base):
    seen = []
    pipe(
        "rain",
        num_inference_steps=4,
        audio_length_in_s=1.0,
        callback=lambda i, t, x: seen.append((i, int(t))),
    )
    assert [i for i, _ in seen] == [0, 1, 2, 3]
    seen.clear()
    pipe(
        "rain",
        num_inference_steps=4,
        audio_length_in_s=1.0,
        callback_steps=2,
        callback=lambda i, t, x: seen.append(i),
    )
    assert seen == [0, 2]
    embeds, mask, generated = pipe.encode_prompt(
        "rain", num_waveforms_per_prompt=1, do_classifier_free_guidance=True
    )
    ref = run_reference(tiny_base, "rain", num_inference_steps=1, audio_length_in_s=1.0)
    assert rel_err(embeds, ref["prompt_embeds"]) <= 1e-5
    assert torch.equal(mask, ref["attention_mask"])
    assert rel_err(generated, ref["generated_prompt_embeds"]) <= 1e-5


def test_precomputed_embeddings(pipe, tiny_base):
    with torch.no_grad():  # as precomputed conditions are made (under autograd the sums run in another order)
        embeds, mask, generated = pipe.encode_prompt("a bell rings", do_classifier_free_guidance=False)
    kw = dict(num_inference_steps=2, audio_length_in_s=1.0, guidance_scale=1.0)
    a = ours(pipe, None, prompt_embeds=embeds, attention_mask=mask, generated_prompt_embeds=generated, **kw)
    b = ours(pipe, "a bell rings", **kw)
    assert rel_err(a, b) <= 1e-6


def test_large_unet_shape(tiny_large):
    pipe = AudioLDM2.from_pretrained(tiny_large)
    kw = dict(num_inference_steps=3, audio_length_in_s=1.0, negative_prompt="noise")
    assert rel_err(ours(pipe, "a car horn", **kw), reference(tiny_large, "a car horn", **kw)) <= WAVE_TOL


def test_low_memory_mode_is_identical(tiny_base, pipe):
    lean = AudioLDM2.from_pretrained(tiny_base, low_memory=True)
    assert lean.residency.modules == {}
    kw = dict(num_inference_steps=3, audio_length_in_s=1.0)
    assert torch.equal(ours(lean, "a kettle whistles", **kw), ours(pipe, "a kettle whistles", **kw))
    assert lean.residency.modules == {}  # everything released after its stage


def test_freed_heap_goes_back_after_each_stage_on_the_cpu(pipe, monkeypatch):
    """Resident too: after conditioning, denoising, the VAE and the vocoder the heap their activations freed is
    handed back (glibc's malloc_trim), so that it does not sit under the next stage's peak; the components
    stay loaded."""
    from audioldm2_core import residency

    trims = []
    monkeypatch.setattr(residency, "return_freed_memory", lambda: trims.append(1))
    loaded = set(pipe.residency.modules)
    ours(pipe, "a kettle whistles", num_inference_steps=2, audio_length_in_s=1.0)
    assert len(trims) >= 4 and set(pipe.residency.modules) == loaded


def test_decoder_stages_hand_back_the_heap_by_removable_hooks(pipe, monkeypatch):
    """On the CPU the heap goes back to the system before each of the VAE's up blocks and the vocoder's
    upsampling stages, for every waveform, by pre-hooks the pipeline installed on those modules when it loaded
    them (their handles in ``heap_hooks``, so that a user can remove them); the audio is the decoders' own."""
    from audioldm2_core import residency

    trims = []
    monkeypatch.setattr(residency, "return_freed_memory", lambda: trims.append(1))
    latents = torch.randn(2, 8, 25, 16, generator=torch.Generator().manual_seed(0))
    stages = [*pipe.vae.decoder.up_blocks, *pipe.vocoder.upsampler]
    hooked = [m for m in [*pipe.vae.modules(), *pipe.vocoder.modules()] if m._forward_pre_hooks]
    assert {id(m) for m in hooked} == {id(m) for m in stages}
    with torch.inference_mode():
        got = pipe.decode(latents)
        assert len(trims) == 2 * len(stages) + 1  # per waveform and stage; then once at the end of the stage
        for h in [*pipe.vae.heap_hooks, *pipe.vocoder.heap_hooks]:
            h.remove()
        mels = [pipe.vae.decode(z) for z in latents.split(1)]
        want = torch.cat([pipe.vocoder(m.squeeze(1)) for m in mels])
    assert not any(m._forward_pre_hooks for m in [*pipe.vae.modules(), *pipe.vocoder.modules()])
    assert len(trims) == 2 * len(stages) + 1  # removed: no more trims
    assert torch.equal(got, want)
    pipe.vae.heap_hooks = residency.return_heap_before(
        pipe.vae.decoder.up_blocks
    )  # as loaded, for the others
    pipe.vocoder.heap_hooks = residency.return_heap_before(pipe.vocoder.upsampler)


def test_heap_goes_back_only_where_it_can_lower_the_peak(monkeypatch):
    """malloc_trim runs when the RSS plus the heap glibc holds free reaches the process's peak so far (the
    float32 generation, whose peak grows stage by stage), not when the peak is far above (a bfloat16 load's
    conversions), where a trim only costs page faults; where the state is unknown it trims as before."""
    from audioldm2_core import residency as P

    MB = 1 << 20
    assert P.return_pays(rss=4076 * MB, peak=4164 * MB, free=488 * MB)  # float32, 10.24 s, measured
    assert not P.return_pays(rss=2261 * MB, peak=3295 * MB, free=80 * MB)  # bfloat16, measured
    assert P.return_pays(rss=100 * MB, peak=100 * MB, free=0)

    trims = []

    class Libc:
        def malloc_trim(self, pad):
            trims.append(pad)

    monkeypatch.setattr(P.ctypes, "CDLL", lambda name: Libc())
    for state, want in [((10 * MB, 100 * MB, MB), []), ((99 * MB, 100 * MB, MB), [0]), (None, [0, 0])]:
        monkeypatch.setattr(P, "heap_state", lambda s=state: s)
        P.return_freed_memory()
        assert trims == want


def test_heap_is_left_as_it_is_without_a_c_library_to_ask(monkeypatch):
    """Windows has no ``dlopen(NULL)`` (``ctypes.CDLL(None)`` raises ``TypeError`` there) and musl or macOS no
    ``malloc_trim``: the heap state is unknown and handing memory back does nothing, with no error, so a
    generation runs there as it does on glibc."""
    from audioldm2_core import residency as P

    def windows_cdll(name, *args, **kwargs):  # as CPython's on Windows: ``'/' in name`` with name None
        if name is None:
            raise TypeError("argument of type 'NoneType' is not iterable")
        raise OSError(name)

    monkeypatch.setattr(P.ctypes, "CDLL", windows_cdll)
    assert P.libc() is None and P.heap_state() is None
    P.return_freed_memory()
    monkeypatch.setattr(P.ctypes, "CDLL", lambda name: types.SimpleNamespace())  # a C library without them
    assert P.heap_state() is None
    P.return_freed_memory()


def test_heap_state_reads_this_process():
    """RSS, peak and free heap where glibc >= 2.33 gives them (Linux); None elsewhere, where the trim runs."""
    from audioldm2_core import residency as P

    libc, version = platform.libc_ver()
    state = P.heap_state()
    if libc != "glibc" or tuple(int(v) for v in version.split(".")[:2]) < (2, 33):
        assert state is None
        return
    rss, peak, free = state
    assert 0 < rss <= peak and free >= 0


def test_decode_one_waveform_at_a_time_on_the_cpu(pipe, monkeypatch):
    """On the CPU the VAE and the vocoder decode a batch one waveform at a time (the activations of one at the
    peak): the same waveforms as the batch decoded at once, to float32 rounding, in the same order."""
    latents = torch.randn(3, 8, 25, 16, generator=torch.Generator().manual_seed(0))
    calls = []
    decode = type(pipe.vae).decode
    monkeypatch.setattr(type(pipe.vae), "decode", lambda self, z: calls.append(len(z)) or decode(self, z))
    with torch.inference_mode():
        got = pipe.decode(latents)
        assert calls == [1, 1, 1]
        batched = pipe.vocoder(decode(pipe.vae, latents).squeeze(1)).float()
        vae, vocoder = copy.deepcopy(pipe.vae).double(), copy.deepcopy(pipe.vocoder).double()
        exact = vocoder(decode(vae, latents.double()).squeeze(1))
    assert got.shape == batched.shape == exact.shape
    for i in range(3):  # each waveform as exact as the batch decoded at once (both ~5e-6 from float64 here)
        assert rel_err(got[i], exact[i]) <= 1e-5 and rel_err(batched[i], exact[i]) <= 1e-5


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(num_inference_steps=0), ValueError, "num_inference_steps must be at least 1"),
        (dict(num_inference_steps=2.5), TypeError, "num_inference_steps must be an int"),
        (dict(audio_length_in_s=0.01), ValueError, "audio_length_in_s must be at least 0.04"),
        (dict(audio_length_in_s=-1.0), ValueError, "audio_length_in_s must be at least"),
        (dict(audio_length_in_s=float("nan")), ValueError, "audio_length_in_s must be at least"),
        (dict(audio_length_in_s=1e6), ValueError, "audio_length_in_s must be at most"),
        (dict(guidance_scale=float("inf")), ValueError, "guidance_scale must be a finite number"),
        (dict(guidance_scale=-2.0), ValueError, "guidance_scale must be >= 0"),
        (dict(num_waveforms_per_prompt=0), ValueError, "num_waveforms_per_prompt must be a positive int"),
        (dict(output_type="wav"), ValueError, "output_type must be"),
        (dict(sampler="eulr"), ValueError, "unknown sampler 'eulr'"),
        (dict(sampler="pndm"), ValueError, "PNDM needs at least 4 steps"),
        (dict(eta=2.0), ValueError, "eta must be a number in"),
    ],
)
def test_bad_arguments(pipe, kwargs, error, message):
    kw = dict(num_inference_steps=2, audio_length_in_s=1.0) | kwargs
    with pytest.raises(error, match=message):
        pipe("rain", **kw)


def test_bad_prompts(pipe):
    with pytest.raises(ValueError, match="give a prompt"):
        pipe(None, num_inference_steps=1, audio_length_in_s=1.0)
    with pytest.raises((TypeError, ValueError)):
        pipe(42, num_inference_steps=1, audio_length_in_s=1.0)


# ------------------------------------------------------------------------------------------ re-ranking


def test_candidate_order_equals_reference_for_one_prompt(pipe, tiny_base):
    kw = dict(num_inference_steps=3, audio_length_in_s=1.0, num_waveforms_per_prompt=3)
    g = torch.Generator().manual_seed(5)
    out = pipe("church bells ring", generator=g, output_type="pt", **kw)
    ref = run_reference(tiny_base, "church bells ring", seed=5, **kw)
    assert out.audios.shape == ref["audio"].shape == (3, 16000)
    assert rel_err(out.audios, ref["audio"]) <= WAVE_TOL  # same candidates in the same (ranked) order
    assert out.scores.shape == (1, 3) and bool((out.scores[:, :-1] >= out.scores[:, 1:]).all())
    keep = ref["audio"].shape[1]
    generated = ref["waveform_full"][:, :keep]
    # every returned waveform is one of this prompt's generated candidates, each once
    matches = [min(range(3), key=lambda j, a=a: rel_err(a, generated[j])) for a in out.audios]
    assert sorted(matches) == [0, 1, 2]


def test_ranking_stays_within_each_prompt(pipe):
    prompts = ["a dog barks", "waves crash on the beach"]
    kw = dict(num_inference_steps=2, audio_length_in_s=1.0, num_waveforms_per_prompt=2, output_type="pt")
    ranked = pipe(prompts, generator=torch.Generator().manual_seed(1), **kw)
    plain = pipe(prompts, generator=torch.Generator().manual_seed(1), rerank=False, **kw)
    assert plain.scores is None and ranked.scores.shape == (2, 2)
    for p in range(2):
        own = {tuple(plain.audios[p * 2 + j][:8].tolist()) for j in range(2)}
        got = {tuple(ranked.audios[p * 2 + j][:8].tolist()) for j in range(2)}
        assert got == own  # prompt p keeps its own two candidates, reordered at most


def test_audio_branch_unloaded_without_candidates(tiny_base):
    pipe = AudioLDM2.from_pretrained(tiny_base)
    pipe("rain", num_inference_steps=1, audio_length_in_s=1.0)
    assert "clap_audio" not in pipe.residency.modules
    pipe("rain", num_inference_steps=1, audio_length_in_s=1.0, num_waveforms_per_prompt=2)
    assert "clap_audio" in pipe.residency.modules
    with pytest.raises(ValueError, match="re-ranking needs the prompt text"):
        e, m, g = pipe.encode_prompt("rain", do_classifier_free_guidance=False)
        pipe(
            None,
            prompt_embeds=e,
            generated_prompt_embeds=g,
            guidance_scale=1.0,
            rerank=True,
            audio_length_in_s=1.0,
        )


# ------------------------------------------------------------------------------- speech checkpoints

ESPEAK = __import__("shutil").which("espeak-ng") or __import__("shutil").which("espeak")
SPEECH = dict(prompt="A man speaks clearly in a quiet room", num_inference_steps=3, audio_length_in_s=1.0)


@pytest.mark.skipif(ESPEAK is None, reason="espeak-ng is not installed (the phonemiser's program)")
@pytest.mark.parametrize("variant", ["gigaspeech", "ljspeech"])
def test_speech_same_seed_same_audio(request, variant):
    """Text to speech with phonemisation, as diffusers' pipeline with a VitsModel runs it."""
    path = request.getfixturevalue(f"tiny_{variant}")
    kw = dict(transcription="Hello world, it's me!", negative_prompt="noise", max_new_tokens=8)
    prompt = SPEECH["prompt"]
    got = ours(
        AudioLDM2.from_pretrained(path), prompt, **{k: v for k, v in SPEECH.items() if k != "prompt"}, **kw
    )
    want = reference(path, prompt, **{k: v for k, v in SPEECH.items() if k != "prompt"}, **kw)
    assert got.shape == want.shape == (1, 16000)
    assert rel_err(got, want) <= WAVE_TOL


def _reference_phonemes(path, prompt, **kw):
    """The reference reading IPA as it is: its tokenizer told not to normalise or phonemise."""
    from tests.oracle import reference_pipeline

    tok = reference_pipeline(str(path)).tokenizer_2
    saved = tok.phonemize, tok.normalize
    tok.phonemize = tok.normalize = False
    try:
        return reference(path, prompt, **kw)
    finally:
        tok.phonemize, tok.normalize = saved


def test_speech_phonemes_batch(tiny_gigaspeech):
    """The phoneme path (no espeak-ng anywhere), two prompts with their transcriptions, no guidance."""
    prompts = ["A man speaks", "A woman sings softly"]
    ipa = ["həlˈoʊ wˈɜːld", "ðə kwˈɪk bɹˈaʊn fˈɑːks."]
    kw = dict(num_inference_steps=2, audio_length_in_s=1.0, max_new_tokens=6, guidance_scale=1.0)
    pipe = AudioLDM2.from_pretrained(tiny_gigaspeech)
    got = ours(pipe, prompts, transcription=ipa, transcription_is_phonemes=True, **kw)
    want = _reference_phonemes(tiny_gigaspeech, prompts, transcription=ipa, **kw)
    assert got.shape == want.shape == (2, 16000)
    assert rel_err(got, want) <= WAVE_TOL


def test_speech_checkpoint_max_new_tokens_default(tiny_ljspeech):
    """The checkpoint's own GPT-2 length is the default: 512 states for both halves of the guidance batch."""
    pipe = AudioLDM2.from_pretrained(tiny_ljspeech, fast=False)  # no speed-layer timing: a shape check
    assert pipe.max_new_tokens == 512
    with torch.inference_mode():
        embeds = pipe.encode_prompt("A man speaks", transcription="ɪts mˌiː!", transcription_is_phonemes=True)
    assert embeds[2].shape == (2, 512, 32) and embeds[0].shape == (2, 310, 24)


@pytest.mark.slow  # the reference's 2 x 512 GPT-2 calls take a minute or more on a loaded 2-core CPU
def test_speech_checkpoint_max_new_tokens(tiny_ljspeech):
    """Same seed, same speech with the checkpoint's own 512 GPT-2 states."""
    pipe = AudioLDM2.from_pretrained(tiny_ljspeech)
    kw = dict(num_inference_steps=2, audio_length_in_s=1.0, transcription="ɪts mˌiː!")
    got = ours(pipe, "A man speaks", transcription_is_phonemes=True, **kw)
    want = _reference_phonemes(tiny_ljspeech, "A man speaks", **kw)
    assert rel_err(got, want) <= WAVE_TOL


def test_speech_errors(tiny_gigaspeech, pipe):
    speech = AudioLDM2.from_pretrained(tiny_gigaspeech, low_memory=True)
    with pytest.raises(ValueError, match="text-to-speech checkpoint: pass `transcription=`"):
        speech("a man speaks", num_inference_steps=1, audio_length_in_s=1.0)
    with pytest.raises(ValueError, match="`transcription` is for the text-to-speech checkpoints"):
        pipe("a dog", transcription="woof", num_inference_steps=1, audio_length_in_s=1.0)


@pytest.mark.skipif(ESPEAK is None, reason="espeak-ng is not installed (the phonemiser's program)")
def test_readme_speech_example(tiny_ljspeech):
    """The README's text-to-speech example, on the tiny checkpoint (2 steps, 1 s, 6 GPT-2 states): the same
    speech as diffusers' pipeline called with the same arguments."""
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme.split("## Text to speech", 1)[1], re.S).group(1)
    edits = {
        '"anhnct/audioldm2_ljspeech"': repr(str(tiny_ljspeech)),
        "num_inference_steps=200": "num_inference_steps=2",
        "audio_length_in_s=5.0": "audio_length_in_s=1.0",
        "max_new_tokens=512": "max_new_tokens=6",
    }
    for old, new in edits.items():
        assert old in code
        code = code.replace(old, new)
    scope: dict = {}
    exec(compile(code, "README", "exec"), scope)
    kw = dict(num_inference_steps=2, audio_length_in_s=1.0, max_new_tokens=6)
    want = reference(
        tiny_ljspeech, "A female reporter is speaking", transcription="Wish you have a good day", **kw
    )
    assert rel_err(scope["speech"], want[0]) <= WAVE_TOL


# ------------------------------------------------------------------------------------------ audio input


def reference_latent_dist(root, mel: torch.Tensor):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(f"{root}/vae").eval()
    with torch.no_grad():
        return vae.encode(mel).latent_dist, vae.config.scaling_factor


def test_encode_audio_matches_reference_encoder(pipe, tiny_base, tmp_path):
    """A 22.05 kHz stereo waveform -> the front end's log-mel -> diffusers' encoder, at the UNet's scale."""
    import soundfile as sf

    from audioldm2_core.audio import load_audio, log_mel, mel_frames

    stereo = (0.2 * np.random.default_rng(0).standard_normal((2, 27000))).astype(np.float32)  # 1.22 s
    wave = load_audio(stereo, 22050)
    frames = mel_frames(wave.shape[0], 4)  # the input rounded up to whole latent frames
    dist, scale = reference_latent_dist(tiny_base, log_mel(wave, frames)[None, None])
    got = pipe.encode_audio(stereo, 22050)
    assert got.shape == (1, 8, frames // 4, 16) and frames * 160 >= wave.shape[0] > (frames - 4) * 160
    assert rel_err(got, scale * dist.mean) <= 1e-5
    sf.write(tmp_path / "in.wav", stereo.T, 22050, subtype="FLOAT")
    assert torch.equal(pipe.encode_audio(tmp_path / "in.wav"), got)  # a file reads as its array
    drawn = pipe.encode_audio(stereo, 22050, sample=True, generator=torch.Generator().manual_seed(3))
    assert rel_err(drawn, scale * dist.sample(torch.Generator().manual_seed(3))) <= 1e-5


def test_text_to_audio_never_reads_the_encoder(tiny_base, monkeypatch):
    """Text-to-audio keeps today's memory: the VAE file's encoder tensors are read only when audio comes in,
    and with low_memory the encoder is released after encoding."""
    from audioldm2_core import vae

    halves = []
    real = vae._vae_keys
    monkeypatch.setattr(vae, "_vae_keys", lambda ckpt, half: halves.append(half) or real(ckpt, half))
    full = AudioLDM2.from_pretrained(tiny_base)  # loads every component text-to-audio uses
    assert halves == ["decoder"] and "vae_encoder" not in full.residency.modules
    full.encode_audio(np.zeros(16000, dtype=np.float32), 16000)
    assert halves == ["decoder", "encoder"] and "vae_encoder" in full.residency.modules
    lean = AudioLDM2.from_pretrained(tiny_base, low_memory=True)
    lean.encode_audio(np.ones(8000, dtype=np.float32), 16000)
    assert lean.residency.modules == {}


@pytest.mark.parametrize(
    "audio, sample_rate, error, message",
    [
        (
            np.zeros(601 * 100, dtype=np.float32),
            100,
            ValueError,
            r"601\.0 s long; at most 600",
        ),  # 601 s at 100 Hz
        ("missing.wav", None, ValueError, r"missing\.wav does not exist"),
        (np.array([0.0, np.nan]), 16000, ValueError, "NaN"),
        (np.zeros(0, dtype=np.float32), 16000, ValueError, "empty"),
        (b"RIFF", None, TypeError, "file path, a numpy array or a torch tensor"),
    ],
)
def test_encode_audio_bad_input(pipe, audio, sample_rate, error, message):
    with pytest.raises(error, match=message):
        pipe.encode_audio(audio, sample_rate)
