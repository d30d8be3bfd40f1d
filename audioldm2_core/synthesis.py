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
batch row (``noise.randn``), so neither the batch an item lands in nor the rank it runs on changes its
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

The manifest and its merge: ``manifest.py``.

Left out on purpose: work stealing between ranks (the split is static; round robin balances a sorted
file), a lock against two processes running the same shard, and retrying a failed item (the rank stops
with the error; rerunning resumes).
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import UsageError
from .frontend import (
    MANY,
    Layout,
    check_writable,
    device_line,
    fail,
    layout_from_env,
    load_options,
    load_pipeline,
    parse,
    rank_device,
    rank_prefix,
    resolve_device_and_dtype,
    save_spectrogram,
    speed_lines,
)
from .manifest import (
    MANIFEST,
    RANK_MANIFEST,
    RankLog,
    json_object,
    latest_records,
    merge_manifests,
    remove_temp_files,
    sha256_file,
)
from .outputs import wav_bytes, write_atomic
from .request import GenerationRequest, LoadOptions

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
    "RunOptions",
    "run",
    "main",
]

MAX_ID_LENGTH = 200

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
        raise UsageError(f"{where}: the {what} is empty")
    if len(name) > MAX_ID_LENGTH:
        raise UsageError(f"{where}: {what} {name[:20]!r}... is longer than {MAX_ID_LENGTH} characters")
    if "/" in name or "\\" in name or name in (".", "..") or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise UsageError(
            f"{where}: {what} {name!r} must be usable as a file name (no '/', '\\' or control characters)"
        )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_fields(fields: dict[str, Any], where: str) -> None:
    """The optional fields' types and ranges, before any model: the request's own checks
    (``GenerationRequest.check``; the model's minimum length is checked by the pipeline), and the items file's:
    one prompt per item, a seed ``torch.Generator`` takes."""
    for name in ("negative_prompt", "transcription"):
        if fields.get(name) is not None and not isinstance(fields[name], str):
            raise UsageError(f"{where}: {name} must be a string or null, got {fields[name]!r}")
    seed = fields.get("seed")
    if seed is not None and not (_is_int(seed) and 0 <= seed < 2**64):
        raise UsageError(f"{where}: seed must be an integer in [0, 2**64), got {seed!r}")
    known = {k: fields[k] for k in ("audio_length_in_s", "num_inference_steps", "guidance_scale", "sampler")
             if fields.get(k) is not None}  # fmt: skip
    try:
        GenerationRequest("-", **known).check()
    except UsageError as e:
        raise type(e)(f"{where}: {e}") from None  # named by its place, not by a flag


def _json_item(text: str, where: str, index: int, line: int) -> Item:
    obj = json_object(text, where, "an item")
    for key in ("id", "prompt"):
        if key not in obj:
            raise UsageError(f"{where}: the item has no {key!r}")
    item_id, prompt = obj.pop("id"), obj.pop("prompt")
    if _is_int(item_id):
        item_id = str(item_id)
    if not isinstance(item_id, str):
        raise UsageError(f"{where}: id must be a string or an integer, got {item_id!r}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise UsageError(f"{where}: prompt must be a non-empty string, got {prompt!r}")
    _check_fields(obj, where)
    known = {k: obj.pop(k) for k in ITEM_FIELDS if k in obj}
    reserved = sorted(k for k in obj if k in RECORD_FIELDS)
    if reserved:
        raise UsageError(f"{where}: field {reserved[0]!r} is a manifest field; rename it")
    return Item(id=item_id, prompt=prompt, line=line, index=index, extra=obj, **known)


def _text_item(text: str, where: str, index: int, line: int) -> Item:
    prompt, _, name = text.partition("|")
    prompt, name = prompt.strip(), name.strip() or f"{index + 1:04d}"
    if not prompt:
        raise UsageError(f"{where}: empty prompt")
    return Item(id=name, prompt=prompt, line=line, index=index)


def read_items(path: Path) -> list[Item]:
    """Every item of a JSON Lines or ``text|name`` file (see the module docstring), each line checked."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read prompts file {path}: {e}") from e
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
            raise UsageError(
                f"{where}: {'id' if jsonl else 'name'} {item.id!r} is used twice (line {seen[key]}; "
                "names of files must differ even ignoring case)"
            )
        seen[key] = number
        items.append(item)
    if not items:
        raise UsageError(f"{path}: no items")
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


def resolve(items: list[Item], defaults: GenerationRequest, seed: int | None = None) -> list[Job]:
    """Fill each item's unset fields from the command line's request; fix its seed (its own, or derived from
    the base ``seed``)."""
    base = 0 if seed is None else seed

    def pick(value, default):
        return default if value is None else value

    words = defaults.transcription  # --transcription: the default of every item
    return [
        Job(
            item=it if it.transcription is not None or words is None else replace(it, transcription=words),
            seed=it.seed if it.seed is not None else derive_seed(base, it.id),
            audio_length_in_s=pick(it.audio_length_in_s, defaults.audio_length_in_s),
            num_inference_steps=pick(it.num_inference_steps, defaults.num_inference_steps),
            guidance_scale=float(pick(it.guidance_scale, defaults.guidance_scale)),
            sampler=pick(it.sampler, defaults.sampler),
            negative_prompt=pick(it.negative_prompt, defaults.negative_prompt),
        )
        for it in items
    ]


# ------------------------------------------------------------------------------------------ sharding


def shard(jobs: list[Job], layout: Layout) -> list[Job]:
    """This rank's jobs: the file's items rank, rank + world, ... (round robin: a file sorted by length
    gives every rank the same mix)."""
    return jobs[layout.rank :: layout.world]


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
                raise UsageError(
                    f"item {job.id!r} is already in {folder} with {key}={rec.get(key)!r}, not {value!r}; "
                    "use another output folder (or remove that item's WAV to redo it)"
                )
    return todo, stale


# -------------------------------------------------------------------------------------- generation


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
    # A job's generator appears once per candidate: its candidates draw from it in order (noise.randn).
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
            group = [replace(j, audio_length_in_s=pipe.default_length) for j in group]
        start = time.perf_counter()
        try:
            audio, scores = generate_batch(pipe, group, ctx)
        except UsageError as e:  # a setting this model refuses (e.g. a length under its minimum)
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


# ----------------------------------------------------------------------------------------------- CLI

DESCRIPTION = (
    "Dataset synthesis with AudioLDM 2: one WAV per item of a prompts file, a resumable manifest, sharded "
    "under torchrun or --shard (docs/synthesis.md)."
)


@dataclass(frozen=True)
class RunOptions:
    """A dataset run, as ``audioldm2 --prompts-file`` gives it."""

    items_file: Path
    folder: Path
    defaults: GenerationRequest  # every item's settings where it gives none (its prompt is a placeholder)
    seed: int | None  # the base of the items' derived seeds
    load: LoadOptions
    batch_size: int = 1
    shard: str | None = None  # "i/n"
    all_candidates: bool = False
    spectrogram: Path | None = None  # a folder for one PNG per WAV
    quiet: bool = False
    asked_dtype: str = ""  # --dtype as given ("auto": the first line says what it picked)

    def context(self) -> Context:
        d = self.defaults
        return Context(self.load.model, self.load.revision, self.load.dtype, d.eta, d.num_waveforms_per_prompt,
                       d.max_new_tokens, d.transcription_is_phonemes)  # fmt: skip

    def check(self) -> None:
        """The run's settings, checked as an item's fields are (a flag's error names the flag)."""
        self.defaults.check()
        if self.seed is not None:
            _check_fields({"seed": self.seed}, "--seed")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.folder.exists() and not self.folder.is_dir():
            raise UsageError(f"output {self.folder} is a file; give a folder with --prompts-file")
        if self.spectrogram is not None:
            from .spectrogram import require_matplotlib

            require_matplotlib()
            if self.spectrogram.exists() and not self.spectrogram.is_dir():
                raise UsageError(f"--spectrogram {self.spectrogram}: with --prompts-file give an output folder "
                                 "for the pictures")  # fmt: skip
            check_writable(self.spectrogram)
        self.load.check()


def options_from(args, layout: Layout) -> RunOptions:
    """The run the flags ask for (the device is this rank's)."""
    defaults = GenerationRequest(
        "-", args.audio_length_in_s, args.num_inference_steps, args.guidance_scale, args.negative_prompt,
        args.num_waveforms_per_prompt, args.eta, "pt", args.sampler, max_new_tokens=args.max_new_tokens,
        transcription=args.transcription, transcription_is_phonemes=args.transcription_is_phonemes,
    )  # fmt: skip
    device, dtype = resolve_device_and_dtype(rank_device(args.device, layout), args.dtype)
    return RunOptions(args.prompts_file, Path(args.output or "."), defaults, args.seed,
                      load_options(args, device, dtype, low_memory=bool(args.low_memory)), args.batch_size,
                      args.shard, args.all_candidates, args.spectrogram, args.quiet, args.dtype)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """``audioldm2 --prompts-file ...`` and ``--merge-manifests``: everything checked before a model loads."""
    args = parse(MANY, argv, DESCRIPTION)
    if args.merge_manifests is not None:
        return _merge_command(args.merge_manifests)
    layout = None
    try:
        if args.prompts_file is None:
            raise UsageError("give --prompts-file (or --merge-manifests DIR)")
        layout = layout_from_env(args.shard)
        options = options_from(args, layout)
        options.check()
    except Exception as e:
        return fail("audioldm2", e, args.debug, 2, rank_prefix(layout))
    return run(options, layout, args.debug)


def run(options: RunOptions, layout: Layout | None = None, debug: bool = False) -> int:
    """Plan this rank's share of the items (all checked first), generate what is not done, merge."""
    layout = layout or layout_from_env(options.shard)
    try:
        items = read_items(options.items_file)
        mine = shard(resolve(items, options.defaults, options.seed), layout)
        todo, stale = plan(mine, options.folder, options.context())
    except Exception as e:
        return fail("audioldm2", e, debug, 2, rank_prefix(layout))
    if not options.quiet:
        print(f"audioldm2: {device_line(options.load, options.asked_dtype)}", file=sys.stderr)
    try:
        options.folder.mkdir(parents=True, exist_ok=True)
        log = RankLog(options.folder / RANK_MANIFEST.format(layout.rank))
        log.drop(stale)
        remove_temp_files(options.folder, {j.id for j in todo})
        try:
            if todo:
                _generate(options, layout, log, len(mine), todo)
        finally:
            log.close()
        merge_manifests(options.folder, [it.id for it in items], verify=False)
    except KeyboardInterrupt:
        print(f"audioldm2: error: {rank_prefix(layout)}interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line (errors.explain: hub, disk, memory, bad input), --debug the traceback
        return fail("audioldm2", e, debug, 1, rank_prefix(layout))
    return 0


def _merge_command(folder: Path) -> int:
    if not folder.is_dir():
        print(f"audioldm2: error: {folder} is not a folder", file=sys.stderr)
        return 2
    written, dropped = merge_manifests(folder)
    note = f" ({dropped} ids dropped: WAV missing or changed)" if dropped else ""
    print(f"{folder / MANIFEST}: {written} items{note}")
    return 0


def _generate(options: RunOptions, layout: Layout, log: RankLog, total: int, todo: list[Job]) -> None:
    import torch
    from tqdm import tqdm

    if options.load.device.startswith("cuda:"):
        torch.cuda.set_device(torch.device(options.load.device))
    load = speed_lines("audioldm2", options.load, options.quiet)
    pipe = load_pipeline("audioldm2", load)  # before the bar: a load failure is the next line
    pictures = options.spectrogram

    def written(wav: Path, job: Job, waveforms) -> None:
        for k, audio in enumerate(waveforms if pictures is not None else []):
            name = f"{job.id}.png" if k == 0 else f"{job.id}.rank{k + 1}.png"
            save_spectrogram(pictures / name, audio, pipe.sample_rate, job.item.prompt)
        print(wav)

    with tqdm(total=total, initial=total - len(todo), unit="item", file=sys.stderr, disable=options.quiet,
              desc=f"rank {layout.rank}/{layout.world}", position=layout.local_rank, dynamic_ncols=True) as bar:  # fmt: skip
        synthesize(pipe, todo, options.folder, log, options.context(), options.batch_size, options.all_candidates,
                   bar, written)  # fmt: skip
