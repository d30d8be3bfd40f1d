"""Spectrograms: the log mel equals librosa's with AudioLDM's settings; the PNG is a real picture with the
expected size, written atomically; bad input and a missing matplotlib are clear errors."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest

from audioldm2_core.spectrogram import log_mel, save_spectrogram, spectrogram_png


def _chirp(seconds: float = 1.5, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * (200 + 1500 * t) * t)).astype(np.float32)


def test_log_mel_equals_librosa():
    librosa = pytest.importorskip("librosa")
    audio = _chirp()
    ref = librosa.feature.melspectrogram(
        y=audio.astype(np.float64), sr=16000, n_fft=1024, hop_length=160, n_mels=64, fmin=0.0, fmax=8000.0,
        power=1.0, center=True, pad_mode="reflect",
    )  # fmt: skip
    ref = np.log(np.maximum(ref, 1e-5)).T  # (frames, 64)
    got = log_mel(audio).numpy()
    assert got.shape == ref.shape == (1 + len(audio) // 160, 64)
    assert np.abs(got - ref).max() <= 1e-4


def test_png_is_a_picture(tmp_path):
    from PIL import Image

    path = save_spectrogram(tmp_path / "chirp.png", _chirp(), 16000, title="a chirp")
    image = Image.open(path)
    assert image.format == "PNG" and image.size == (800, 320)
    assert np.asarray(image.convert("L")).std() > 10  # drawn, not blank
    assert [p.name for p in tmp_path.iterdir()] == ["chirp.png"]  # no temp file left
    # the model's own mel draws the same way
    png = spectrogram_png(np.random.default_rng(0).normal(-5, 1, (256, 64)))
    assert Image.open(io.BytesIO(png)).size == (800, 320)


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="one non-empty waveform"):
        log_mel(np.zeros((2, 100)))
    with pytest.raises(ValueError, match="exactly one of a waveform"):
        save_spectrogram(tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"\(frames, n_mels\) log mel"):
        spectrogram_png(np.zeros(10))
    with pytest.raises(
        FileNotFoundError, match=str(tmp_path / "no" / "x.png")
    ):  # the path asked for, not a temp
        save_spectrogram(tmp_path / "no" / "x.png", _chirp(0.2))


def test_short_audio():
    assert log_mel(np.zeros(100, dtype=np.float32)).shape == (4, 64)  # padded so reflect padding works


def test_missing_matplotlib_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    for name in [m for m in sys.modules if m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError, match=r'pip install "audioldm2-core\[spectrogram\]"'):
        spectrogram_png(np.zeros((10, 64)))


def test_one_mel_implementation_with_the_model_front_end():
    """The picture's mel is the model's front end (audio.log_mel) without its input normalisation: on a
    zero-mean waveform at peak 0.5 (what that normalisation makes) the two agree; other rates are resampled."""
    from audioldm2_core import audio

    x = _chirp(1.0).astype(np.float64)
    x = (x - x.mean()) / np.abs(x - x.mean()).max() * 0.5
    frames = audio.mel_frames(len(x))
    assert np.abs(log_mel(x)[:frames].numpy() - audio.log_mel(x, frames).numpy()).max() <= 1e-5
    resampled = audio.resample(_chirp(1.0, 22050).astype(np.float64), 22050, 16000)
    assert np.array_equal(log_mel(_chirp(1.0, 22050), 22050), log_mel(resampled))
