"""Audio front end of CLAP re-ranking: 16 kHz waveforms -> 48 kHz -> log-mel features for ``clap_audio``.

Place in the AudioLDM 2 data flow: after the vocoder, only when several waveforms per prompt are ranked.

    waveforms (B, T) at 16 kHz
      resample            -> (B, ceil(3 T)) at 48 kHz (soxr "HQ", as librosa.resample's default)
      clap_features       -> (B, 1, 1001, 64) float32 log-mel (dB), the CLAP audio encoder's input

Reference: ``AudioLDM2Pipeline.score_waveforms`` in diffusers (``librosa.resample(audio, orig_sr=16000,
target_sr=48000)``, then ``ClapFeatureExtractor`` with the hub's ``preprocessor_config.json``) and
transformers ``models/clap/feature_extraction_clap.py`` + ``audio_utils.spectrogram``.

The features, per waveform (computed in float64 like the reference, returned as float32):
- fit to ``max_length_s`` (10 s = 480000 samples). Shorter: ``"repeatpad"`` (the hub's) tiles the audio a
  whole number of times, floor(480000 / T), then pads with zeros; ``"repeat"`` tiles past the end and cuts;
  ``"pad"`` only zero-pads. Longer: the reference's ``"rand_trunc"`` takes a crop at a random offset drawn
  from numpy's global generator; here the crop is the FIRST 10 s, deterministic (equal to the reference
  when its draw is 0). Exactly 10 s is used as is.
- power STFT: periodic Hann window of 1024, hop 480, centred (reflect padding of 512 each side), so 10 s
  give 1 + 480000 / 480 = 1001 frames.
- mel: 64 Slaney-scale, Slaney-normalised triangular filters from ``frequency_min`` to ``frequency_max``
  (50 Hz - 14 kHz on the hub); ``rand_trunc`` selects these in the reference (its HTK filter bank serves
  only ``truncation="fusion"``, which the config rejects). Values floored at 1e-10.
- dB: 10 log10(max(mel, 1e-10)), reference power 1, no top_db (the config rejects one).

Numerics: the reference stores each FFT frame as complex64 before taking its magnitude; here the STFT stays
in float64 (``torch.stft``), so features differ from the reference by float32 rounding only.

Left out on purpose: ``truncation="fusion"`` (four stacked crops, for fusion CLAP models), attention masks,
``is_longer`` (only fusion models read it).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .config import FeatureExtractorConfig

__all__ = ["resample", "clap_features", "fit_length", "mel_filter_bank"]

_MEL_FLOOR = 1e-10  # transformers' spectrogram mel_floor and power_to_db min_value


def resample(audio: torch.Tensor | np.ndarray, orig_sr: int, target_sr: int) -> torch.Tensor:
    """(B, T) or (T,) waveform at ``orig_sr`` -> same dtype at ``target_sr``, ceil(T * target / orig) samples.

    Exactly ``librosa.resample(audio, orig_sr=..., target_sr=...)`` with its defaults: each row through
    ``soxr.resample(..., quality="soxr_hq")``, then trimmed or zero-padded to ``ceil(T * ratio)`` samples.
    """
    try:
        import soxr
    except ImportError as e:  # only re-ranking needs it
        raise ImportError("re-ranking needs the 'soxr' package (pip install soxr) to resample audio") from e
    x = audio.detach().cpu().numpy() if torch.is_tensor(audio) else np.asarray(audio)
    dtype = x.dtype
    if orig_sr == target_sr:
        return torch.from_numpy(x.copy())
    n_out = int(np.ceil(x.shape[-1] * (float(target_sr) / orig_sr)))  # librosa's expression, to the bit
    rows = x.reshape(-1, x.shape[-1])
    out = np.zeros((rows.shape[0], n_out), dtype=dtype)
    for i, row in enumerate(rows):
        y = soxr.resample(row, orig_sr, target_sr, quality="soxr_hq")[:n_out]
        out[i, : len(y)] = y
    return torch.from_numpy(out.reshape(*x.shape[:-1], n_out))


def fit_length(wave: torch.Tensor, max_length: int, padding: str) -> torch.Tensor:
    """(T,) -> (max_length,): crop to the first ``max_length`` samples, or repeat/pad as the module docstring says."""
    n = wave.shape[-1]
    if n == 0:
        raise ValueError("cannot fit an empty waveform")
    if n >= max_length:
        return wave[:max_length]  # deterministic stand-in for the reference's random crop
    if padding == "repeat":
        return wave.repeat(max_length // n + 1)[:max_length]
    if padding == "repeatpad":
        wave = wave.repeat(max_length // n)
    elif padding != "pad":
        raise ValueError(f"unknown padding {padding!r} (repeatpad, repeat, pad)")
    return torch.nn.functional.pad(wave, (0, max_length - wave.shape[-1]))


def _hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    """Slaney mel scale: linear (3 mels per 200 Hz) below 1 kHz, logarithmic above."""
    log_region = 15.0 + torch.log(f.clamp_min(1e-300) / 1000.0) * (27.0 / math.log(6.4))
    return torch.where(f >= 1000.0, log_region, 3.0 * f / 200.0)


def _mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    return torch.where(m >= 15.0, 1000.0 * torch.exp((math.log(6.4) / 27.0) * (m - 15.0)), 200.0 * m / 3.0)


def mel_filter_bank(cfg: FeatureExtractorConfig) -> torch.Tensor:
    """(fft_window_size // 2 + 1, feature_size) float64 Slaney filters (librosa.filters.mel's defaults)."""
    n_freqs, n_mels = cfg.fft_window_size // 2 + 1, cfg.feature_size
    f64 = torch.float64
    lo = float(_hz_to_mel(torch.tensor(float(cfg.frequency_min), dtype=f64)))
    hi = float(_hz_to_mel(torch.tensor(float(cfg.frequency_max), dtype=f64)))
    edges = _mel_to_hz(torch.linspace(lo, hi, n_mels + 2, dtype=f64))  # (n_mels + 2,) filter edges in Hz
    fft_freqs = torch.linspace(0, cfg.sampling_rate // 2, n_freqs, dtype=f64)
    slopes = edges[None, :] - fft_freqs[:, None]  # (n_freqs, n_mels + 2)
    widths = edges.diff()
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    filters = torch.clamp(torch.minimum(down, up), min=0.0)
    return filters * (2.0 / (edges[2:] - edges[:-2]))  # Slaney norm: equal area per filter


def clap_features(audio: torch.Tensor | np.ndarray, cfg: FeatureExtractorConfig) -> torch.Tensor:
    """(B, T) or (T,) waveform at ``cfg.sampling_rate`` (48 kHz) -> (B, 1, frames, feature_size) float32 dB."""
    x = torch.as_tensor(np.asarray(audio) if not torch.is_tensor(audio) else audio).detach().cpu()
    if x.shape[-1] == 0:
        raise ValueError("cannot compute CLAP features of an empty waveform")
    x = x.to(torch.float64).reshape(-1, x.shape[-1])  # (B, T)
    x = torch.stack([fit_length(w, cfg.nb_max_samples, cfg.padding) for w in x])  # (B, max_length)
    window = torch.hann_window(cfg.fft_window_size, periodic=True, dtype=torch.float64)
    spec = torch.stft(
        x,
        cfg.fft_window_size,
        hop_length=cfg.hop_length,
        window=window,
        center=True,
        pad_mode="reflect",
        return_complex=True,
    )  # (B, n_freqs, frames)
    power = spec.abs() ** 2
    mel = torch.clamp(power.transpose(1, 2) @ mel_filter_bank(cfg), min=_MEL_FLOOR)  # (B, frames, mels)
    return (10.0 * torch.log10(mel)).to(torch.float32)[:, None]  # (B, 1, frames, mels)
