"""Dataset synthesis: many items, many processes, resumable (``audioldm2 --prompts-file items.jsonl -o out/``).

The data flow, per process (a torchrun rank, a ``--shard i/n`` job, or the only one):

    items file --read_items--> [Item] (every line checked, before any model is loaded)
               --resolve-----> [Job] (command-line defaults filled in, each item's seed fixed)
               --shard-------> this rank's jobs: items r, r + n, r + 2n, ... of the file (round robin)
               --plan--------> the jobs still to do: no manifest line, or the WAV is gone or changed
               --run---------> per batch: encode each item alone, denoise and decode the batch together,
                               write each WAV atomically, then append its manifest line
               --merge-------> out/manifest.jsonl, by whichever rank finds every item done

Items. A JSON Lines file, one object per line: ``{"id": "dog-01", "prompt": "a dog barking"}`` plus any of
``negative_prompt``, ``seed``, ``audio_length_in_s``, ``num_inference_steps``, ``guidance_scale``,
``sampler``, ``transcription`` (the speech checkpoints; passed to the pipeline as is), and any other fields,
which are copied into the item's manifest line. A file whose name ends in ``.jsonl`` or whose first
non-blank line starts with ``{`` is read as JSON Lines; any other file is the older format, one
``text|name`` per line (``#`` comments, the name optional: ``0001``, ``0002``, ... by position). An id (or
name) is the WAV's file name without ``.wav``: a string (or an int) with no ``/``, ``\\`` or control
characters, not ``.`` or ``..``, at most 200 characters, unique even ignoring case (macOS, Windows). Every
error names the file and line.

Same audio whatever the layout. An item's seed is its own ``seed`` or, without one, derived from the base
seed (``--seed``, 0 when not given) and its id: the first 8 bytes of ``sha256("<base seed>/<id>")``
(UTF-8), big-endian, shifted right one bit (a 63-bit non-negative int). Its latents (and DDIM's eta noise)
come from its own ``torch.Generator().manual_seed(seed)`` on the CPU: the pipeline takes one generator per
batch row (``samplers.randn``), so neither the batch an item lands in nor the rank it runs on changes its
draws. Its text conditions are encoded alone (``pipe.encode_prompt`` per item): batching prompts in the
text encoders would change them, not just round them, because the T5 prompts of a batch are padded to the
longest and GPT-2's positions count that padding (``gpt2.py``). Only the UNet, the VAE and the vocoder see
the batch, with each item's T5 states zero-padded and masked out to the batch's longest: what is left is
float rounding from the kernels' batch-dependent blocking (``tests/test_synthesis.py`` measures it). With
``--seed S`` and no ``seed`` field, an item alone gives the WAV that ``audioldm2 PROMPT --seed <its
manifest seed>`` gives, and diffusers with ``torch.Generator().manual_seed(<that seed>)``.

Batches (``--batch-size``): a rank's pending items with the same length, steps, guidance and sampler go
into one pipeline call, in file order; an item with a ``transcription`` runs on its own through ``pipe(...)``.

Sharding. Under torchrun the environment gives ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; each rank takes
items ``RANK, RANK + WORLD_SIZE, ...`` and, where the device asked for is ``cuda`` (no index) or ``auto``,
runs on ``cuda:LOCAL_RANK``. ``--shard i/n`` does the same without torchrun (SLURM arrays, Kubernetes
indexed jobs); with both, shard i is split among the torchrun ranks (global rank ``i * WORLD_SIZE +
RANK`` of ``n * WORLD_SIZE``). No collective is needed: ranks share only the output folder.

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

Left out on purpose: work stealing between ranks (the split is static; round robin balances a sorted
file), a lock against two processes running the same shard, and retrying a failed item (the rank stops
with the error; rerunning resumes).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .outputs import wav_bytes, write_atomic
from .samplers import SAMPLERS

__all__ = [
    "Context",
    "Item",
    "Job",
    "Layout",
    "RankLog",
    "generate_batch",
    "derive_seed",
    "read_items",
    "resolve",
    "layout_from_env",
    "shard",
    "plan",
    "synthesize",
    "merge_manifests",
    "run_cli",
]

MAX_ID_LENGTH = 200
MAX_AUDIO_LENGTH_S = 600.0  # pipeline.MAX_AUDIO_LENGTH_S, repeated here so that parsing needs no torch
MANIFEST = "manifest.jsonl"
RANK_MANIFEST = "manifest.rank{}.jsonl"

# Optional item fields and the pipeline arguments they set (the same names as diffusers' call).
ITEM_FIELDS = (
    "negative_prompt",
    "seed",
    "audio_length_in_s",
    "num_inference_steps",
    "guidance_scale",
    "sampler",
    "transcription",
)
# The fields a manifest line holds besides the item's own; an item's extra field may not reuse them.
RECORD_FIELDS = (
    "id", "index", "prompt", "file", "sha256", "sample_rate", "model", "revision", "model_commit", "dtype",
    "eta", "candidates", "clap_score", "seconds", "batch_size", *ITEM_FIELDS,
)  # fmt: skip


# ------------------------------------------------------------------------------------------- items


@dataclass(frozen=True)
class Item:
    """One line of an items file, as written (None: not given, the command line's value applies)."""

    id: str
    prompt: str
    line: int  # 1-based line number in the file, for errors
    index: int  # position among the file's items, 0-based
    negative_prompt: str | None = None
    seed: int | None = None
    audio_length_in_s: float | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    sampler: str | None = None
    transcription: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # other fields, copied into the manifest


def _check_id(name: str, where: str, what: str = "id") -> None:
    if not name:
        raise ValueError(f"{where}: the {what} is empty")
    if len(name) > MAX_ID_LENGTH:
        raise ValueError(f"{where}: {what} {name[:20]!r}... is longer than {MAX_ID_LENGTH} characters")
    if "/" in name or "\\" in name or name in (".", "..") or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError(
            f"{where}: {what} {name!r} must be usable as a file name (no '/', '\\' or control characters)"
        )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _check_fields(fields: dict[str, Any], where: str) -> None:
    """Types and ranges of the optional fields, with no model needed (the model's minimum length is
    checked by the pipeline)."""
    checks = {
        "negative_prompt": (lambda v: v is None or isinstance(v, str), "a string or null"),
        "transcription": (lambda v: v is None or isinstance(v, str), "a string or null"),
        "seed": (lambda v: v is None or (_is_int(v) and 0 <= v < 2**64), "an integer in [0, 2**64)"),
        "audio_length_in_s": (
            lambda v: v is None or (_is_number(v) and 0 < v <= MAX_AUDIO_LENGTH_S),
            f"a number of seconds in (0, {MAX_AUDIO_LENGTH_S:g}]",
        ),
        "num_inference_steps": (lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1"),
        "guidance_scale": (lambda v: v is None or (_is_number(v) and v >= 0), "a finite number >= 0"),
        "sampler": (lambda v: v is None or v in SAMPLERS, f"one of {', '.join(SAMPLERS)}"),
    }
    for name, (ok, what) in checks.items():
        if name in fields and not ok(fields[name]):
            raise ValueError(f"{where}: {name} must be {what}, got {fields[name]!r}")


def _json_item(text: str, where: str, index: int, line: int) -> Item:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: an item must be a JSON object, got {type(obj).__name__}")
    for key in ("id", "prompt"):
        if key not in obj:
            raise ValueError(f"{where}: the item has no {key!r}")
    item_id, prompt = obj.pop("id"), obj.pop("prompt")
    if _is_int(item_id):
        item_id = str(item_id)
    if not isinstance(item_id, str):
        raise ValueError(f"{where}: id must be a string or an integer, got {item_id!r}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: prompt must be a non-empty string, got {prompt!r}")
    _check_fields(obj, where)
    known = {k: obj.pop(k) for k in ITEM_FIELDS if k in obj}
    reserved = sorted(k for k in obj if k in RECORD_FIELDS)
    if reserved:
        raise ValueError(f"{where}: field {reserved[0]!r} is a manifest field; rename it")
    return Item(id=item_id, prompt=prompt, line=line, index=index, extra=obj, **known)


def _text_item(text: str, where: str, index: int, line: int) -> Item:
    prompt, _, name = text.partition("|")
    prompt, name = prompt.strip(), name.strip() or f"{index + 1:04d}"
    if not prompt:
        raise ValueError(f"{where}: empty prompt")
    return Item(id=name, prompt=prompt, line=line, index=index)


def read_items(path: Path) -> list[Item]:
    """Every item of a JSON Lines or ``text|name`` file (see the module docstring), each line checked."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read prompts file {path}: {e}") from e
    first = next((s.strip() for s in lines if s.strip()), "")
    jsonl = path.suffix == ".jsonl" or first.startswith("{")
    items: list[Item] = []
    seen: dict[str, int] = {}  # casefolded id -> line
    for number, text in enumerate(lines, 1):
        text = text.strip()
        if not text or (not jsonl and text.startswith("#")):
            continue
        where = f"{path}:{number}"
        parse = _json_item if jsonl else _text_item
        item = parse(text, where, len(items), number)
        _check_id(item.id, where, "id" if jsonl else "name")
        key = item.id.casefold()
        if key in seen:
            raise ValueError(
                f"{where}: {'id' if jsonl else 'name'} {item.id!r} is used twice (line {seen[key]}; "
                "names of files must differ even ignoring case)"
            )
        seen[key] = number
        items.append(item)
    if not items:
        raise ValueError(f"{path}: no items")
    return items


# -------------------------------------------------------------------------------- jobs and seeds


def derive_seed(base_seed: int, item_id: str) -> int:
    """An item's seed when it gives none: sha256 of ``"<base seed>/<id>"``, first 8 bytes, 63 bits."""
    digest = hashlib.sha256(f"{base_seed}/{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass(frozen=True)
class Job:
    """An item with every generation setting fixed: what a manifest line records and a rerun compares."""

    item: Item
    seed: int
    audio_length_in_s: float | None  # None: the model's default length (10.24 s), recorded once known
    num_inference_steps: int
    guidance_scale: float
    sampler: str
    negative_prompt: str | None

    @property
    def id(self) -> str:
        return self.item.id

    def batch_key(self) -> tuple:
        """Items with the same key can share a pipeline call."""
        return (self.audio_length_in_s, self.num_inference_steps, self.guidance_scale, self.sampler)


def resolve(items: list[Item], args: argparse.Namespace) -> list[Job]:
    """Fill each item's unset fields from the command line; fix its seed (its own, or derived)."""
    base = 0 if args.seed is None else args.seed

    def pick(value, default):
        return default if value is None else value

    transcription = getattr(args, "transcription", None)  # --transcription: the default of every item
    return [
        Job(
            item=it
            if it.transcription is not None or transcription is None
            else replace(it, transcription=transcription),
            seed=it.seed if it.seed is not None else derive_seed(base, it.id),
            audio_length_in_s=pick(it.audio_length_in_s, args.length),
            num_inference_steps=pick(it.num_inference_steps, args.steps),
            guidance_scale=float(pick(it.guidance_scale, args.guidance)),
            sampler=pick(it.sampler, args.sampler),
            negative_prompt=pick(it.negative_prompt, args.negative),
        )
        for it in items
    ]


# ------------------------------------------------------------------------------------------ sharding


@dataclass(frozen=True)
class Layout:
    """Where this process sits: global rank of world, and its local rank (its GPU) on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    torchrun: bool = False


def _env_int(env: dict[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n), 0 <= i < n."""
    i, sep, n = text.partition("/")
    try:
        i, n = int(i), int(n)
    except ValueError:
        i = n = -1
    if not sep or n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard must be i/n with 0 <= i < n (e.g. 0/4), got {text!r}")
    return i, n


def layout_from_env(shard_arg: str | None, env: dict[str, str] | None = None) -> Layout:
    """This process's rank and world: torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, ``--shard i/n``, both
    (shard i split among the torchrun ranks), or neither (rank 0 of 1)."""
    env = dict(os.environ) if env is None else env
    i, n = parse_shard(shard_arg) if shard_arg is not None else (0, 1)
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return Layout(rank=i, world=n)
    rank, world = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE")
    local = _env_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world} from the environment are inconsistent")
    return Layout(rank=i * world + rank, world=n * world, local_rank=local, torchrun=True)


def shard(jobs: list[Job], layout: Layout) -> list[Job]:
    """This rank's jobs: the file's items rank, rank + world, ... (round robin: a file sorted by length
    gives every rank the same mix)."""
    return jobs[layout.rank :: layout.world]


def rank_device(device: str | None, layout: Layout) -> str:
    """``auto`` as the single-prompt CLI resolves it (CUDA, MPS, CPU); ``cuda`` with no index under torchrun
    -> ``cuda:LOCAL_RANK``; anything else as asked."""
    if device in (None, "auto"):
        from .pipeline import resolve_device

        device = str(resolve_device(device))
    if device == "cuda" and layout.torchrun:
        return f"cuda:{layout.local_rank}"
    return device


# ---------------------------------------------------------------------------- files and manifest lines


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    """This rank's manifest: opened for appending, a torn last line cut off first, one ``write`` per line."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        size = os.fstat(self.fd).st_size
        if size:
            data = path.read_bytes()
            keep = data.rfind(b"\n") + 1
            if keep != size:  # the previous run was killed mid-line: that item was not done
                os.ftruncate(self.fd, keep)

    def drop(self, ids: set[str]) -> None:
        """Rewrite the log without lines naming ``ids`` (their WAVs are gone or changed: redone now)."""
        if not ids:
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
        os.close(self.fd)
        write_atomic(self.path, b"".join(kept))
        self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND, 0o644)

    def append(self, record: dict[str, Any]) -> None:
        os.write(self.fd, (json.dumps(record, ensure_ascii=False) + "\n").encode())
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


# ------------------------------------------------------------------------------------------ planning


@dataclass(frozen=True)
class Context:
    """What every record of a run shares."""

    model: str
    revision: str | None
    dtype: str
    eta: float
    candidates: int
    max_new_tokens: int | None = None  # --max-new-tokens (None: the checkpoint's)
    phonemes: bool = False  # --phonemes: transcriptions are IPA already


def settings(job: Job, ctx: Context) -> dict[str, Any]:
    """The settings a record must repeat to count as this job done (length: None until the model says)."""
    return {
        "prompt": job.item.prompt,
        "negative_prompt": job.negative_prompt,
        "seed": job.seed,
        "audio_length_in_s": job.audio_length_in_s,
        "num_inference_steps": job.num_inference_steps,
        "guidance_scale": job.guidance_scale,
        "sampler": job.sampler,
        "transcription": job.item.transcription,
        "eta": ctx.eta,
        "candidates": ctx.candidates,
        "dtype": ctx.dtype,
        "model": ctx.model,
        "revision": ctx.revision,
    }


def plan(jobs: list[Job], folder: Path, ctx: Context) -> tuple[list[Job], set[str]]:
    """(jobs still to do, ids whose line is stale). A job is done when its latest record's WAV exists with
    the record's sha256; a done job recorded with other settings is an error (one folder, one dataset)."""
    records = latest_records(folder)
    todo, stale = [], set()
    for job in jobs:
        rec = records.get(job.id)
        if rec is None:
            todo.append(job)
            continue
        wav = folder / f"{job.id}.wav"
        if not wav.is_file() or sha256_file(wav) != rec.get("sha256"):
            todo.append(job)
            stale.add(job.id)
            continue
        want = settings(job, ctx)
        if want["audio_length_in_s"] is None:  # the model's default: the record has the number
            want["audio_length_in_s"] = rec.get("audio_length_in_s")
        for key, value in want.items():
            if rec.get(key) != value:
                raise ValueError(
                    f"item {job.id!r} is already in {folder} with {key}={rec.get(key)!r}, not {value!r}; "
                    "use another output folder (or remove that item's WAV to redo it)"
                )
    return todo, stale


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


# -------------------------------------------------------------------------------------- generation


def default_length(pipe) -> float:
    """The model's own length in seconds (10.24 for the official checkpoints), as ``pipe()`` computes it."""
    v = pipe.vocoder_config
    factor = math.prod(v.upsample_rates) / v.sampling_rate  # seconds per mel frame
    return pipe.unet_config.sample_size * pipe.vae_config.scale_factor * factor  # the pipeline's order


def _pad(t, length: int):
    """(1, L, ...) -> (1, length, ...), zeros after L (masked out by the attention mask)."""
    import torch.nn.functional as F

    pad = [0, 0] * (t.ndim - 2) + [0, length - t.shape[1]]
    return F.pad(t, pad)


def generate_batch(pipe, jobs: list[Job], ctx: Context) -> tuple[Any, list[float | None]]:
    """Generate a batch of jobs that share a batch key: (audio (B, samples) float32 numpy, best CLAP score
    per job or None). Each job's text is encoded alone and its latents drawn from its own generator."""
    import torch

    first = jobs[0]
    guided = first.guidance_scale > 1.0
    n = ctx.candidates
    # A job's generator appears once per candidate: its candidates draw from it in order (samplers.randn).
    generators = [g for j in jobs for g in [torch.Generator().manual_seed(j.seed)] * n]
    common = dict(
        audio_length_in_s=first.audio_length_in_s,
        num_inference_steps=first.num_inference_steps,
        guidance_scale=first.guidance_scale,
        num_waveforms_per_prompt=n,
        eta=ctx.eta,
        generator=generators,
        sampler=first.sampler,
        output_type="pt",
    )
    if first.item.transcription is not None:  # the speech path: one item per call, as the pipeline takes it
        (job,) = jobs
        out = pipe(job.item.prompt, negative_prompt=job.negative_prompt, transcription=job.item.transcription,
                   transcription_is_phonemes=ctx.phonemes, max_new_tokens=ctx.max_new_tokens, rerank=n > 1,
                   **common)  # fmt: skip
        scores = [float(out.scores[0, 0])] if out.scores is not None else [None]
        return out.audios.float().cpu().numpy(), scores
    with torch.inference_mode():
        encoded = [
            pipe.encode_prompt(
                j.item.prompt,
                num_waveforms_per_prompt=1,
                do_classifier_free_guidance=guided,
                negative_prompt=j.negative_prompt,
                max_new_tokens=ctx.max_new_tokens,
            )
            for j in jobs
        ]
    length = max(e[0].shape[1] for e in encoded)
    half = 1 if guided else 0  # with guidance each job's rows are [negative, positive]
    embeds = torch.cat([_pad(e[0][half:], length) for e in encoded])  # (B, L, d_t5)
    mask = torch.cat([_pad(e[1][half:], length) for e in encoded])  # (B, L)
    generated = torch.cat([e[2][half:] for e in encoded])  # (B, 8, d_lm)
    negative = {}
    if guided:
        negative = dict(
            negative_prompt_embeds=torch.cat([_pad(e[0][:1], length) for e in encoded]),
            negative_attention_mask=torch.cat([_pad(e[1][:1], length) for e in encoded]),
            negative_generated_prompt_embeds=torch.cat([e[2][:1] for e in encoded]),
        )
    out = pipe(prompt_embeds=embeds, attention_mask=mask, generated_prompt_embeds=generated, rerank=False,
               **negative, **common)  # fmt: skip
    audio, scores = out.audios, [None] * len(jobs)
    if n > 1:  # rank each job's candidates by CLAP, within the job
        with torch.inference_mode():
            audio, ranked = pipe.score_waveforms([j.item.prompt for j in jobs], audio, n)
        scores = [float(s) for s in ranked[:, 0]]
    return audio.float().cpu().numpy(), scores  # (B * n, samples): job b's candidates at rows b*n ...


def batches(jobs: list[Job], size: int) -> Iterator[list[Job]]:
    """Jobs grouped by batch key, at most ``size`` each, in file order of each group's first job; a job with
    a transcription always alone."""
    open_: dict[tuple, list[Job]] = {}
    for job in jobs:
        if job.item.transcription is not None:
            yield [job]
            continue
        group = open_.setdefault(job.batch_key(), [])
        group.append(job)
        if len(group) == size:
            yield open_.pop(job.batch_key())
    yield from open_.values()


def record(job: Job, ctx: Context, pipe, sha: str, score: float | None, seconds: float, size: int) -> dict:
    rec: dict[str, Any] = {"id": job.id, "index": job.item.index, **settings(job, ctx)}
    commit = pipe.ckpt.root.name if pipe.ckpt.root.parent.name == "snapshots" else None
    rec |= {"model_commit": commit, "sample_rate": pipe.sample_rate, "file": f"{job.id}.wav", "sha256": sha}
    if score is not None:
        rec["clap_score"] = score
    rec |= {"seconds": round(seconds, 4), "batch_size": size}
    if job.item.transcription is None:
        del rec["transcription"]
    return rec | job.item.extra


def synthesize(
    pipe,
    jobs: list[Job],
    folder: Path,
    log: RankLog,
    ctx: Context,
    batch_size: int = 1,
    all_candidates: bool = False,
    progress=None,
    on_written=None,
) -> None:
    """The resumable loop: per batch, generate, write each WAV atomically, then append its line;
    ``on_written(wav_path, job, waveforms)`` after each item (its best, or with ``all_candidates`` every
    candidate, in rank order)."""
    n = ctx.candidates
    for group in batches(jobs, batch_size):
        if group[0].audio_length_in_s is None:  # the model's default length, recorded as a number
            group = [replace(j, audio_length_in_s=default_length(pipe)) for j in group]
        start = time.perf_counter()
        try:
            audio, scores = generate_batch(pipe, group, ctx)
        except (ValueError, TypeError) as e:  # a setting this model refuses (e.g. a length under its minimum)
            where = ", ".join(f"{j.id!r} (line {j.item.line})" for j in group)
            raise type(e)(f"item {where}: {e}") from e
        seconds = (time.perf_counter() - start) / len(group)
        for b, (job, score) in enumerate(zip(group, scores, strict=True)):
            wav = folder / f"{job.id}.wav"
            if all_candidates and n > 1:
                for k in range(n):
                    name = f"{job.id}.rank{k + 1}.wav"
                    write_atomic(folder / name, wav_bytes(audio[b * n + k], pipe.sample_rate))
            data = wav_bytes(audio[b * n], pipe.sample_rate)
            write_atomic(wav, data)  # the WAV first: a line always names a whole file
            log.append(record(job, ctx, pipe, hashlib.sha256(data).hexdigest(), score, seconds, len(group)))
            if on_written is not None:
                on_written(wav, job, [audio[b * n + k] for k in range(n if all_candidates else 1)])
            if progress is not None:
                progress.update(1)


# --------------------------------------------------------------------------------------------- merge


def merge_manifests(folder: Path, items: list[Item] | None = None, verify: bool = True) -> tuple[int, int]:
    """Write ``folder/manifest.jsonl``: one line per id, the latest record whose WAV is there (and, with
    ``verify``, has the record's sha256). With ``items``: only if every item has one (else nothing is
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
    if items is not None:
        if any(it.id not in chosen for it in items):
            return 0, 0
        lines = [chosen[it.id] for it in items]
    else:
        lines = sorted(chosen.values(), key=lambda r: (r.get("index", 0), r["id"]))
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines)
    write_atomic(folder / MANIFEST, body.encode())
    return len(lines), dropped


# ----------------------------------------------------------------------------------------------- CLI


def _error(message: str, layout: Layout | None = None) -> None:
    who = f"rank {layout.rank}: " if layout is not None and layout.world > 1 else ""
    print(f"audioldm2: error: {who}{message}", file=sys.stderr)


def _check_args(args: argparse.Namespace) -> None:
    """The command line's defaults for the items, checked as an item's fields are."""
    for flag, name, value in (
        ("--steps", "num_inference_steps", args.steps),
        ("--length", "audio_length_in_s", args.length),
        ("--guidance", "guidance_scale", args.guidance),
        ("--sampler", "sampler", args.sampler),
        ("--seed", "seed", args.seed),
    ):
        _check_fields({name: value}, flag)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.candidates < 1:
        raise ValueError(f"--candidates must be at least 1, got {args.candidates}")
    if not 0 <= args.eta <= 1:
        raise ValueError(f"--eta must be in [0, 1], got {args.eta}")
    if args.cuda_graphs and not str(args.device).startswith("cuda"):
        raise ValueError(f"--cuda-graphs needs a CUDA --device, not {args.device!r}")


def run_cli(args: argparse.Namespace) -> int:
    """``audioldm2 --prompts-file ...`` and ``--merge-manifests``: everything checked before a model loads."""
    if args.merge_manifests is not None:
        folder = Path(args.merge_manifests)
        if not folder.is_dir():
            _error(f"{folder} is not a folder")
            return 2
        written, dropped = merge_manifests(folder)
        note = f" ({dropped} ids dropped: WAV missing or changed)" if dropped else ""
        print(f"{folder / MANIFEST}: {written} items{note}")
        return 0
    layout = None
    try:
        layout = layout_from_env(args.shard)
        _check_args(args)
        items = read_items(args.prompts_file)
        jobs = resolve(items, args)
        folder = Path(args.output or ".")
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"output {folder} is a file; give a folder with --prompts-file")
        pictures = _check_spectrogram(args)
        from .cli import resolve_device_and_dtype

        args.device, args.dtype = resolve_device_and_dtype(rank_device(args.device, layout), args.dtype)
        ctx = Context(
            args.model,
            args.revision,
            args.dtype,
            args.eta,
            args.candidates,
            getattr(args, "max_new_tokens", None),
            bool(getattr(args, "phonemes", False)),
        )
        mine = shard(jobs, layout)
        todo, stale = plan(mine, folder, ctx)
        if any(j.item.transcription is not None for j in todo):
            from .pipeline import AudioLDM2

            if "transcription" not in inspect.signature(AudioLDM2.__call__).parameters:
                line = next(j.item.line for j in todo if j.item.transcription is not None)
                raise ValueError(
                    f"{args.prompts_file}:{line}: a transcription, but this version has no speech path"
                )
    except ValueError as e:
        _error(str(e), layout)
        return 2
    if not args.quiet:
        from .cli import device_line

        print(f"audioldm2: {device_line(args.device, args.dtype)}", file=sys.stderr)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        log = RankLog(folder / RANK_MANIFEST.format(layout.rank))
        log.drop(stale)
        remove_temp_files(folder, {j.id for j in todo})
        try:
            if todo:
                _generate(args, layout, folder, log, ctx, mine, todo, pictures)
        finally:
            log.close()
        merge_manifests(folder, items, verify=False)
    except KeyboardInterrupt:
        _error("interrupted", layout)
        return 130
    except Exception as e:  # one line (errors.explain: hub, disk, memory, bad input), --debug the traceback
        from .cli import error_line

        if getattr(args, "debug", False):
            traceback.print_exception(e)
        _error(error_line(e), layout)
        return 1
    return 0


def _check_spectrogram(args: argparse.Namespace) -> Path | None:
    """``--spectrogram DIR`` with a prompts file: one ``ID.png`` per written WAV; checked before any work."""
    if getattr(args, "spectrogram", None) is None:
        return None
    from .cli import _check_writable
    from .spectrogram import require_matplotlib

    require_matplotlib()
    folder = Path(args.spectrogram)
    if folder.exists() and not folder.is_dir():
        raise ValueError(
            f"--spectrogram {folder}: with --prompts-file give an output folder for the pictures"
        )
    _check_writable(folder)
    return folder


def _generate(
    args, layout: Layout, folder: Path, log: RankLog, ctx: Context, mine, todo, pictures: Path | None
) -> None:
    import torch

    from .pipeline import AudioLDM2

    device = args.device
    if device.startswith("cuda:"):
        torch.cuda.set_device(torch.device(device))
    pipe = AudioLDM2.from_pretrained(
        args.model,
        revision=args.revision,
        device=device,
        dtype=args.dtype,
        low_memory=bool(args.low_memory),
        compile=args.compile,
        cuda_graphs=args.cuda_graphs,
        fast=not args.plain,
        cpu_attention=True if args.cpu_attention else None,  # None: as AUDIOLDM2_CPU_ATTENTION says
    )

    def written(wav: Path, job: Job, waveforms) -> None:
        if pictures is not None:
            from .cli import _save_spectrogram

            for k, audio in enumerate(waveforms):
                name = f"{job.id}.png" if k == 0 else f"{job.id}.rank{k + 1}.png"
                _save_spectrogram(pictures / name, audio, pipe.sample_rate, job.item.prompt)
        print(wav)

    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="item", file=sys.stderr,
                   desc=f"rank {layout.rank}/{layout.world}", position=layout.local_rank, dynamic_ncols=True)  # fmt: skip
    try:
        synthesize(pipe, todo, folder, log, ctx, args.batch_size, args.all_candidates, bar, written)
    finally:
        if bar is not None:
            bar.close()
