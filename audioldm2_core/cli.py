"""Command line: ``audioldm2 "a dog barking in the rain" -o dog.wav`` (also ``python -m audioldm2_core``).

Audio in: ``--audio in.wav`` edits an input (style transfer with ``--strength``; ``--inpaint 3.5-5.0``, several
spans by repeating the flag or with commas; ``--inpaint-band LOW-HIGH`` in Hz; ``--super-resolution [HZ]``);
the input is read and checked before any model loads, so a bad file fails at once in one line.

Every failure a user can meet (bad input, an unreachable hub, a gated repo, a full disk, out of memory, an
output that cannot be written) exits non-zero with one line on stderr (``errors.explain``) and no traceback;
``--debug`` shows it. WAVs and spectrogram PNGs are written atomically (temp file in the same folder, then
renamed), so an interrupted run never leaves a half-written file behind. ``--device auto`` (the default) is
CUDA, then MPS, then the CPU; ``--dtype auto`` is float16 on CUDA (the VAE and the vocoder in float32), else
float32; the choice is printed in one line at start.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import traceback
from pathlib import Path

from .outputs import write_wav
from .samplers import SAMPLERS

DEFAULT_MODEL = "cvssp/audioldm2"
DEFAULT_STRENGTH = 0.6  # = pipeline.DEFAULT_STRENGTH (not imported: the CLI parses its flags without torch)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="audioldm2",
        description="Generate audio from text with AudioLDM 2 (official checkpoints, same output as diffusers); "
        "with --audio, edit an input: style transfer, inpainting (--inpaint), super-resolution.",
    )
    p.add_argument("prompt", nargs="?", help="text describing the sound (or use --prompts-file)")
    p.add_argument("-o", "--output", default=None, help="WAV file to write (a folder with --prompts-file)")
    p.add_argument(
        "--prompts-file",
        type=Path,
        help='JSON Lines items ({"id", "prompt", ...}) or \'text|name\' lines; one WAV each, resumable '
        "(see audioldm2_core/synthesis.py)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="items per pipeline call with --prompts-file (same settings)",
    )
    p.add_argument(
        "--shard", default=None, help="i/n: generate only share i of n of the items (SLURM arrays, k8s jobs)"
    )
    p.add_argument(
        "--merge-manifests",
        type=Path,
        metavar="DIR",
        help="merge DIR's per-rank manifests into DIR/manifest.jsonl",
    )
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="hub repo id or local folder (default: %(default)s)"
    )
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of --model")
    p.add_argument("--negative", default=None, help="negative prompt: what the audio should not sound like")
    p.add_argument(
        "--transcription",
        default=None,
        help="speech checkpoints (anhnct/audioldm2_gigaspeech, _ljspeech): the words to speak (the prompt "
        'describes the voice); English text, phonemised with espeak-ng (pip install ".[speech]")',
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="GPT-2 states to generate (default: the checkpoint's; 8, and 512 for the speech checkpoints)",
    )
    p.add_argument(
        "--phonemes",
        action="store_true",
        help='--transcription is IPA phonemes already (no espeak-ng needed), e.g. "həlˈoʊ wˈɜːld"',
    )
    p.add_argument("--steps", type=int, default=200, help="denoising steps (default: %(default)s)")
    p.add_argument(
        "--sampler",
        default="ddim",
        help=f"one of {', '.join(SAMPLERS)}: the diffusers scheduler of that name, same seed same audio "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--guidance", type=float, default=3.5, help="classifier-free guidance scale; 1 disables it"
    )
    p.add_argument(
        "--length",
        type=float,
        default=None,
        help="audio length in seconds (default: the model's, 10.24; with --audio the input's: a longer input "
        "is cut, a shorter one padded with silence)",
    )
    p.add_argument(
        "--audio",
        type=Path,
        default=None,
        metavar="WAV",
        help="input audio (WAV, FLAC, OGG, MP3; any rate, mono or stereo): alone, style transfer (SDEdit) "
        "toward the prompt; with --inpaint or --super-resolution, regenerate those parts and keep the rest",
    )
    p.add_argument(
        "--strength",
        type=float,
        default=None,
        help="with --audio: how far from the input, in (0, 1]: the share of the steps run from the input "
        f"noised to that level; 1 starts from noise (default: {DEFAULT_STRENGTH} for style transfer, 1 with "
        "--inpaint or --super-resolution)",
    )
    p.add_argument(
        "--inpaint",
        action="append",
        default=[],
        metavar="START-END",
        help="with --audio: regenerate these seconds and keep the rest, e.g. 3.5-5.0; repeat the flag or "
        "separate with commas for several spans (1-2,4-5)",
    )
    p.add_argument(
        "--inpaint-band",
        action="append",
        default=[],
        metavar="LOW-HIGH",
        help="with --audio: regenerate this frequency band in Hz, e.g. 2000-4000 (within the --inpaint spans "
        "if given, else over the whole input); repeatable, comma-separated",
    )
    p.add_argument(
        "--super-resolution",
        nargs="?",
        const="auto",
        default=None,
        metavar="HZ",
        help="with --audio: regenerate the missing top band of band-limited audio, above HZ (default: half "
        "the input file's own sample rate, e.g. 4000 for an 8 kHz recording)",
    )
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like noise")
    p.add_argument("--seed", type=int, default=None, help="random seed (same seed, same audio as diffusers)")
    p.add_argument(
        "--candidates", type=int, default=1, help="waveforms per prompt, ranked by CLAP; best is written"
    )
    p.add_argument("--all-candidates", action="store_true", help="also write every candidate, named by rank")
    p.add_argument(
        "--device",
        default="auto",
        help="torch device: auto (CUDA, then MPS, then the CPU), cpu, cuda, cuda:1, mps (default: %(default)s)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="compute dtype; auto: float16 on CUDA, float32 elsewhere (default: %(default)s)",
    )
    p.add_argument(
        "--spectrogram",
        type=Path,
        default=None,
        metavar="PNG",
        help="also draw each written WAV's log-mel spectrogram to this PNG (named like the WAVs: x.png, "
        "x.rank1.png; a folder with --prompts-file); needs matplotlib",
    )
    p.add_argument(
        "--low-memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="load each component only while it runs (default: on for one prompt, off for a prompts file)",
    )
    p.add_argument(
        "--cpu-attention",
        action="store_true",
        help="the C++ attention kernel for the UNet on the CPU where it is faster here (built on first use, needs a C++ compiler)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="run the UNet under torch.compile (minutes to compile first: for many steps or prompts, on a GPU)",
    )
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="replay each denoising loop from a CUDA graph (CUDA devices only)",
    )
    p.add_argument(
        "--plain",
        action="store_true",
        help="the plain reference model, without the speed layer's exact rewrites (audioldm2_core.fast)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="on an error, show the traceback too")
    args = p.parse_args(argv)
    if args.merge_manifests is None and (args.prompt is None) == (args.prompts_file is None):
        p.error("give exactly one of a prompt or --prompts-file")
    return args


def parse_ranges(values: list[str], flag: str, unit: str) -> list[tuple[float, float]]:
    """``["3.5-5.0", "6-7,8-9"]`` -> [(3.5, 5.0), (6.0, 7.0), (8.0, 9.0)]; a clear error for anything else."""
    out = []
    for value in values:
        for part in value.split(","):
            low, sep, high = part.strip().partition("-")
            try:
                if not sep:
                    raise ValueError
                out.append((float(low), float(high)))
            except ValueError:
                raise ValueError(f"{flag} {part.strip()!r}: give START-END in {unit}, e.g. 3.5-5.0") from None
    return out


def editing_options(args: argparse.Namespace) -> dict:
    """The pipeline's audio-input arguments from the flags (empty without ``--audio``), checked."""
    flags = {"--strength": args.strength is not None, "--inpaint": args.inpaint,
             "--inpaint-band": args.inpaint_band, "--super-resolution": args.super_resolution is not None}  # fmt: skip
    used = [flag for flag, given in flags.items() if given]
    if args.audio is None:
        if used:
            raise ValueError(f"{', '.join(used)}: only with an input, --audio WAV")
        return {}
    spans = parse_ranges(args.inpaint, "--inpaint", "seconds")
    bands = parse_ranges(args.inpaint_band, "--inpaint-band", "Hz")
    cutoff = None
    if args.super_resolution not in (None, "auto"):
        try:
            cutoff = float(args.super_resolution)
        except ValueError:
            raise ValueError(
                f"--super-resolution {args.super_resolution!r}: give a cutoff in Hz, e.g. 4000, or nothing"
            ) from None
    strength = args.strength
    if strength is None:
        strength = 1.0 if spans or bands or args.super_resolution is not None else DEFAULT_STRENGTH
    return dict(
        audio=args.audio,
        strength=strength,
        inpaint_spans_s=spans or None,
        inpaint_bands_hz=bands or None,
        super_resolution=args.super_resolution is not None,
        cutoff_hz=cutoff,
    )


def _check_audio(args: argparse.Namespace, editing: dict) -> None:
    """Read the input once before loading a model, so that a bad file fails at once, in one line."""
    if not editing:
        return
    from .audio import load_audio
    from .editing import start_index
    from .pipeline import MAX_AUDIO_LENGTH_S

    load_audio(args.audio, max_seconds=MAX_AUDIO_LENGTH_S)
    start_index(args.steps, editing["strength"])


def _check_writable(folder: Path) -> None:
    if not folder.is_dir():
        raise ValueError(f"output folder {folder} does not exist")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise ValueError(f"cannot write to {folder}: {e.strerror or e}") from e


def _check_args(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """Validate everything that can be checked before loading a model; return (prompt, wav path) jobs."""
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    if args.length is not None and not args.length > 0:
        raise ValueError(f"--length must be a positive number of seconds, got {args.length}")
    if args.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {args.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if args.candidates < 1:
        raise ValueError(f"--candidates must be at least 1, got {args.candidates}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.phonemes and args.transcription is None:
        raise ValueError("--phonemes says how to read --transcription: give --transcription too")
    if args.cuda_graphs and not args.device.startswith("cuda"):
        raise ValueError(f"--cuda-graphs needs a CUDA --device, not {args.device!r}")
    if not args.prompt.strip():
        raise ValueError("the prompt is empty")
    out = Path(args.output or "audioldm2.wav")
    if out.is_dir():
        raise ValueError(f"output {out} is a folder; give a .wav file name")
    _check_writable(out.parent)
    return [(args.prompt, out)]


def resolve_device_and_dtype(device: str, dtype: str) -> tuple[str, str]:
    """``--device auto``: CUDA, then MPS, then the CPU; ``--dtype auto``: float16 on CUDA, else float32."""
    from .pipeline import resolve_device

    resolved = resolve_device(device)
    if dtype == "auto":
        dtype = "float16" if resolved.type == "cuda" else "float32"
    return str(resolved), dtype


def device_line(device: str, dtype: str) -> str:
    """The one line printed at start: where and in what precision the model runs."""
    import torch

    where = torch.device(device)
    if where.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(where)}), {dtype}"
    if where.type == "cpu":
        return f"cpu, {dtype}, {torch.get_num_threads()} threads (no CUDA or MPS device found)"
    return f"{device}, {dtype}"


def error_line(error: BaseException) -> str:
    """The one line shown for an error: ``errors.explain``'s, or for anything else (a bug) its type and
    message with a pointer to ``--debug``."""
    from .errors import explain

    line = explain(error)
    if line is None:
        first = (str(error).strip().splitlines() or [""])[0]
        line = f"{type(error).__name__}: {first} (unexpected; --debug shows the traceback)"
    return line


def _fail(error: BaseException, args: argparse.Namespace, code: int) -> int:
    if args.debug:
        traceback.print_exception(error)
    print(f"audioldm2: error: {error_line(error)}", file=sys.stderr)
    return code


def _spectrogram_paths(args: argparse.Namespace, jobs: list[tuple[str, Path]]) -> dict[Path, Path]:
    """WAV path -> PNG path for ``--spectrogram``; checked (matplotlib, a writable place) before loading."""
    if args.spectrogram is None:
        return {}
    from .spectrogram import require_matplotlib

    require_matplotlib()
    if args.prompts_file is not None:
        _check_writable(args.spectrogram)
        return {wav: args.spectrogram / f"{wav.stem}.png" for _, wav in jobs}
    if args.spectrogram.is_dir():
        raise ValueError(f"--spectrogram {args.spectrogram} is a folder; give a .png file name")
    _check_writable(args.spectrogram.parent)
    return {wav: args.spectrogram for _, wav in jobs}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.prompts_file is not None or args.merge_manifests is not None:
        from .synthesis import run_cli  # many items: sharding, per-item seeds, a resumable manifest

        return run_cli(args)
    try:
        args.device, args.dtype = resolve_device_and_dtype(args.device, args.dtype)
        jobs = _check_args(args)
        editing = editing_options(args)
        _check_audio(args, editing)
        pictures = _spectrogram_paths(args, jobs)
        import torch

        from .pipeline import AudioLDM2
    except Exception as e:
        return _fail(e, args, 2)
    if not args.quiet:
        print(f"audioldm2: {device_line(args.device, args.dtype)}", file=sys.stderr)
    try:
        low_memory = args.low_memory if args.low_memory is not None else len(jobs) == 1
        pipe = AudioLDM2.from_pretrained(
            args.model,
            revision=args.revision,
            device=args.device,
            dtype=args.dtype,
            low_memory=low_memory,
            compile=args.compile,
            cuda_graphs=args.cuda_graphs,
            fast=not args.plain,
            cpu_attention=True if args.cpu_attention else None,  # None: as AUDIOLDM2_CPU_ATTENTION says
        )
        for text, path in jobs:
            generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
            bar = None
            if not args.quiet:
                from tqdm import tqdm

                from .editing import start_index

                runs = args.steps - start_index(args.steps, editing["strength"]) if editing else args.steps
                bar = tqdm(total=runs, desc=path.name, unit="step", file=sys.stderr)
            try:
                out = pipe(
                    text,
                    audio_length_in_s=args.length,
                    num_inference_steps=args.steps,
                    guidance_scale=args.guidance,
                    negative_prompt=args.negative,
                    num_waveforms_per_prompt=args.candidates,
                    eta=args.eta,
                    generator=generator,
                    sampler=args.sampler,
                    callback=(lambda i, t, x, bar=bar: bar.update(1)) if bar is not None else None,
                    max_new_tokens=args.max_new_tokens,
                    transcription=args.transcription,
                    transcription_is_phonemes=args.phonemes,
                    **editing,
                )
            finally:
                if bar is not None:
                    bar.close()
            write_wav(path, out.audios[0], out.sample_rate)
            picture = pictures.get(path)
            if picture is not None:
                _save_spectrogram(picture, out.audios[0], out.sample_rate, text)
            if args.all_candidates and args.candidates > 1:
                for rank, audio in enumerate(out.audios, 1):
                    write_wav(path.with_name(f"{path.stem}.rank{rank}{path.suffix}"), audio, out.sample_rate)
                    if picture is not None:
                        name = f"{picture.stem}.rank{rank}{picture.suffix}"
                        _save_spectrogram(
                            picture.with_name(name), audio, out.sample_rate, f"{text} (#{rank})"
                        )
            print(path)
    except Exception as e:
        return _fail(e, args, 1)
    except KeyboardInterrupt:
        print("audioldm2: interrupted", file=sys.stderr)
        return 130
    return 0


def _save_spectrogram(path: Path, audio, sample_rate: int, title: str) -> None:
    from .spectrogram import save_spectrogram

    save_spectrogram(path, audio, sample_rate, title=title if len(title) <= 80 else title[:77] + "...")


if __name__ == "__main__":
    sys.exit(main())
