"""The training items: clips and their captions, read from one of three layouts and checked before any model.

- JSON Lines (``items.jsonl``): ``{"audio": "clips/kick1.wav", "prompt": "a punchy kick drum"}`` per line, the
  path relative to the file's folder; optional ``transcription`` (what a speech checkpoint's clip says) and
  ``id``. A line with ``file`` instead of ``audio`` is a dataset-synthesis manifest record (``manifest.jsonl``,
  ``audioldm2 --prompts-file``), so generated data trains directly.
- Hugging Face's ``audiofolder``: a folder with ``metadata.csv`` or ``metadata.jsonl``, a ``file_name`` column
  (relative to the folder) and a text column: ``--caption-column``, else the first of ``prompt``, ``text``,
  ``caption``; optional ``transcription``.
- A dataset-synthesis output folder (its ``manifest.jsonl``).

Every line is checked (JSON, fields, types), and every clip's header (it exists, soundfile reads it, it is not
empty), before any model is opened; then its length against the model's, once the model's config is read. Each
error names the file and line or the clip, in one line.
An item's id (its own, else its clip's path as written, ``#2``, ``#3``... for the same clip's next captions)
seeds its random draws, so that they do not depend on the order of processes or batches.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..manifest import MANIFEST, json_object, sha256_file

__all__ = ["TrainItem", "Clip", "read_items", "check_clips", "check_lengths", "CAPTION_COLUMNS"]

CAPTION_COLUMNS = ("prompt", "text", "caption")  # an audiofolder's text column, the first found
METADATA = ("metadata.jsonl", "metadata.csv")


@dataclass(frozen=True)
class TrainItem:
    """One clip with its caption (and, for the speech checkpoints, its transcription)."""

    id: str
    audio: Path
    prompt: str
    transcription: str | None
    where: str  # "file:line", for messages


@dataclass(frozen=True)
class Clip:
    """What the checks learnt of an item's audio file."""

    sha256: str  # of the file's bytes: the cache's key and the dataset's fingerprint
    seconds: float


def _text(value: Any, name: str, where: str, required: bool = True) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        what = "a non-empty string" + ("" if required else " or null")
        raise UsageError(f"{where}: {name} must be {what}, got {value!r}")
    return value


def _item(record: dict[str, Any], root: Path, where: str, audio_key: str, text_key: str) -> dict[str, Any]:
    """An item's fields from a record (a JSON line or a CSV row), checked."""
    if audio_key not in record:
        raise UsageError(f"{where}: no {audio_key!r} (the clip's path)")
    if text_key not in record:
        raise UsageError(f"{where}: no {text_key!r} (the clip's caption)")
    audio = _text(record[audio_key], audio_key, where)
    item_id = record.get("id")
    if item_id is not None and (not isinstance(item_id, (str, int)) or isinstance(item_id, bool)):
        raise UsageError(f"{where}: id must be a string or an integer, got {item_id!r}")
    return dict(
        id=None if item_id is None else str(item_id),
        written=audio,
        audio=(root / audio).expanduser(),
        prompt=_text(record[text_key], text_key, where),
        transcription=_text(record.get("transcription"), "transcription", where, required=False),
        where=where,
    )


def _json_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """("file:line", object) of each non-blank line of a JSON Lines file."""
    out = []
    for number, line in enumerate(_read(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        out.append((where, json_object(line, where, "a line")))
    return out


def _json_lines(path: Path) -> list[dict[str, Any]]:
    """Items of a JSON Lines file (a manifest record names its clip ``file``, an item ``audio``)."""
    return [
        _item(r, path.parent, where, "file" if "file" in r and "audio" not in r else "audio", "prompt")
        for where, r in _json_records(path)
    ]


def _audiofolder(folder: Path, caption_column: str | None) -> list[dict[str, Any]]:
    path = next(folder / name for name in METADATA if (folder / name).is_file())
    if path.suffix == ".jsonl":
        rows = _json_records(path)
    else:
        try:
            reader = csv.DictReader(_read(path).splitlines())
            rows = [
                (f"{path}:{i}", {k: v or None for k, v in row.items()}) for i, row in enumerate(reader, 2)
            ]
        except csv.Error as e:
            raise UsageError(f"{path}: not a readable CSV ({e})") from None
    columns = set().union(*(r.keys() for _, r in rows)) if rows else set()
    column = caption_column or next((c for c in CAPTION_COLUMNS if c in columns), None)
    if column is None:
        raise UsageError(
            f"{path}: no caption column ({', '.join(CAPTION_COLUMNS)}); name it with --caption-column"
        )
    return [_item(r, folder, where, "file_name", column) for where, r in rows]


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from e


def read_items(data: Path, caption_column: str | None = None) -> list[TrainItem]:
    """The items of ``data`` (see the module docstring), every line checked; ids unique."""
    data = Path(data).expanduser()
    if data.is_dir():
        if any((data / name).is_file() for name in METADATA):
            records = _audiofolder(data, caption_column)
        elif (data / MANIFEST).is_file():
            records = _json_lines(data / MANIFEST)
        else:
            raise UsageError(f"{data}: a folder needs {' or '.join(METADATA)} (audiofolder) or {MANIFEST}")
    elif data.is_file():
        records = _audiofolder_file(data, caption_column) if data.suffix == ".csv" else _json_lines(data)
    else:
        raise UsageError(f"{data}: no such file or folder")
    if not records:
        raise UsageError(f"{data}: no items (an empty dataset)")
    items, seen, uses = [], {}, {}
    for r in records:
        item_id = r["id"]
        if item_id is None:
            uses[r["written"]] = uses.get(r["written"], 0) + 1
            item_id = r["written"] + ("" if uses[r["written"]] == 1 else f"#{uses[r['written']]}")
        if item_id in seen:
            raise UsageError(f"{r['where']}: id {item_id!r} is used twice (also {seen[item_id]})")
        seen[item_id] = r["where"]
        items.append(TrainItem(item_id, r["audio"], r["prompt"], r["transcription"], r["where"]))
    return items


def _audiofolder_file(path: Path, caption_column: str | None) -> list[dict[str, Any]]:
    """A ``metadata.csv`` given as the file itself: its folder is the audiofolder."""
    if path.name not in METADATA:
        raise UsageError(f"{path}: a CSV must be an audiofolder's metadata.csv (file_name + caption columns)")
    return _audiofolder(path.parent, caption_column)


def check_clips(items: list[TrainItem]) -> dict[str, Clip]:
    """Each item's clip: it exists, soundfile reads its header, and it has samples; its bytes hashed. One error
    names the clip and its line. (Its length is checked against the model's by ``check_lengths``, once the
    model's config is read.)"""
    import soundfile as sf

    clips: dict[str, Clip] = {}
    for item in items:
        where = f"{item.where}: clip {item.audio}"
        if not item.audio.is_file():
            raise UsageError(f"{where} does not exist" + (" (a folder)" if item.audio.is_dir() else ""))
        try:
            info = sf.info(str(item.audio))
            sha = sha256_file(item.audio)
        except (sf.LibsndfileError, RuntimeError, OSError) as e:
            reason = (str(e).splitlines() or [type(e).__name__])[0]
            raise UsageError(f"{where} cannot be read ({reason})") from e
        if info.frames <= 0 or info.samplerate <= 0:
            raise UsageError(f"{where} is empty (0 samples)")
        clips[item.id] = Clip(sha, info.frames / info.samplerate)
    return clips


def check_lengths(items: list[TrainItem], clips: dict[str, Clip], max_seconds: float) -> None:
    """Every clip lasts at most ``max_seconds`` (the model's length), or an error naming the first that does not."""
    for item in items:
        seconds = clips[item.id].seconds
        if seconds > max_seconds + 1e-9:
            raise UsageError(
                f"{item.where}: clip {item.audio} is {seconds:.2f} s long; the model takes at most {max_seconds:g} "
                "s: cut it into clips of that length or less"
            )
