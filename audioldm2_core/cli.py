"""Command line: ``audioldm2 "a dog barking in the rain" -o dog.wav`` (also ``python -m audioldm2_core``).

Bad input exits non-zero with one line on stderr and no traceback; a WAV is written atomically (temp file in
the same folder, then renamed), so an interrupted run never leaves a half-written file behind.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from .samplers import SAMPLERS

DEFAULT_MODEL = "cvssp/audioldm2"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="audioldm2",
        description="Generate audio from text with AudioLDM 2 (official checkpoints, same output as diffusers).",
    )
    p.add_argument("prompt", nargs="?", help="text describing the sound (or use --prompts-file)")
    p.add_argument("-o", "--output", default=None, help="WAV file to write (a folder with --prompts-file)")
    p.add_argument(
        "--prompts-file", type=Path, help="one prompt per line, optionally 'text|name'; one WAV each"
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
    p.add_argument("--sampler", default="ddim", help=f"one of {', '.join(SAMPLERS)} (default: %(default)s)")
    p.add_argument(
        "--guidance", type=float, default=3.5, help="classifier-free guidance scale; 1 disables it"
    )
    p.add_argument(
        "--length", type=float, default=None, help="audio length in seconds (default: the model's, 10.24)"
    )
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like noise")
    p.add_argument("--seed", type=int, default=None, help="random seed (same seed, same audio as diffusers)")
    p.add_argument(
        "--candidates", type=int, default=1, help="waveforms per prompt, ranked by CLAP; best is written"
    )
    p.add_argument("--all-candidates", action="store_true", help="also write every candidate, named by rank")
    p.add_argument(
        "--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: %(default)s)"
    )
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="compute dtype"
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
        help="the C++ attention kernel for the UNet on the CPU (faster; built on first use, needs a C++ compiler)",
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
    args = p.parse_args(argv)
    if (args.prompt is None) == (args.prompts_file is None):
        p.error("give exactly one of a prompt or --prompts-file")
    return args


def read_prompts(path: Path) -> list[tuple[str, str]]:
    """``(text, name)`` pairs from a prompts file: blank lines and ``#`` comments skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read prompts file {path}: {e}") from e
    out, names = [], set()
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        text, _, name = line.partition("|")
        text, name = text.strip(), name.strip() or f"{len(out) + 1:04d}"
        if not text:
            raise ValueError(f"{path}:{number}: empty prompt")
        if "/" in name or "\\" in name or name in (".", ".."):
            raise ValueError(f"{path}:{number}: name {name!r} must be a plain file name")
        if name in names:
            raise ValueError(f"{path}:{number}: name {name!r} is used twice")
        names.add(name)
        out.append((text, name))
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def write_wav(path: Path, audio, sample_rate: int) -> None:
    """Write a float32 WAV atomically: a temp file beside the target, then a rename."""
    import soundfile as sf

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            sf.write(f, audio, sample_rate, format="WAV", subtype="FLOAT")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    if args.prompts_file is not None:
        folder = Path(args.output or ".")
        _check_writable(folder)
        return [(text, folder / f"{name}.wav") for text, name in read_prompts(args.prompts_file)]
    if not args.prompt.strip():
        raise ValueError("the prompt is empty")
    out = Path(args.output or "audioldm2.wav")
    if out.is_dir():
        raise ValueError(f"output {out} is a folder; give a .wav file name")
    _check_writable(out.parent)
    return [(args.prompt, out)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        jobs = _check_args(args)
        import torch

        from .loading import CheckpointError
        from .pipeline import AudioLDM2
    except ValueError as e:
        print(f"audioldm2: error: {e}", file=sys.stderr)
        return 2
    try:
        if args.cpu_attention:
            from . import cpu_attention

            cpu_attention.enable()
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
        )
        for text, path in jobs:
            generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
            bar = None
            if not args.quiet:
                from tqdm import tqdm

                bar = tqdm(total=args.steps, desc=path.name, unit="step", file=sys.stderr)
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
                )
            finally:
                if bar is not None:
                    bar.close()
            write_wav(path, out.audios[0], out.sample_rate)
            if args.all_candidates and args.candidates > 1:
                for rank, audio in enumerate(out.audios, 1):
                    write_wav(path.with_name(f"{path.stem}.rank{rank}{path.suffix}"), audio, out.sample_rate)
            print(path)
    except (ValueError, TypeError, CheckpointError, OSError, RuntimeError, ImportError) as e:  # ImportError:
        # the phonemiser missing for a speech checkpoint (tokenization.PhonemizerMissingError)
        print(f"audioldm2: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("audioldm2: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
