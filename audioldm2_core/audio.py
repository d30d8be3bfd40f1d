"""Audio front ends: the model's log-mel input (audio in) and the CLAP re-ranking features (audio out).

1. The model's mel front end, for audio input (style transfer, inpainting, super-resolution): a waveform
   at any rate, mono or stereo, from a file or an array, to the log-mel spectrogram AudioLDM 2 was trained on,
   which ``vae.AutoencoderKLEncoder`` turns into latents.

    file / array (channels, samples) at any rate
      load_audio          -> (T,) float32, 16 kHz mono: checked, channels averaged, resampled with soxr "HQ"
      log_mel             -> (frames, 64) float32: normalised, padded, STFT magnitude, Slaney mel, log
      [VAE encoder]       -> latents (1, 8, frames / 4, 16)

   Reference: the original AudioLDM 2 code (haoheliu/AudioLDM2, the ``audioldm2`` package on PyPI):
   ``utilities/audio/tools.py`` ``wav_to_fbank`` / ``read_wav_file`` / ``get_mel_from_wav`` and
   ``utilities/audio/stft.py`` ``TacotronSTFT(1024, 160, 1024, 64, 16000, 0, 8000)``, the same computation as
   its training data (``utilities/data/dataset.py``). Per waveform:
   - normalise: ``x - mean(x)``, then ``/ (max|x| + 1e-8)``, times 0.5; zero-pad to ``frames * 160`` samples;
     then once more ``/ max|x|``, times 0.5 (the original divides by zero for silence, giving NaN; here silence
     stays silence). A longer waveform is not cut (the original's ``pad_wav`` means to, but slices the wrong
     axis); its spectrogram is.
   - STFT: n_fft 1024, hop 160, periodic Hann window of 1024, centred with reflect padding of 512 each side
     (``frames * 160`` samples give ``frames + 1`` frames; the spectrogram is cut to ``frames``, as the
     original's ``_pad_spec`` does), magnitude (not power).
   - mel: 64 Slaney-scale, Slaney-normalised triangular filters from 0 to 8000 Hz (``librosa.filters.mel``'s
     defaults, which the original calls); log of the mel magnitude clamped at 1e-5 (``dynamic_range_
     compression``): values from log(1e-5) = -11.51 up.

   Differences from the original, on purpose:
   - resampling: soxr's "HQ" (``librosa.resample``'s default, as for CLAP) where the original calls
     ``torchaudio.functional.resample`` (a windowed-sinc filter); the two differ in their stop-band and
     transition band only, far below the mel's 1e-5 floor for music and speech. At 16 kHz nothing is resampled,
     and the log-mel equals the original's to float32 rounding (the original computes in float32, its DFT as
     a matrix product; here float64 and an FFT).
   - stereo: the channels are averaged, as ``librosa.load(mono=True)`` and most tools do; the original keeps
     the first channel only (``waveform[0]``), which drops whatever is panned to the right.
   - files are read with soundfile (WAV, FLAC, OGG, and MP3 with libsndfile >= 1.1), not torchaudio.
   - the frame count: the pipeline asks for the input's length rounded up to a whole latent frame (4 mel
     frames, 40 ms; ``mel_frames``), so no input sample is cut; the original's ``wav_to_fbank`` takes a fixed
     target length.

   ``latent_mask`` turns time spans in seconds and frequency bands in Hz into a boolean mask over the latent
   grid, for inpainting and super-resolution: a latent frame is 4 mel frames (40 ms), a latent bin 4 mel bins.

2. The CLAP front end of re-ranking: 16 kHz waveforms -> 48 kHz -> log-mel features for ``clap_audio``, after
   the vocoder, only when several waveforms per prompt are ranked.

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

   Numerics: the reference stores each FFT frame as complex64 before taking its magnitude; here the STFT
   stays in float64 (``torch.stft``), so features differ from the reference by float32 rounding only.

Left out on purpose: batches of input audio (one input, repeated by the caller), the original's
``trim_wav`` and random crops (training-time augmentation), CLAP's ``truncation="fusion"`` (four stacked
crops, for fusion CLAP models), attention masks, ``is_longer`` (only fusion models read it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .config import FeatureExtractorConfig
from .errors import MissingDependencyError, UsageError, UsageTypeError

__all__ = [
    "SAMPLE_RATE",
    "HOP_LENGTH",
    "N_MELS",
    "load_audio",
    "log_mel",
    "mel_spectrogram",
    "mel_frames",
    "latent_mask",
    "resample",
    "clap_features",
    "fit_length",
    "mel_filter_bank",
    "slaney_mel_filters",
]

_MEL_FLOOR = 1e-10  # transformers' spectrogram mel_floor and power_to_db min_value

# The model's mel front end (the original's preprocessing config: "stft" and "mel", at 16 kHz)
SAMPLE_RATE = 16000  # the rate AudioLDM 2 was trained at, and the one its vocoder writes
N_FFT = 1024  # STFT size (filter_length), 64 ms
WIN_LENGTH = 1024  # periodic Hann window, as long as the FFT
HOP_LENGTH = 160  # 10 ms: 100 mel frames per second
N_MELS = 64  # mel bins, the spectrogram's width
F_MIN, F_MAX = 0.0, 8000.0  # the mel filters span 0 Hz to Nyquist
LOG_FLOOR = 1e-5  # log(max(mel, 1e-5)): the original's dynamic_range_compression clip_val
MIN_FRAMES = N_FFT // 2 // HOP_LENGTH + 1  # 4: reflect padding of 512 needs more than 512 samples
assert SAMPLE_RATE % HOP_LENGTH == 0 and WIN_LENGTH <= N_FFT and F_MAX <= SAMPLE_RATE / 2
MAX_CHANNELS = 8  # a 2-D array is (channels, samples); more rows than this is taken for (samples, channels)


def resample(audio: torch.Tensor | np.ndarray, orig_sr: int, target_sr: int) -> torch.Tensor:
    """(B, T) or (T,) waveform at ``orig_sr`` -> same dtype at ``target_sr``, ceil(T * target / orig) samples.

    Exactly ``librosa.resample(audio, orig_sr=..., target_sr=...)`` with its defaults: each row through
    ``soxr.resample(..., quality="soxr_hq")``, then trimmed or zero-padded to ``ceil(T * ratio)`` samples.
    """
    try:
        import soxr
    except ImportError as e:  # only re-ranking needs it
        raise MissingDependencyError(
            "re-ranking needs the 'soxr' package (pip install soxr) to resample audio"
        ) from e
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
        raise UsageError("cannot fit an empty waveform")
    if n >= max_length:
        return wave[:max_length]  # deterministic stand-in for the reference's random crop
    if padding == "repeat":
        return wave.repeat(max_length // n + 1)[:max_length]
    if padding == "repeatpad":
        wave = wave.repeat(max_length // n)
    elif padding != "pad":
        raise UsageError(f"unknown padding {padding!r} (repeatpad, repeat, pad)")
    return torch.nn.functional.pad(wave, (0, max_length - wave.shape[-1]))


def hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    """Slaney mel scale: linear (3 mels per 200 Hz) below 1 kHz, logarithmic above."""
    log_region = 15.0 + torch.log(f.clamp_min(1e-300) / 1000.0) * (27.0 / math.log(6.4))
    return torch.where(f >= 1000.0, log_region, 3.0 * f / 200.0)


def _mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    return torch.where(m >= 15.0, 1000.0 * torch.exp((math.log(6.4) / 27.0) * (m - 15.0)), 200.0 * m / 3.0)


def _mel_edges(sample_rate: int, n_mels: int, f_min: float, f_max: float) -> torch.Tensor:
    """(n_mels + 2,) float64: filter j rises from edge j to its peak at edge j + 1 and falls to edge j + 2."""
    f64 = torch.float64
    lo = float(hz_to_mel(torch.tensor(float(f_min), dtype=f64)))
    hi = float(hz_to_mel(torch.tensor(float(f_max), dtype=f64)))
    return _mel_to_hz(torch.linspace(lo, hi, n_mels + 2, dtype=f64))


def slaney_mel_filters(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> torch.Tensor:
    """(n_fft // 2 + 1, n_mels) float64 Slaney filters: ``librosa.filters.mel(...).T`` with its defaults."""
    n_freqs = n_fft // 2 + 1
    edges = _mel_edges(sample_rate, n_mels, f_min, f_max)  # filter edges in Hz
    fft_freqs = torch.linspace(0, sample_rate // 2, n_freqs, dtype=torch.float64)
    slopes = edges[None, :] - fft_freqs[:, None]  # (n_freqs, n_mels + 2)
    widths = edges.diff()
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    filters = torch.clamp(torch.minimum(down, up), min=0.0)
    return filters * (2.0 / (edges[2:] - edges[:-2]))  # Slaney norm: equal area per filter


def mel_filter_bank(cfg: FeatureExtractorConfig) -> torch.Tensor:
    """(fft_window_size // 2 + 1, feature_size) float64 Slaney filters of the CLAP feature extractor."""
    return slaney_mel_filters(
        cfg.sampling_rate, cfg.fft_window_size, cfg.feature_size, cfg.frequency_min, cfg.frequency_max
    )


def clap_features(audio: torch.Tensor | np.ndarray, cfg: FeatureExtractorConfig) -> torch.Tensor:
    """(B, T) or (T,) waveform at ``cfg.sampling_rate`` (48 kHz) -> (B, 1, frames, feature_size) float32 dB."""
    x = torch.as_tensor(np.asarray(audio) if not torch.is_tensor(audio) else audio).detach().cpu()
    if x.shape[-1] == 0:
        raise UsageError("cannot compute CLAP features of an empty waveform")
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


# ------------------------------------------------------------------------------ the model's mel front end


def _read_file(path: Path, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """(channels, samples) float64 and the file's sample rate, read with soundfile; the length is checked
    from the header before any sample is read."""
    import soundfile as sf

    if not path.is_file():
        raise UsageError(f"audio file {path} does not exist" + (" (a folder)" if path.is_dir() else ""))
    try:
        info = sf.info(str(path))
        if max_seconds is not None and info.frames > max_seconds * info.samplerate:
            raise UsageError(
                f"audio file {path} is {info.frames / info.samplerate:.1f} s long; at most {max_seconds} s"
            )
        data, sr = sf.read(str(path), dtype="float64", always_2d=True)  # (samples, channels)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise UsageError(f"cannot read audio file {path}: {str(e).splitlines()[0] if str(e) else e}") from e
    return data.T, int(sr)


def _as_array(audio: np.ndarray | torch.Tensor) -> np.ndarray:
    """A waveform array or tensor -> (channels, samples) float64; signed integers are PCM (full scale = 1)."""
    if torch.is_tensor(audio):  # floats through float64: numpy has no bfloat16
        audio = audio.detach().cpu()
        x = (audio.double() if audio.is_floating_point() else audio).numpy()
    else:
        x = audio
    if x.dtype.kind == "i":
        x = x.astype(np.float64) / (np.iinfo(x.dtype).max + 1)  # int16 PCM: / 32768
    elif x.dtype.kind == "f":
        x = x.astype(np.float64)
    else:
        raise UsageTypeError(f"audio samples must be floats or signed integers (PCM), not {x.dtype}")
    if x.ndim == 1:
        return x[None]
    if x.ndim != 2:
        raise UsageError(f"audio must be (samples,) or (channels, samples), got shape {tuple(x.shape)}")
    if x.shape[0] > MAX_CHANNELS:
        raise UsageError(
            f"audio of shape {tuple(x.shape)}: a 2-D waveform is (channels, samples) with at most {MAX_CHANNELS} "
            "channels; for (samples, channels), as soundfile returns it, pass its transpose"
        )
    return x


def load_audio(
    audio: str | os.PathLike | np.ndarray | torch.Tensor,
    sample_rate: int | None = None,
    *,
    max_seconds: float | None = None,
) -> torch.Tensor:
    """A file path, or a waveform with its ``sample_rate`` -> (T,) float32 mono waveform at 16 kHz.

    Files are read with soundfile at their own rate (pass no ``sample_rate``). Arrays and tensors are
    (samples,) or (channels, samples), floats or signed-integer PCM. Channels are averaged; the result is
    resampled to 16 kHz with soxr (``resample``). Raises ValueError for a missing or unreadable file, empty
    audio, NaN or infinite samples, audio longer than ``max_seconds`` or a bad shape or sample rate, and
    TypeError for anything that is not a path, an array or a tensor.
    """
    if isinstance(audio, (str, os.PathLike)):
        if sample_rate is not None:
            raise UsageError("sample_rate is read from the audio file; pass it only with an array or tensor")
        x, sample_rate = _read_file(Path(audio).expanduser(), max_seconds)
        what = f"audio file {audio}"
    elif isinstance(audio, (np.ndarray, torch.Tensor)):
        if sample_rate is None:
            raise UsageError("a waveform array or tensor needs its sample_rate (e.g. sample_rate=44100)")
        x, what = _as_array(audio), "audio"
    else:
        raise UsageTypeError(
            f"audio must be a file path, a numpy array or a torch tensor, not {type(audio).__name__}"
        )
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise UsageError(f"sample_rate must be a positive integer (Hz), got {sample_rate!r}")
    sample_rate = int(sample_rate)
    if x.shape[-1] == 0:
        raise UsageError(f"{what} is empty (0 samples)")
    if not np.isfinite(x).all():
        raise UsageError(f"{what} contains NaN or infinite samples")
    if max_seconds is not None and x.shape[-1] > max_seconds * sample_rate:
        raise UsageError(f"{what} is {x.shape[-1] / sample_rate:.1f} s long; at most {max_seconds} s")
    mono = x.mean(axis=0)  # (T,)
    return resample(mono, sample_rate, SAMPLE_RATE).to(torch.float32)


def mel_frames(num_samples: int, multiple: int = 1) -> int:
    """Mel frames covering ``num_samples`` at 16 kHz, rounded up to a multiple of ``multiple`` (the VAE's
    time stride, 4) and to at least ``MIN_FRAMES``: every input sample lands in a frame, none is cut."""
    frames = math.ceil(num_samples / (HOP_LENGTH * multiple)) * multiple
    return max(frames, math.ceil(MIN_FRAMES / multiple) * multiple)


def _normalize(wave: torch.Tensor, num_samples: int) -> torch.Tensor:
    """The original's ``read_wav_file`` after resampling: peak 0.5 around zero mean, zero-padded to at least
    ``num_samples``, and scaled to peak 0.5 again. A longer waveform is not cut: the original's ``pad_wav``
    slices the first axis of its (1, T) array, which leaves it whole; ``log_mel`` cuts the frames instead."""
    wave = wave - wave.mean()
    wave = wave / (wave.abs().max() + 1e-8) * 0.5
    wave = torch.nn.functional.pad(wave, (0, max(0, num_samples - wave.shape[0])))
    peak = wave.abs().max()
    return wave / peak * 0.5 if peak > 0 else wave  # the original divides by zero for silence


def log_mel(waveform: torch.Tensor | np.ndarray, frames: int | None = None) -> torch.Tensor:
    """16 kHz mono waveform (T,) -> log-mel spectrogram (frames, 64) float32, as the original's
    ``wav_to_fbank`` (see the module docstring). ``frames`` defaults to ``mel_frames(T)``; a shorter waveform
    is zero-padded to ``frames * 160`` samples, a longer one's spectrogram is cut to ``frames``. In float64."""
    x = torch.as_tensor(np.asarray(waveform) if not torch.is_tensor(waveform) else waveform).detach().cpu()
    if x.ndim != 1 or x.shape[0] == 0:
        raise UsageError(f"log_mel takes a non-empty mono waveform (T,), got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise UsageError("the waveform contains NaN or infinite samples")
    frames = mel_frames(x.shape[0]) if frames is None else frames
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < MIN_FRAMES:
        raise UsageError(
            f"frames must be an int >= {MIN_FRAMES} ({MIN_FRAMES * HOP_LENGTH} samples), got {frames!r}"
        )
    return mel_spectrogram(_normalize(x.to(torch.float64), frames * HOP_LENGTH), frames)


def mel_spectrogram(x: torch.Tensor, frames: int | None = None) -> torch.Tensor:
    """The model's mel of a 16 kHz waveform (T,) as it is, without ``log_mel``'s normalisation: (frames, 64)
    float32 natural log of the Slaney mel magnitudes, floored at 1e-5. ``frames`` None: every STFT frame,
    1 + T // 160 (a waveform of at most 512 samples is zero-padded to 513 first, for the reflect padding).
    Computed in float64. ``log_mel`` and the pictures of ``spectrogram.py`` both go through here."""
    x = torch.as_tensor(x).to(torch.float64)
    if x.shape[0] <= N_FFT // 2:
        x = torch.nn.functional.pad(x, (0, N_FFT // 2 + 1 - x.shape[0]))
    window = torch.hann_window(WIN_LENGTH, periodic=True, dtype=torch.float64)
    spec = torch.stft(
        x,
        N_FFT,
        hop_length=HOP_LENGTH,
        win_length=WIN_LENGTH,
        window=window,
        center=True,
        pad_mode="reflect",
        return_complex=True,
    )  # (n_fft // 2 + 1, T // 160 + 1), at least frames + 1
    filters = slaney_mel_filters(SAMPLE_RATE, N_FFT, N_MELS, F_MIN, F_MAX)  # (513, 64)
    mel = spec.abs().T[:frames] @ filters  # (frames, 64) mel magnitudes; the extra last frame is cut
    return torch.log(torch.clamp(mel, min=LOG_FLOOR)).to(torch.float32)


def latent_mask(
    latent_frames: int,
    spans_s: Sequence[tuple[float, float]] = (),
    bands_hz: Sequence[tuple[float, float]] = (),
    *,
    scale: int = 4,
) -> torch.Tensor:
    """The latents to regenerate, as a (latent_frames, 64 // scale) bool mask: True = regenerate, False = keep.

    The latent grid: latent frame i covers mel frames [scale i, scale (i + 1)), i.e. samples
    [640 i, 640 (i + 1)) at 16 kHz (40 ms with the hub's scale of 4); latent bin k covers mel bins
    [scale k, scale (k + 1)), whose filters span from edge ``scale k`` to edge ``scale (k + 1) + 1`` of the
    Slaney mel scale (0-8000 Hz). A time span ``(start, end)`` in seconds selects every latent frame it
    overlaps; a band ``(low, high)`` in Hz every latent bin whose filters overlap it (so the whole span or band
    is regenerated, plus the edges of the frames and bins it touches). With spans only, every frequency of
    them; with bands only, every time; with both, the bands within the spans. Broadcast to latents
    (B, C, latent_frames, 16) as ``mask[None, None]``. (The original AudioLDM's ``mask`` is the opposite: 1 =
    keep.)
    """
    if isinstance(latent_frames, bool) or not isinstance(latent_frames, int) or latent_frames < 1:
        raise UsageError(f"latent_frames must be a positive int, got {latent_frames!r}")
    if not spans_s and not bands_hz:
        raise UsageError("give time spans (seconds) and/or frequency bands (Hz) to regenerate")
    if N_MELS % scale != 0:
        raise UsageError(f"the latent scale {scale} does not divide the {N_MELS} mel bins")
    hop = HOP_LENGTH * scale  # samples per latent frame
    duration = latent_frames * hop / SAMPLE_RATE
    times = torch.zeros(latent_frames, dtype=torch.bool)
    for start, end in spans_s:
        if not (math.isfinite(start) and math.isfinite(end)) or not 0 <= start < end:
            raise UsageError(f"time span ({start}, {end}): need 0 <= start < end, in seconds")
        if start >= duration:
            raise UsageError(f"time span ({start}, {end}) starts after the audio's end ({duration:.2f} s)")
        a, b = round(start * SAMPLE_RATE), round(end * SAMPLE_RATE)  # in samples: no float-division edges
        first, last = a // hop, min(-(-b // hop), latent_frames)  # frames overlapping [a, b)
        times[first:last] = True
    edges = _mel_edges(SAMPLE_RATE, N_MELS, F_MIN, F_MAX)  # (66,) Hz
    bins = torch.zeros(N_MELS // scale, dtype=torch.bool)
    for low, high in bands_hz:
        if not (math.isfinite(low) and math.isfinite(high)) or not 0 <= low < high:
            raise UsageError(f"frequency band ({low}, {high}): need 0 <= low < high, in Hz")
        if low >= F_MAX:
            raise UsageError(
                f"frequency band ({low}, {high}) is above the model's top frequency {F_MAX:.0f} Hz"
            )
        lo_edges, hi_edges = edges[0:-2:scale], edges[scale + 1 :: scale]  # each latent bin's support
        bins |= (lo_edges < high) & (hi_edges > low)
    times = times if spans_s else torch.ones_like(times)
    bins = bins if bands_hz else torch.ones_like(bins)
    return times[:, None] & bins[None, :]  # (latent_frames, 64 // scale)
