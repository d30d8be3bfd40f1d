"""The manifest of a dataset run (``synthesis.py``): per-rank logs of the items done, and their merge.

The manifest, and why a kill loses nothing. Each rank appends to its own ``out/manifest.rank<R>.jsonl``,
one line per item, after that item's WAV is in place: the WAV is written to a temp file beside it
(``.<id>.wav.<random>.tmp``), fsynced and renamed, then the line is appended with one ``write`` and fsynced.
A line is the item's record: id, prompt, negative prompt, seed, steps, sampler, guidance, length, eta,
candidates, dtype, model and revision (and the hub commit), sample rate, file, sha256, CLAP score (when
``--candidates`` > 1 ranked them), seconds (the batch's time over its size), batch size, the item's index in
the file, and the item's extra fields. An item is done when a line names it and its WAV's sha256 is the
line's. So a kill (any rank, any moment) can leave: a temp file (removed by the rank that reruns the item),
a WAV without a line (rewritten, with the same bytes, when rerun; no line was there to duplicate), or a
torn last line (no newline: ignored by every reader, cut off by its rank before it appends again). A rerun
of the same command skips what is done and redoes the rest. A rerun with other settings for an item that
is done (another prompt, seed, steps, model, ...) is refused, naming the item and the setting: one output
folder holds one dataset.

Merging. When a rank has finished its items it reads every rank's lines and, if every item of the file
has a line and a WAV, writes ``out/manifest.jsonl`` (temp file and rename): one line per item, in file
order, the latest record of each. Each rank checks after its own last line is written, so the rank that
finishes last always sees everything; two ranks finishing together write the same file. No markers, no
barrier: a crashed rank simply leaves the merge to the rerun. ``audioldm2 --merge-manifests out/`` merges
by hand: it checks each record's sha256 against its WAV and keeps the latest matching one per id.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import UsageError
from .outputs import write_atomic

__all__ = [
    "MANIFEST",
    "RANK_MANIFEST",
    "RankLog",
    "json_object",
    "read_records",
    "latest_records",
    "merge_manifests",
    "sha256_file",
]

MANIFEST = "manifest.jsonl"
RANK_MANIFEST = "manifest.rank{}.jsonl"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def json_object(text: str, where: str, what: str) -> dict[str, Any]:
    """A JSON Lines line that must be one object (``what``: "a line", "an item"), or a ``UsageError`` naming
    ``where`` ("file:line")."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{where}: {what} must be a JSON object, got {type(obj).__name__}")
    return obj


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """The complete lines of a manifest: a last line without its newline (a kill mid-append) is skipped,
    and so is any line that is not a JSON object with an id (not ours to trust)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    lines = data.split(b"\n")[:-1]  # the part after the last newline is torn or empty
    for raw in lines:
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(rec, dict) and isinstance(rec.get("id"), str):
            yield rec


def manifest_files(folder: Path) -> list[Path]:
    """Every rank's manifest in a folder (any world size: a rerun may use another), then the merged one."""
    return sorted(folder.glob(RANK_MANIFEST.format("*"))) + [folder / MANIFEST]


def latest_records(folder: Path) -> dict[str, dict[str, Any]]:
    """id -> the last record naming it (rank files in name order, then the merged manifest)."""
    out: dict[str, dict[str, Any]] = {}
    for path in manifest_files(folder):
        for rec in read_records(path):
            out[rec["id"]] = rec
    return out


def all_records(folder: Path) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for path in manifest_files(folder):
        for rec in read_records(path):
            out.setdefault(rec["id"], []).append(rec)
    return out


class RankLog:
    """This rank's manifest: opened for appending, a torn last line cut off first, one ``write`` per line. A
    rank that writes nothing (its model failed to load) leaves no file."""

    def __init__(self, path: Path):
        self.path, self.fd = path, None
        if path.is_file():
            self.open()
            size = os.fstat(self.fd).st_size
            data = path.read_bytes()
            keep = data.rfind(b"\n") + 1
            if keep != size:  # the previous run was killed mid-line: that item was not done
                os.ftruncate(self.fd, keep)

    def open(self) -> int:
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        return self.fd

    def drop(self, ids: set[str]) -> None:
        """Rewrite the log without lines naming ``ids`` (their WAVs are gone or changed: redone now)."""
        if not ids or self.fd is None:
            return
        lines = self.path.read_bytes().split(b"\n")[:-1]
        kept = []
        for raw in lines:
            try:
                stale = json.loads(raw).get("id") in ids
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                stale = False
            if not stale:
                kept.append(raw + b"\n")
        self.close()
        write_atomic(self.path, b"".join(kept))
        self.open()

    def append(self, record: dict[str, Any]) -> None:
        fd = self.open()
        os.write(fd, (json.dumps(record, ensure_ascii=False) + "\n").encode())
        os.fsync(fd)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def remove_temp_files(folder: Path, ids: set[str]) -> None:
    """Delete the temp WAVs (``.<id>.wav.<random>.tmp``, ``.<id>.rank<k>.wav...``) a killed run left for
    these ids."""
    for entry in os.scandir(folder):
        name = entry.name
        if name.startswith(".") and name.endswith(".tmp"):
            stem = name[1:-4].rpartition(".")[0]  # "<id>.wav" or "<id>.rank<k>.wav"
            base = stem.removesuffix(".wav")
            if stem.endswith(".wav") and (base in ids or base.rpartition(".rank")[0] in ids):
                Path(entry.path).unlink(missing_ok=True)


def merge_manifests(folder: Path, ids: list[str] | None = None, verify: bool = True) -> tuple[int, int]:
    """Write ``folder/manifest.jsonl``: one line per id, the latest record whose WAV is there (and, with
    ``verify``, has the record's sha256). With ``ids`` (the items', in file order): only if every one has one (else nothing is
    written), in file order; without: every id found, by item index. Returns (lines written, ids
    dropped); (0, 0) when ``items`` are not all done yet."""
    folder = Path(folder)
    found = all_records(folder)
    chosen: dict[str, dict[str, Any]] = {}
    dropped = 0
    for item_id, recs in found.items():
        wav = folder / f"{item_id}.wav"
        digest = sha256_file(wav) if verify and wav.is_file() else None
        ok = [r for r in recs if wav.is_file() and (not verify or r.get("sha256") == digest)]
        if ok:
            chosen[item_id] = ok[-1]
        else:
            dropped += 1
    if ids is not None:
        if any(i not in chosen for i in ids):
            return 0, 0
        lines = [chosen[i] for i in ids]
    else:
        lines = sorted(chosen.values(), key=lambda r: (r.get("index", 0), r["id"]))
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines)
    write_atomic(folder / MANIFEST, body.encode())
    return len(lines), dropped
