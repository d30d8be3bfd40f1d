"""Writing outputs as whole files or none: the CLI's WAVs, the dataset synthesis' WAVs and manifest, the
spectrogram PNGs, the demo's downloads.

A temp file beside the target (``.<name>.<random>.tmp``), flushed to disk, then renamed over it: a reader, or a
rerun after a kill, sees the old file or the whole new one, never part of it. Errors name the file asked for,
not the temp file. The file gets the permissions ``open`` would give it (``mkstemp``'s 0600 would hide the
output from the user's other accounts and groups).
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def write_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def wav_bytes(audio, sample_rate: int) -> bytes:
    """A float32 WAV in memory (so that a caller can hash it without reading the file back)."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, audio, sample_rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def write_wav(path: Path, audio, sample_rate: int) -> None:
    """A float32 WAV, written atomically; errors name ``path``."""
    try:
        data = wav_bytes(audio, sample_rate)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e
    write_atomic(path, data)
