"""Audio front ends. CLAP's: resampling against librosa.resample (its default, soxr_hq) and log-mel features
against transformers' ClapFeatureExtractor, for shorter, exactly-10-s and longer audio. The model's (audio in):
the log-mel against the original AudioLDM 2 code (PyPI ``audioldm2``, read in place) and a librosa reference,
reading and checking input audio, and the latent mask of time spans and frequency bands."""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from audioldm2_core.audio import (
    clap_features,
    latent_mask,
    load_audio,
    log_mel,
    mel_filter_bank,
    mel_frames,
    resample,
    slaney_mel_filters,
)
from audioldm2_core.config import feature_extractor_config
from tests.helpers import rel_err

HUB_FE = Path(__file__).parents[1] / "weights_tools/hub_configs/cvssp__audioldm2/feature_extractor"


def hub_dict(**changes) -> dict:
    return {**json.loads((HUB_FE / "preprocessor_config.json").read_text()), **changes}


def reference_extractor(d: dict):
    from transformers import ClapFeatureExtractor

    return ClapFeatureExtractor(**{k: v for k, v in d.items() if k != "feature_extractor_type"})


def noise(shape, seed: int, scale: float = 0.3) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("length", [16000, 12347])
def test_resample_equals_librosa_default(length: int):
    import librosa

    audio = noise((3, length), seed=length)
    want = librosa.resample(audio, orig_sr=16000, target_sr=48000)  # what score_waveforms calls
    got = resample(torch.from_numpy(audio), 16000, 48000)
    assert got.dtype == torch.float32 and got.shape == want.shape == (3, int(np.ceil(3 * length)))
    np.testing.assert_array_equal(got.numpy(), want)
    np.testing.assert_array_equal(resample(audio[1], 16000, 48000).numpy(), want[1])  # unbatched


def test_mel_filters_equal_the_reference_slaney_bank():
    d = hub_dict()
    assert (
        rel_err(mel_filter_bank(feature_extractor_config(d)), reference_extractor(d).mel_filters_slaney)
        <= 1e-12
    )


def _reference_features(d: dict, audio: np.ndarray, offset: int = 0) -> torch.Tensor:
    """The reference extractor as score_waveforms calls it, with rand_trunc's random offset pinned."""
    with mock.patch("numpy.random.randint", return_value=offset) as draw:
        out = reference_extractor(d)(list(audio), return_tensors="pt", sampling_rate=48000).input_features
    overflow = audio.shape[-1] - 480000
    if overflow > 0:  # the reference did draw a crop offset, uniformly from [0, overflow]
        assert draw.call_args.args == (0, overflow + 1)
    return out


@pytest.mark.parametrize(
    "seconds", [0.3, 3.7, 10.0, 10.37], ids=["short", "repeatpad", "exactly-10s", "longer"]
)
def test_features_match_reference_extractor(seconds: float):
    d = hub_dict()
    audio = noise((2, round(seconds * 48000)), seed=int(seconds * 100))
    want = _reference_features(d, audio)  # longer: the reference's crop at offset 0 is our deterministic one
    got = clap_features(torch.from_numpy(audio), feature_extractor_config(d))
    assert got.dtype == want.dtype == torch.float32
    assert got.shape == want.shape == (2, 1, 1001, 64)
    assert rel_err(got, want) <= 1e-4


def test_longer_audio_is_its_first_ten_seconds():
    """Our crop is the reference's features of the pre-cropped first 10 s, whatever its own draw would be."""
    d = hub_dict()
    audio = noise((1, 480000 + 4321), seed=5)
    want = _reference_features(d, audio[:, :480000])
    got = clap_features(audio, feature_extractor_config(d))
    assert rel_err(got, want) <= 1e-4
    # and not another crop: the reference at a different offset gives different features
    assert rel_err(_reference_features(d, audio, offset=4321), want) > 1e-2


@pytest.mark.parametrize("padding", ["repeat", "pad"])
def test_other_padding_modes(padding: str):
    d = hub_dict(padding=padding)
    audio = noise((1, 70001), seed=9)
    want = _reference_features(d, audio)
    assert rel_err(clap_features(audio, feature_extractor_config(d)), want) <= 1e-4


def test_silence_hits_the_floor_like_the_reference():
    d = hub_dict()
    audio = np.zeros((1, 48000), dtype=np.float32)
    got = clap_features(audio, feature_extractor_config(d))
    assert torch.equal(got, _reference_features(d, audio))  # all -100 dB
    with pytest.raises(ValueError, match="empty"):
        clap_features(np.zeros((1, 0), dtype=np.float32), feature_extractor_config(d))


# --------------------------------------------------------------------- the model's mel front end (audio in)

ORIGINAL = "audioldm2==0.1.0"  # the original AudioLDM 2 code on PyPI (haoheliu/AudioLDM2)


def _original_source(folder: Path) -> Path:
    """A folder holding the original package's ``audioldm2/utilities/audio/`` files: $AUDIOLDM2_ORIGINAL_SRC,
    an installed ``audioldm2`` (its files are read, the package is not imported), or the wheel fetched once
    with ``pip download --no-deps`` into pytest's cache. Its license (CC BY-NC-SA 4.0) keeps it out of this
    repository, so the test reads it in place."""
    import importlib.util
    import subprocess
    import sys
    import zipfile

    if os.environ.get("AUDIOLDM2_ORIGINAL_SRC"):
        given = Path(os.environ["AUDIOLDM2_ORIGINAL_SRC"])
        if not (given / "audioldm2/utilities/audio/stft.py").is_file():
            raise FileNotFoundError(
                f"AUDIOLDM2_ORIGINAL_SRC={given} holds no audioldm2/utilities/audio/stft.py"
            )
        return given
    spec = importlib.util.find_spec("audioldm2")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]).parent
    if not (folder / "audioldm2/utilities/audio/stft.py").is_file():
        cmd = [sys.executable, "-m", "pip", "download", "-q", ORIGINAL, "--no-deps", "-d", str(folder)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        wheels = sorted(folder.glob("audioldm2-*.whl"))
        if done.returncode != 0 or not wheels:
            pytest.skip(
                f"the original AudioLDM 2 mel code is not available (`pip download {ORIGINAL} --no-deps` failed: "
                f"offline?); set AUDIOLDM2_ORIGINAL_SRC to an unpacked {ORIGINAL} wheel"
            )
        with zipfile.ZipFile(wheels[0]) as z:
            z.extractall(folder, [n for n in z.namelist() if n.startswith("audioldm2/utilities/audio/")])
    return folder


@pytest.fixture(scope="module")
def original(request, tmp_path_factory):
    """The original's ``audio_processing``, ``stft`` and ``tools`` modules, imported from their files without
    the package (whose ``__init__`` imports the whole model). Shims, none touching the forward computation:
    the STFT's inverse basis is left zero (Griffin-Lim's, never used here); librosa >= 0.10 takes
    ``filters.mel`` / ``util.pad_center`` arguments by keyword (the original pins librosa 0.9.2 and passes
    them by position); and ``torchaudio`` (not installed here) is soundfile's reader returning (channels,
    samples) float32, as ``torchaudio.load`` does, with ``resample`` the identity, which is what torchaudio's
    is at 16 kHz -> 16 kHz (the only rate these tests give it)."""
    import importlib.util
    import sys
    import types

    import librosa
    import soundfile as sf

    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    folder = cache.mkdir("audioldm2-original") if cache else tmp_path_factory.mktemp("audioldm2-original")
    src = _original_source(folder) / "audioldm2/utilities/audio"
    torchaudio = types.ModuleType("torchaudio")
    torchaudio.load = lambda f: (
        torch.from_numpy(sf.read(f, dtype="float32", always_2d=True)[0].T.copy()),
        sf.info(f).samplerate,
    )

    def resample(waveform, orig_freq, new_freq):
        assert orig_freq == new_freq == 16000, "the torchaudio shim resamples nothing"
        return waveform

    torchaudio.functional = types.SimpleNamespace(resample=resample)
    stubs = {
        name: types.ModuleType(name)
        for name in ("audioldm2", "audioldm2.utilities", "audioldm2.utilities.audio")
    }
    for stub in stubs.values():
        stub.__path__ = []
    saved = {name: sys.modules.get(name) for name in [*stubs, "torchaudio"]}
    sys.modules.update(stubs, torchaudio=torchaudio)
    modules = {}
    try:
        for name in ("audio_processing", "stft", "tools"):
            full = f"audioldm2.utilities.audio.{name}"
            spec = importlib.util.spec_from_file_location(full, src / f"{name}.py")
            modules[name] = sys.modules[full] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(modules[name])
    finally:
        for name in [*saved, *(f"audioldm2.utilities.audio.{n}" for n in modules)]:
            if saved.get(name) is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = saved[name]
    stft = modules["stft"]
    stft.librosa_mel_fn = lambda sr, n_fft, n_mels, fmin, fmax: librosa.filters.mel(
        sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax
    )
    stft.pad_center = lambda data, size: librosa.util.pad_center(data, size=size)
    # The inverse basis serves Griffin-Lim only; its pseudo-inverse of a 1026 x 1024 matrix took seconds.
    skip_pinv = types.SimpleNamespace(pinv=lambda a: np.zeros(a.shape[::-1]))
    stft.np = types.SimpleNamespace(**{**vars(np), "linalg": skip_pinv})
    return types.SimpleNamespace(
        tools=modules["tools"], fn_stft=stft.TacotronSTFT(1024, 160, 1024, 64, 16000, 0, 8000)
    )


def original_log_mel(original, path: Path, frames: int) -> torch.Tensor:
    """The original's ``wav_to_fbank(path, target_length=frames, fn_STFT)``: read_wav_file, get_mel_from_wav,
    then ``_pad_spec`` (which cuts the STFT's extra last frame; 0.1.0 predates the function, so it is spelled
    out here)."""
    wave = original.tools.read_wav_file(str(path), frames * 160)[0]
    fbank, _, _ = original.tools.get_mel_from_wav(torch.FloatTensor(wave), original.fn_stft)
    return torch.FloatTensor(fbank.T)[:frames]  # (frames, 64)


def test_sound(seconds: float, seed: int) -> np.ndarray:
    """Tones, a chirp and noise, with an onset and a decay: a spectrum with loud and quiet bins."""
    t = np.arange(round(seconds * 16000)) / 16000
    rng = np.random.default_rng(seed)
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * (300 + 2000 * t) * t) * (t > 0.2)
    x += (
        0.05 * rng.standard_normal(t.shape) * np.exp(-3 * t) + 0.02
    )  # a DC offset, which normalisation removes
    return x.astype(np.float32)


test_sound.__test__ = False  # a helper, not a test


@pytest.mark.parametrize(
    "seconds, frames",
    [(1.0, None), (0.7716, None), (2.5, None), (1.0, 40)],
    ids=["1s", "odd-length", "2.5s", "cut-to-0.4s"],
)
def test_log_mel_equals_the_original_code(original, tmp_path, seconds, frames):
    import soundfile as sf

    path = tmp_path / "in.wav"
    sf.write(path, test_sound(seconds, seed=1), 16000, subtype="FLOAT")
    wave = load_audio(path)
    frames = frames or mel_frames(wave.shape[0], 4)
    got = log_mel(wave, frames)
    want = original_log_mel(original, path, frames)
    assert got.dtype == torch.float32 and got.shape == want.shape == (frames, 64)
    assert rel_err(got, want) <= 1e-5


def librosa_log_mel(wave: np.ndarray, frames: int) -> np.ndarray:
    """The original's computation in float64 with librosa (its dependency) for the STFT and the filters."""
    import librosa

    w = wave.astype(np.float64)
    w = w - w.mean()
    w = w / (np.abs(w).max() + 1e-8) * 0.5
    w = np.pad(w, (0, max(0, frames * 160 - len(w))))  # padded, never cut (the frames are)
    w = w / np.abs(w).max() * 0.5
    spec = librosa.stft(
        w, n_fft=1024, hop_length=160, win_length=1024, window="hann", center=True, pad_mode="reflect"
    )
    filters = librosa.filters.mel(sr=16000, n_fft=1024, n_mels=64, fmin=0.0, fmax=8000.0, dtype=np.float64)
    return np.log(np.maximum(filters @ np.abs(spec), 1e-5)).T[:frames]


@pytest.mark.parametrize("seconds, frames", [(1.3, 132), (1.3, 64)], ids=["padded", "cut"])
def test_log_mel_equals_a_librosa_reference(seconds, frames):
    wave = test_sound(seconds, seed=2)
    assert rel_err(log_mel(wave, frames), librosa_log_mel(wave, frames)) <= 1e-6


def test_model_mel_filters_equal_librosa():
    import librosa

    want = librosa.filters.mel(sr=16000, n_fft=1024, n_mels=64, fmin=0.0, fmax=8000.0, dtype=np.float64)
    assert rel_err(slaney_mel_filters(16000, 1024, 64, 0.0, 8000.0), want.T) <= 1e-12


def test_mel_frames_cover_every_sample():
    for n in [1, 639, 640, 641, 16000, 16001, 163840]:
        frames = mel_frames(n, 4)
        assert frames % 4 == 0 and frames * 160 >= n and (frames - 4) * 160 < max(n, 1) or frames == 4
    assert mel_frames(16000) == 100 and mel_frames(16001) == 101 and mel_frames(10) == 4


def test_silence_is_the_log_floor():
    got = log_mel(np.zeros(16000, dtype=np.float32))
    assert torch.equal(got, torch.full((100, 64), float(np.log(np.float32(1e-5)))))


@pytest.mark.parametrize(
    "waveform, frames, message",
    [
        (np.zeros((2, 16000)), None, r"mono waveform \(T,\)"),
        (np.zeros(0), None, "non-empty"),
        (np.full(1600, np.nan), None, "NaN"),
        (np.zeros(16000), 3, "frames must be an int >= 4"),
        (np.zeros(16000), 8.0, "frames must be an int"),
    ],
)
def test_log_mel_bad_input(waveform, frames, message):
    with pytest.raises(ValueError, match=message):
        log_mel(waveform, frames)


# ------------------------------------------------------------------------------------------- load_audio


def test_files_and_arrays_read_alike(tmp_path):
    """A 44.1 kHz stereo file = its array, channels averaged, resampled as librosa.resample (soxr HQ)."""
    import librosa
    import soundfile as sf

    stereo = noise((2, 30000), seed=3)  # (channels, samples)
    sf.write(tmp_path / "a.wav", stereo.T, 44100, subtype="FLOAT")
    from_file = load_audio(tmp_path / "a.wav")
    from_str = load_audio(str(tmp_path / "a.wav"))
    from_array = load_audio(stereo, 44100)
    from_tensor = load_audio(torch.from_numpy(stereo), 44100)
    want = librosa.resample(stereo.astype(np.float64).mean(axis=0), orig_sr=44100, target_sr=16000)
    assert from_file.dtype == torch.float32 and from_file.shape == (int(np.ceil(30000 * 16000 / 44100)),)
    for got in (from_file, from_str, from_array, from_tensor):
        np.testing.assert_array_equal(got.numpy(), want.astype(np.float32))


def test_pcm_and_16khz_input(tmp_path):
    import soundfile as sf

    pcm = (noise(16000, seed=4) * 32767).astype(np.int16)
    sf.write(tmp_path / "pcm.wav", pcm, 16000, subtype="PCM_16")
    want = torch.from_numpy(pcm / 32768.0).float()  # 16 kHz: nothing resampled
    assert torch.equal(load_audio(pcm, 16000), want)
    assert torch.equal(load_audio(tmp_path / "pcm.wav"), want)
    assert torch.equal(load_audio(pcm[None], np.int64(16000)), want)  # (1, samples), a numpy integer rate
    assert torch.equal(load_audio(torch.from_numpy(pcm), 16000), want)  # an int16 tensor
    bf16 = torch.linspace(-0.5, 0.5, 1000, dtype=torch.bfloat16, requires_grad=True)
    assert torch.equal(load_audio(bf16, 16000), bf16.detach().float())  # numpy has no bfloat16


def bad_files(tmp_path: Path) -> dict[str, Path]:
    import soundfile as sf

    (tmp_path / "text.wav").write_text("not audio")
    sf.write(tmp_path / "empty.wav", np.zeros((0, 1), dtype=np.float32), 16000)
    sf.write(
        tmp_path / "nan.wav", np.array([0.1, np.nan, 0.2] * 1000, dtype=np.float32), 16000, subtype="FLOAT"
    )
    sf.write(tmp_path / "long.wav", np.zeros(3 * 8000, dtype=np.int16), 8000)
    return {
        "missing": tmp_path / "missing.wav",
        "folder": tmp_path,
        **{p.stem: p for p in tmp_path.glob("*.wav")},
    }


@pytest.mark.parametrize(
    "name, message",
    [
        ("missing", r"missing\.wav does not exist"),
        ("folder", r"does not exist \(a folder\)"),
        ("text", r"cannot read audio file .*text\.wav"),
        ("empty", r"empty\.wav is empty \(0 samples\)"),
        ("nan", r"nan\.wav contains NaN or infinite samples"),
        ("long", r"long\.wav is 3\.0 s long; at most 2"),
    ],
)
def test_bad_files(tmp_path, name, message):
    with pytest.raises(ValueError, match=message):
        load_audio(bad_files(tmp_path)[name], max_seconds=2)


@pytest.mark.parametrize(
    "audio, sample_rate, error, message",
    [
        ([0.0] * 100, 16000, TypeError, "not list"),
        (None, 16000, TypeError, "not NoneType"),
        (np.zeros(100, dtype=np.complex64), 16000, TypeError, "floats or signed integers"),
        (np.zeros(100, dtype=np.uint8), 16000, TypeError, "floats or signed integers"),
        (np.zeros(100, dtype=bool), 16000, TypeError, "floats or signed integers"),
        (np.zeros(100, dtype=np.float32), None, ValueError, "needs its sample_rate"),
        (np.zeros(100, dtype=np.float32), 0, ValueError, "positive integer"),
        (np.zeros(100, dtype=np.float32), 16000.0, ValueError, "positive integer"),
        (np.zeros(100, dtype=np.float32), True, ValueError, "positive integer"),
        (np.zeros(0, dtype=np.float32), 16000, ValueError, r"audio is empty"),
        (np.zeros((2, 0), dtype=np.float32), 16000, ValueError, r"audio is empty"),
        (np.array([0.0, np.inf, 0.0]), 16000, ValueError, "NaN or infinite"),
        (torch.tensor([0.0, float("nan")]), 16000, ValueError, "NaN or infinite"),
        (torch.zeros(100, dtype=torch.complex64), 16000, TypeError, "floats or signed integers"),
        (np.zeros(3 * 100, dtype=np.float32), 100, ValueError, r"3\.0 s long; at most 2"),
        (
            np.zeros((1, 2, 100), dtype=np.float32),
            16000,
            ValueError,
            r"\(samples,\) or \(channels, samples\)",
        ),
        (np.array(0.5, dtype=np.float32), 16000, ValueError, r"\(samples,\) or \(channels, samples\)"),
        (np.float32(0.5), 16000, TypeError, "not float32"),
        (np.zeros((1000, 2), dtype=np.float32), 16000, ValueError, "pass its transpose"),
    ],
)
def test_bad_arrays(audio, sample_rate, error, message):
    with pytest.raises(error, match=message):
        load_audio(audio, sample_rate, max_seconds=2)


def test_a_path_carries_its_own_rate(tmp_path):
    with pytest.raises(ValueError, match="read from the audio file"):
        load_audio(tmp_path / "x.wav", 16000)


# ------------------------------------------------------------------------------------------ latent_mask


def _frames_overlapping(latent_frames: int, start: float, end: float) -> set[int]:
    """Latent frame i spans [640 i, 640 (i + 1)) samples; exact fractions of a second."""
    from fractions import Fraction

    step = Fraction(640, 16000)
    return {i for i in range(latent_frames) if i * step < Fraction(end) and (i + 1) * step > Fraction(start)}


def _bins_overlapping(low: float, high: float) -> set[int]:
    """Latent bin k holds mel bins 4k..4k+3; mel filter j spans librosa's mel frequencies j to j + 2."""
    import librosa

    edges = librosa.mel_frequencies(66, fmin=0.0, fmax=8000.0)
    return {j // 4 for j in range(64) if edges[j] < high and edges[j + 2] > low}


def test_latent_mask_time_spans():
    mask = latent_mask(256, [(3.5, 5.0), (9.99, 20.0)])  # 10.24 s; the second span runs past the end
    assert mask.shape == (256, 16) and mask.dtype == torch.bool
    want = _frames_overlapping(256, 3.5, 5.0) | _frames_overlapping(256, 9.99, 20.0)
    assert set(torch.nonzero(mask[:, 0]).flatten().tolist()) == want
    assert (
        min(want) == 87 and max(want) == 255 and 125 not in want
    )  # 3.5 s is inside frame 87; 5.0 s ends 124
    assert torch.equal(mask, mask[:, :1].expand(256, 16))  # every frequency of the spans


def test_latent_mask_bands_and_both():
    high = latent_mask(100, bands_hz=[(4000.0, 8000.0)])  # super-resolution of 8 kHz-sampled audio
    want = _bins_overlapping(4000.0, 8000.0)
    assert set(torch.nonzero(high[0]).flatten().tolist()) == want and 15 in want and 0 not in want
    assert torch.equal(high, high[:1].expand(100, 16))  # at every time
    narrow = latent_mask(100, bands_hz=[(100.0, 101.0)])  # narrower than a filter: still one bin or two
    assert set(torch.nonzero(narrow[0]).flatten().tolist()) == _bins_overlapping(100.0, 101.0) != set()
    both = latent_mask(100, [(1.0, 2.0)], [(4000.0, 8000.0)])
    assert torch.equal(both, latent_mask(100, [(1.0, 2.0)]) & high)  # the bands within the spans


@pytest.mark.parametrize(
    "spans, bands, message",
    [
        ([], [], "give time spans"),
        ([(2.0, 1.0)], [], r"need 0 <= start < end"),
        ([(-1.0, 1.0)], [], r"need 0 <= start < end"),
        ([(float("nan"), 1.0)], [], r"need 0 <= start < end"),
        ([(5.0, 6.0)], [], r"starts after the audio's end \(4\.00 s\)"),
        ([], [(500.0, 100.0)], r"need 0 <= low < high"),
        ([], [(8000.0, 9000.0)], "above the model's top frequency 8000 Hz"),
    ],
)
def test_latent_mask_bad_input(spans, bands, message):
    with pytest.raises(ValueError, match=message):
        latent_mask(100, spans, bands)


@pytest.mark.parametrize("latent_frames", [0, 2.5, True])
def test_latent_mask_bad_frame_count(latent_frames):
    with pytest.raises(ValueError, match="latent_frames must be a positive int"):
        latent_mask(latent_frames, [(0.0, 1.0)])
