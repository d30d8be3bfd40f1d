"""Log-mel spectrograms of generated audio, as numbers and as a picture (``audioldm2 ... --spectrogram``, the demo).

    waveform (T,) at 16 kHz --log_mel-----------> (frames, 64) natural-log mel magnitudes, 100 frames/s
    (frames, n_mels) log mel --spectrogram_png--> PNG bytes: time (s) across, frequency (Hz, mel-spaced) up,
                                                  a colour bar in dB
    save_spectrogram(path, audio, 16000)        = both, written atomically

The mel is the representation AudioLDM 2 generates: the VAE decodes latents to it and the vocoder turns it
into a waveform. Its settings are AudioLDM's (``TacotronSTFT`` in haoheliu/AudioLDM2, the 16 kHz configs):
magnitude STFT with a Hann window of 1024 and hop 160 (= the vocoder's upsampling, so one frame per
vocoder frame), 64 Slaney-normalised Slaney-scale mel filters from 0 to 8 kHz, natural log floored at 1e-5.
So the picture of a waveform and of the model's own mel (``pipe.vae.decode(latents)[i, 0]``, (frames, 64),
given as ``mel=``) are drawn alike. It is one implementation: ``audio.mel_spectrogram``, the model's front end
(``audio.log_mel``) without the peak normalisation it applies to the model's input, which would hide the
audio's level in the colour bar; other sample rates are resampled to 16 kHz first.

Drawing needs matplotlib, an optional extra (``pip install "audioldm2-core[spectrogram]"``), imported only
here and only when a picture is drawn. It draws on its own ``Figure`` with the Agg canvas, never through
``pyplot``, so threads (the demo's workers) can draw at once and no display is needed.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import torch

from .audio import F_MAX, F_MIN, HOP_LENGTH, SAMPLE_RATE, hz_to_mel, mel_spectrogram, resample
from .errors import MissingDependencyError, UsageError
from .outputs import write_atomic

__all__ = ["log_mel", "spectrogram_png", "save_spectrogram", "require_matplotlib"]

_DB_PER_NEPER = 20.0 / math.log(10.0)  # natural log of a magnitude -> dB


def require_matplotlib():
    """matplotlib's ``Figure`` and Agg canvas, or an ImportError saying how to install them."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise MissingDependencyError(
            'spectrograms need matplotlib: pip install "audioldm2-core[spectrogram]" (or pip install matplotlib)'
        ) from e
    return Figure, FigureCanvasAgg


def log_mel(audio: np.ndarray | torch.Tensor, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """(T,) waveform -> (1 + T' // 160, 64) float32 natural-log mel magnitudes at 16 kHz (T' samples, after
    resampling from ``sample_rate``): the model's own front end, ``audio.mel_spectrogram``, without the peak
    normalisation of its input (a picture keeps the audio's level)."""
    x = torch.as_tensor(np.asarray(audio) if not torch.is_tensor(audio) else audio).detach().cpu()
    if x.ndim != 1 or x.shape[0] == 0:
        raise UsageError(f"log_mel takes one non-empty waveform (T,), got shape {tuple(x.shape)}")
    if sample_rate != SAMPLE_RATE:
        x = resample(x.to(torch.float64), sample_rate, SAMPLE_RATE)
    return mel_spectrogram(x)


def spectrogram_png(
    mel: np.ndarray | torch.Tensor,
    *,
    hop_length: int = HOP_LENGTH,
    sample_rate: int = 16000,
    f_min: float = F_MIN,
    f_max: float = F_MAX,
    title: str | None = None,
    size: tuple[float, float] = (8.0, 3.2),
    dpi: int = 100,
) -> bytes:
    """Draw a (frames, n_mels) natural-log mel as a PNG: time in seconds, frequency in Hz on a mel-spaced
    axis (each row one filter, rows evenly spaced in mels), a colour bar in dB."""
    Figure, FigureCanvasAgg = require_matplotlib()
    m = torch.as_tensor(np.asarray(mel) if not torch.is_tensor(mel) else mel).detach().float().cpu().numpy()
    if m.ndim != 2 or 0 in m.shape:
        raise UsageError(f"spectrogram_png takes a (frames, n_mels) log mel, got shape {m.shape}")
    db = m.T * _DB_PER_NEPER  # (n_mels, frames)
    lo, hi = (float(hz_to_mel(torch.tensor(f, dtype=torch.float64))) for f in (f_min, f_max))
    seconds = m.shape[0] * hop_length / sample_rate
    half_row = (hi - lo) / (m.shape[1] + 1) / 2  # row i is the filter centred at lo + (i + 1) 2 half_row mels
    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    vmax = float(db.max())
    image = ax.imshow(
        db,
        origin="lower",
        aspect="auto",
        extent=(0.0, seconds, lo + half_row, hi - half_row),
        cmap="magma",
        vmin=max(float(db.min()), vmax - 80.0),  # an 80 dB range, as librosa's displays
        vmax=vmax,
        interpolation="nearest",
    )
    ticks = [f for f in (0, 250, 500, 1000, 2000, 4000, 8000, 16000, 24000) if f_min <= f <= f_max]
    ax.set_ylim(lo, hi)
    ax.set_yticks([float(hz_to_mel(torch.tensor(float(f), dtype=torch.float64))) for f in ticks])
    ax.set_yticklabels([f"{f // 1000}k" if f >= 1000 else str(f) for f in ticks])
    ax.set_xlabel("time (s)")
    ax.set_ylabel("frequency (Hz)")
    if title:
        ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, format="%+.0f dB", pad=0.01)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def save_spectrogram(
    path: str | os.PathLike,
    audio: np.ndarray | torch.Tensor | None = None,
    sample_rate: int = 16000,
    *,
    mel: np.ndarray | torch.Tensor | None = None,
    title: str | None = None,
) -> Path:
    """Write the PNG of a waveform's log mel (or of ``mel``, a (frames, 64) log mel such as the VAE's)."""
    if (audio is None) == (mel is None):
        raise UsageError("give exactly one of a waveform (audio) or a log mel (mel)")
    path = Path(path)
    png = spectrogram_png(
        log_mel(audio, sample_rate) if mel is None else mel, sample_rate=sample_rate, title=title
    )
    write_atomic(path, png)
    return path
