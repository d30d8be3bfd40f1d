"""``audioldm2 "a dog barking in the rain" -o dog.wav``: one prompt to one WAV (with ``--candidates``, the best).

Audio in: ``--audio in.wav`` edits an input (style transfer with ``--strength``; ``--inpaint 3.5-5.0``, several
spans by repeating the flag or with commas; ``--inpaint-band LOW-HIGH`` in Hz; ``--super-resolution [HZ]``;
docs/editing.md). Everything that can be checked (the flags, the request, the input audio, the output paths)
is checked before the model loads, and the model loads before the progress bar starts, so a bad input or an
unusable checkpoint fails at once in one line (``frontend.fail``). WAVs and PNGs are written atomically.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import UsageError
from .frontend import (
    ONE,
    check_writable,
    device_line,
    fail,
    load_options,
    load_pipeline,
    parse,
    parse_ranges,
    resolve_device_and_dtype,
    save_spectrogram,
    speed_lines,
)
from .outputs import write_wav
from .request import MAX_AUDIO_LENGTH_S, AudioEdit, GenerationRequest

DESCRIPTION = (
    "Generate audio from text with AudioLDM 2 (official checkpoints, same output as diffusers); with --audio, "
    "edit an input: style transfer, inpainting (--inpaint), super-resolution. Many prompts: --prompts-file."
)


def edit_from(args: argparse.Namespace) -> AudioEdit | None:
    """The audio edit the flags ask for (None without ``--audio``)."""
    flags = {"--strength": args.strength is not None, "--inpaint": args.inpaint,
             "--inpaint-band": args.inpaint_band, "--super-resolution": args.super_resolution is not None}  # fmt: skip
    used = [flag for flag, given in flags.items() if given]
    if args.audio is None:
        if used:
            raise UsageError(f"{', '.join(used)}: only with an input, --audio WAV")
        return None
    cutoff = None
    if args.super_resolution not in (None, "auto"):
        try:
            cutoff = float(args.super_resolution)
        except ValueError:
            raise UsageError(f"--super-resolution {args.super_resolution!r}: give a cutoff in Hz, e.g. 4000, "
                             "or nothing") from None  # fmt: skip
    spans = tuple(parse_ranges(args.inpaint, "--inpaint", "seconds"))
    bands = tuple(parse_ranges(args.inpaint_band, "--inpaint-band", "Hz"))
    return AudioEdit(args.audio, None, args.strength, spans, bands, args.super_resolution is not None, cutoff)


def request_from(args: argparse.Namespace) -> GenerationRequest:
    """The generation the flags ask for."""
    return GenerationRequest(
        args.prompt, args.audio_length_in_s, args.num_inference_steps, args.guidance_scale, args.negative_prompt,
        args.num_waveforms_per_prompt, args.eta, "np", args.sampler, max_new_tokens=args.max_new_tokens,
        transcription=args.transcription, transcription_is_phonemes=args.transcription_is_phonemes,
        edit=edit_from(args), text_required=True,
    )  # fmt: skip


def outputs(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """The WAV to write and its spectrogram PNG (or None), checked writable (and matplotlib there)."""
    wav = Path(args.output or "audioldm2.wav")
    if wav.is_dir():
        raise UsageError(f"output {wav} is a folder; give a .wav file name")
    check_writable(wav.parent)
    picture = args.spectrogram
    if picture is not None:
        from .spectrogram import require_matplotlib

        require_matplotlib()
        if picture.is_dir():
            raise UsageError(f"--spectrogram {picture} is a folder; give a .png file name")
        check_writable(picture.parent)
    return wav, picture


def checked(args: argparse.Namespace):
    """Everything checked before a model loads: (request, load options, WAV path, PNG path or None)."""
    if args.prompt is None:
        raise UsageError("give exactly one of a prompt or --prompts-file (or --prepare)")
    device, dtype = resolve_device_and_dtype(args.device, args.dtype)
    request = request_from(args)
    request.check()
    if args.seed is not None and not -(2**63) <= args.seed < 2**64:  # what torch.Generator.manual_seed takes
        raise UsageError(f"--seed {args.seed} is out of range: a seed is an integer in [-2**63, 2**64)")
    if request.edit is not None:  # read once, so that a bad file fails now
        from .audio import load_audio

        load_audio(args.audio, max_seconds=MAX_AUDIO_LENGTH_S)
    options = load_options(args, device, dtype, low_memory=args.low_memory is not False)
    options.check()
    return request, options, *outputs(args)


def run(pipe, request: GenerationRequest, seed: int | None, quiet: bool, name: str):
    """One generation, with a progress bar over the steps that run."""
    import torch
    from tqdm import tqdm

    steps = request.num_inference_steps
    runs = steps - (request.edit.start_index(steps) if request.edit is not None else 0)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    with tqdm(total=runs, desc=name, unit="step", file=sys.stderr, disable=quiet) as bar:
        return pipe(**request.arguments(), generator=generator, callback=lambda i, t, x: bar.update(1))


def write(out, wav: Path, picture: Path | None, prompt: str, all_candidates: bool) -> None:
    """The best waveform (and with ``all_candidates`` each, named by rank), and their pictures."""
    named = [(wav, picture, out.audios[0], prompt)]
    if all_candidates and len(out.audios) > 1:
        for rank, audio in enumerate(out.audios, 1):
            png = picture.with_name(f"{picture.stem}.rank{rank}{picture.suffix}") if picture else None
            named.append(
                (wav.with_name(f"{wav.stem}.rank{rank}{wav.suffix}"), png, audio, f"{prompt} (#{rank})")
            )
    for path, png, audio, title in named:
        write_wav(path, audio, out.sample_rate)
        if png is not None:
            save_spectrogram(png, audio, out.sample_rate, title)


def prepare(args: argparse.Namespace) -> int:
    """``--prepare [SECONDS ...]``: the speed layer's one-time work ahead of time (the kernel built, the
    decisions timed for these lengths, as ``--dtype`` and ``--candidates`` will run them): one step of each."""
    try:
        device, dtype = resolve_device_and_dtype(args.device, args.dtype)
        lengths = [GenerationRequest("-", seconds).check() or seconds for seconds in args.prepare] or [None]
        options = load_options(args, device, dtype, low_memory=False)
        options.check()
    except Exception as e:
        return fail("audioldm2", e, args.debug, 2)
    print(f"audioldm2: {device_line(options, args.dtype)}", file=sys.stderr)
    try:
        start = time.perf_counter()
        pipe = load_pipeline("audioldm2", speed_lines("audioldm2", options, quiet=False))
        for seconds in lengths:
            pipe("prepare", seconds, 1, sampler="dpmpp-2m", num_waveforms_per_prompt=args.num_waveforms_per_prompt,
                 rerank=False, output_type="pt")  # fmt: skip
            print(f"audioldm2: prepared {seconds or pipe.default_length} s", file=sys.stderr)
    except Exception as e:
        return fail("audioldm2", e, args.debug, 1)
    print(
        f"audioldm2: done in {time.perf_counter() - start:.0f} s: later runs start without timing or building"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse(ONE, argv, DESCRIPTION)
    if args.prepare is not None:
        return prepare(args)
    try:
        request, options, wav, picture = checked(args)
    except Exception as e:
        return fail("audioldm2", e, args.debug, 2)
    if not args.quiet:
        print(f"audioldm2: {device_line(options, args.dtype)}", file=sys.stderr)
    try:
        # loaded before the progress bar starts: a load failure is the line after the device line
        pipe = load_pipeline("audioldm2", speed_lines("audioldm2", options, args.quiet))
        out = run(pipe, request, args.seed, args.quiet, wav.name)
        write(out, wav, picture, args.prompt, args.all_candidates)
        print(wav)
    except KeyboardInterrupt:
        print("audioldm2: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        return fail("audioldm2", e, args.debug, 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
