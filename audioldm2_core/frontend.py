"""What the three front ends share: their flags (one table), the device line, one-line errors, output checks.

The front ends are ``audioldm2 PROMPT`` (``cli.py``), ``audioldm2 --prompts-file`` (``synthesis.py``) and
``audioldm2-demo`` (``demo.py``); they build on the pipeline and on this module, never on each other
(``__main__.py`` routes the ``audioldm2`` command to the first two). Each flag below names the programs it
belongs to; a flag of the other program is refused in one line, before anything loads.

Every failure a user can meet exits non-zero with one line on stderr (``error_line``: ``errors.explain``'s
line, or for anything else, a bug, its type and message and a pointer to ``--debug``) and no traceback;
``--debug`` shows it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UnavailableError, UsageError, explain
from .request import CPU_ATTENTION_ENV, DEFAULT_STRENGTH, DTYPE_NAMES, SAMPLERS, LoadOptions, lora_spec

__all__ = [
    "DEFAULT_MODEL",
    "FLAGS",
    "Layout",
    "OneLineParser",
    "parse",
    "error_line",
    "fail",
    "device_line",
    "layout_from_env",
    "rank_device",
    "rank_prefix",
    "resolve_device_and_dtype",
]

DEFAULT_MODEL = "cvssp/audioldm2"
ONE, MANY, DEMO = "audioldm2 PROMPT", "audioldm2 --prompts-file", "audioldm2-demo"
_GEN = (ONE, MANY)  # the two generation commands
_ALL = (ONE, MANY, DEMO)

# (flag names, argparse keywords, the programs it belongs to). ``dest`` is the field of request.py it sets,
# where the names differ, so that a failed check names the flag.
# fmt: off
FLAGS: list[tuple[tuple[str, ...], dict[str, Any], tuple[str, ...]]] = [
    (("prompt",), dict(nargs="?", help="text describing the sound"), (ONE,)),
    (("-o", "--output"), dict(default=None, help="WAV file to write (default: audioldm2.wav); with --prompts-file "
                              "a folder"), _GEN),
    (("--prompts-file",), dict(type=Path, help='JSON Lines items ({"id", "prompt", ...}) or \'text|name\' lines; '
                               "one WAV each, resumable (docs/synthesis.md)"), (MANY,)),
    (("--batch-size",), dict(type=int, default=1, help="items per pipeline call (same settings)"), (MANY,)),
    (("--shard",), dict(default=None, help="i/n: generate only share i of n of the items (SLURM arrays, k8s "
                        "jobs)"), (MANY,)),
    (("--merge-manifests",), dict(type=Path, metavar="DIR", help="merge DIR's per-rank manifests into "
                                  "DIR/manifest.jsonl"), (MANY,)),
    (("--model",), dict(default=DEFAULT_MODEL, help="hub repo id or local folder (default: %(default)s)"), _ALL),
    (("--revision",), dict(default=None, help="hub revision (branch, tag or commit) of --model"), _ALL),
    (("--negative",), dict(default=None, dest="negative_prompt", help="negative prompt: what the audio should not "
                           "sound like"), _GEN),
    (("--transcription",), dict(default=None, help="speech checkpoints (anhnct/audioldm2_gigaspeech, _ljspeech): "
                                "the words to speak (the prompt describes the voice); English text, phonemised "
                                'with espeak-ng (pip install ".[speech]")'), _GEN),
    (("--max-new-tokens",), dict(type=int, default=None, help="GPT-2 states to generate (default: the "
                                 "checkpoint's; 8, and 512 for the speech checkpoints)"), _GEN),
    (("--phonemes",), dict(action="store_true", dest="transcription_is_phonemes", help="--transcription is IPA "
                           'phonemes already (no espeak-ng needed), e.g. "həlˈoʊ wˈɜːld"'), _GEN),
    (("--steps",), dict(type=int, default=200, dest="num_inference_steps", help="denoising steps (default: "
                        "%(default)s)"), _GEN),
    (("--sampler",), dict(default="ddim", help=f"one of {', '.join(SAMPLERS)}: the diffusers scheduler of that "
                          "name, same seed same audio (default: %(default)s)"), _GEN),
    (("--guidance",), dict(type=float, default=3.5, dest="guidance_scale", help="classifier-free guidance scale; "
                           "1 disables it"), _GEN),
    (("--length",), dict(type=float, default=None, dest="audio_length_in_s", help="audio length in seconds "
                         "(default: the model's, 10.24; with --audio the input's: a longer input is cut, a "
                         "shorter one padded with silence)"), _GEN),
    (("--audio",), dict(type=Path, default=None, metavar="WAV", help="input audio (WAV, FLAC, OGG, MP3; any "
                        "rate, mono or stereo): alone, style transfer (SDEdit) toward the prompt; with --inpaint "
                        "or --super-resolution, regenerate those parts and keep the rest"), (ONE,)),
    (("--strength",), dict(type=float, default=None, help="with --audio: how far from the input, in (0, 1]: the "
                           "share of the steps run from the input noised to that level; 1 starts from noise "
                           f"(default: {DEFAULT_STRENGTH} for style transfer, 1 with --inpaint or "
                           "--super-resolution)"), (ONE,)),
    (("--inpaint",), dict(action="append", default=[], metavar="START-END", help="with --audio: regenerate these "
                          "seconds and keep the rest, e.g. 3.5-5.0; repeat the flag or separate with commas for "
                          "several spans (1-2,4-5)"), (ONE,)),
    (("--inpaint-band",), dict(action="append", default=[], metavar="LOW-HIGH", help="with --audio: regenerate "
                               "this frequency band in Hz, e.g. 2000-4000 (within the --inpaint spans if given, "
                               "else over the whole input); repeatable, comma-separated"), (ONE,)),
    (("--super-resolution",), dict(nargs="?", const="auto", default=None, metavar="HZ", help="with --audio: "
                                   "regenerate the missing top band of band-limited audio, above HZ (default: half "
                                   "the input file's own sample rate, e.g. 4000 for an 8 kHz recording)"), (ONE,)),
    (("--eta",), dict(type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like noise"), _GEN),
    (("--seed",), dict(type=int, default=None, help="random seed (same seed, same audio as diffusers)"), _GEN),
    (("--candidates",), dict(type=int, default=1, dest="num_waveforms_per_prompt", help="waveforms per prompt, "
                             "ranked by CLAP; best is written"), _GEN),
    (("--all-candidates",), dict(action="store_true", help="also write every candidate, named by rank"), _GEN),
    (("--device",), dict(default="auto", help="torch device: auto (CUDA, then MPS, then the CPU), cpu, cuda, "
                         "cuda:1, mps (default: %(default)s)"), _ALL),
    (("--dtype",), dict(default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="compute dtype; "
                        "auto: float16 on CUDA, bfloat16 on CPUs with native bfloat16 (AVX-512 BF16, AMX), else "
                        "float32, which gives diffusers' float32 audio to rounding (default: %(default)s)"), _ALL),
    (("--spectrogram",), dict(type=Path, default=None, metavar="PNG", help="also draw each written WAV's log-mel "
                              "spectrogram to this PNG (named like the WAVs: x.png, x.rank1.png; a folder with "
                              "--prompts-file); needs matplotlib"), _GEN),
    (("--low-memory",), dict(action=argparse.BooleanOptionalAction, default=None, help="load each component only "
                             "while it runs (default: on for one prompt, off for a prompts file and the demo)"),
     _ALL),
    (("--cpu-attention",), dict(action=argparse.BooleanOptionalAction, default=None, help="the C++ attention "
                                "kernel for the UNet's self-attentions on the CPU, where it is faster here (built "
                                "once, needs a C++ compiler; default: on where it can be built, off with "
                                f"{CPU_ATTENTION_ENV}=0)"), _ALL),
    (("--prepare",), dict(nargs="*", type=float, metavar="SECONDS", help="build the attention kernel and time this "
                          "CPU's fastest routes for these lengths (default: the model's) with this --model, "
                          "--dtype and --candidates, then exit: later runs start without that work"), (ONE,)),
    (("--compile",), dict(action="store_true", help="run the UNet under torch.compile (minutes to compile first: "
                          "for many steps or prompts, on a GPU)"), _GEN),
    (("--cuda-graphs",), dict(action="store_true", help="replay each denoising loop from a CUDA graph (CUDA "
                              "devices only)"), _GEN),
    (("--lora",), dict(default=None, metavar="PATH[:SCALE]", help="a UNet LoRA (diffusers' or PEFT's file or "
                       "folder, or an audioldm2-train run folder), merged into the weights at SCALE (default 1), "
                       "e.g. run/:0.8 (docs/fine-tuning.md)"), _ALL),
    (("--plain",), dict(action="store_true", help="the plain reference model, without the speed layer's exact "
                        "rewrites (audioldm2_core.fast)"), _GEN),
    (("--host",), dict(default="127.0.0.1", help="address to serve on; 0.0.0.0 for every interface"), (DEMO,)),
    (("--port",), dict(type=int, default=7860, help="port to serve on (default: %(default)s)"), (DEMO,)),
    (("--share",), dict(action="store_true", help="also serve through a public gradio.live link"), (DEMO,)),
    (("--quiet",), dict(action="store_true", help="no progress bar"), _GEN),
    (("--debug",), dict(action="store_true", help="on an error, show the traceback too"), _ALL),
]
# fmt: on
# request field -> the flag that sets it
FLAG_OF = {
    kw.get("dest", names[-1].lstrip("-").replace("-", "_")): names[-1]
    for names, kw, _ in FLAGS
    if names[0].startswith("-")
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, its errors in one line with exit 2 (it prints its usage first), as every other usage error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def parse(program: str, argv: list[str] | None, description: str) -> argparse.Namespace:
    """The flags of ``program`` (ONE, MANY or DEMO). A generation command refuses the other one's flags."""
    prog = "audioldm2-demo" if program == DEMO else "audioldm2"
    p = OneLineParser(prog=prog, description=description, allow_abbrev=False)
    for names, kwargs, programs in FLAGS:
        if program in programs:
            p.add_argument(*names, **kwargs)
        elif program != DEMO and set(programs) & set(_GEN) and names[0].startswith("-"):
            p.add_argument(*names, **(kwargs | dict(dest=f"other:{names[-1]}", default=argparse.SUPPRESS)))
    args = p.parse_args(argv)
    other = [k.removeprefix("other:") for k in vars(args) if k.startswith("other:")]
    if other:
        where = (
            "with one prompt only (audioldm2 PROMPT ...)" if program == MANY else "with --prompts-file only"
        )
        p.error(
            f"{', '.join(other)}: {where}, not with {'--prompts-file' if program == MANY else 'a prompt'}"
        )
    return args


def flagged(error: BaseException, flags: dict[str, str] = FLAG_OF) -> BaseException:
    """A failed check, named by the flag that set its field (``flags``: the program's field -> flag table):
    ``--steps: num_inference_steps ...``."""
    if isinstance(error, UsageError) and error.field in flags:
        return type(error)(f"{flags[error.field]}: {error}", field=error.field)
    return error


def load_options(args: argparse.Namespace, device: str, dtype: str, low_memory: bool) -> LoadOptions:
    """The pipeline's load options from the flags (device and dtype resolved). The attention kernel: the flag's
    choice, else ``AUDIOLDM2_CPU_ATTENTION``'s, else on for a CPU run it is written for (``speed_lines`` builds
    it, or says in one line why PyTorch's attention runs instead)."""
    from .fast import cpu_attention

    fast = not getattr(args, "plain", False)
    kernel = args.cpu_attention
    if kernel is None and os.environ.get(CPU_ATTENTION_ENV) is None and device.startswith("cpu") and fast:
        kernel = cpu_attention.supported()
    return LoadOptions(args.model, args.revision, device, dtype, low_memory, getattr(args, "compile", False),
                       getattr(args, "cuda_graphs", False), fast, kernel, getattr(args, "lora", None))  # fmt: skip


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
                raise UsageError(f"{flag} {part.strip()!r}: give START-END in {unit}, e.g. 3.5-5.0") from None
    return out


def check_writable(folder: Path) -> None:
    """A folder that exists and takes a new file."""
    if not folder.is_dir():
        raise UsageError(f"output folder {folder} does not exist")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise UsageError(f"cannot write to {folder}: {e.strerror or e}") from e


def save_spectrogram(path: Path, audio, sample_rate: int, title: str) -> None:
    """A written WAV's picture (``spectrogram.py``), its title cut to a line."""
    from .spectrogram import save_spectrogram as save

    save(path, audio, sample_rate, title=title if len(title) <= 80 else title[:77] + "...")


def resolve_device_and_dtype(device: str, dtype: str) -> tuple[str, str]:
    """``--device auto``: CUDA, then MPS, then the CPU; ``--dtype auto``: float16 on CUDA, bfloat16 on a CPU with
    native bfloat16 arithmetic (``fast.native_bfloat16``), else float32. A device this machine does not have is
    refused."""
    from .pipeline import check_device, resolve_device

    resolved = resolve_device(device)
    check_device(resolved)
    if dtype == "auto":
        from .fast import native_bfloat16

        cpu_bf16 = resolved.type == "cpu" and native_bfloat16()
        dtype = "float16" if resolved.type == "cuda" else "bfloat16" if cpu_bf16 else "float32"
    return str(resolved), dtype


# ------------------------------------------------------------ where this process sits (torchrun, --shard)


@dataclass(frozen=True)
class Layout:
    """Where this process sits: global rank of world, and its local rank (its GPU) on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    torchrun: bool = False


def rank_prefix(layout: Layout | None) -> str:
    """What starts a process's error line when several run: ``rank 1: ``; nothing alone."""
    return f"rank {layout.rank}: " if layout is not None and layout.world > 1 else ""


def _env_int(env: dict[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise UsageError(f"environment variable {name}={env[name]!r} is not an integer") from None


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n), 0 <= i < n."""
    i, sep, n = text.partition("/")
    try:
        i, n = int(i), int(n)
    except ValueError:
        i = n = -1
    if not sep or n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard must be i/n with 0 <= i < n (e.g. 0/4), got {text!r}")
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
        raise UsageError(f"RANK={rank} and WORLD_SIZE={world} from the environment are inconsistent")
    return Layout(rank=i * world + rank, world=n * world, local_rank=local, torchrun=True)


def rank_device(device: str | None, layout: Layout) -> str:
    """``auto`` as the single-prompt CLI resolves it (CUDA, MPS, CPU); ``cuda`` with no index under torchrun
    -> ``cuda:LOCAL_RANK``; anything else as asked."""
    if device in (None, "auto"):
        from .pipeline import resolve_device

        device = str(resolve_device(device))
    if device == "cuda" and layout.torchrun:
        return f"cuda:{layout.local_rank}"
    return device


def device_line(options: LoadOptions, asked: str = "") -> str:
    """The one line printed at start: where and in what precision the model runs, with the attention kernel
    where it is chosen (``asked``: the --dtype flag; where ``auto`` picked a reduced precision, how to get the
    exact route)."""
    import torch

    from .fast import cpu_attention

    where, dtype = torch.device(options.device), options.dtype
    if asked == "auto" and dtype != "float32":
        why = "native bfloat16 on this CPU" if where.type == "cpu" else "a GPU"
        dtype += f" (auto: {why}; --dtype float32 gives diffusers' float32 audio to rounding)"
    if where.type == "cuda":
        return f"{options.device} ({torch.cuda.get_device_name(where)}), {dtype}"
    if where.type == "cpu":
        kernel = (
            ", the C++ attention kernel"
            if options.fast and cpu_attention.chosen(options.cpu_attention)
            else ""
        )
        return f"cpu, {dtype}{kernel}, {torch.get_num_threads()} threads (no CUDA or MPS device found)"
    return f"{options.device}, {dtype}"


def speed_lines(prog: str, options: LoadOptions, quiet: bool) -> LoadOptions:
    """The speed layer's one-time work on a new machine, said in one line (timing its routes, building the
    attention kernel), and the options with the kernel built where they choose it; where it cannot be built (no
    compiler, a failed build), one line says so and the options run PyTorch's attention: never an error."""
    import dataclasses

    import torch

    from .fast import cpu_attention, timed_here

    if not str(options.device).startswith("cpu") or not options.fast:
        return options
    kernel = cpu_attention.chosen(options.cpu_attention)
    new = not timed_here(getattr(torch, DTYPE_NAMES[options.dtype]))
    building = kernel and cpu_attention.supported() and not cpu_attention.library().is_file()
    if (new or building) and not quiet:
        work = ["timing this CPU's fastest routes, once: ~10 s" if new else "", "building the attention kernel, once:"
                " ~15 s" if building else ""]  # fmt: skip
        print(
            f"{prog}: {'; '.join(w for w in work if w)} (audioldm2 --prepare does it ahead)", file=sys.stderr
        )
    if not kernel:
        return options
    try:
        cpu_attention.build()
        return dataclasses.replace(options, cpu_attention=True)
    except UnavailableError as e:  # no compiler, a failed build, a CPU it is not written for: PyTorch's runs
        print(f"{prog}: {str(e).split(cpu_attention.WITHOUT)[0]}; PyTorch's attention runs", file=sys.stderr)
        return dataclasses.replace(options, cpu_attention=False)


def error_line(error: BaseException) -> str:
    """The one line shown for an error: ``errors.explain``'s, or for anything else (a bug) its type and
    message with a pointer to ``--debug``."""
    line = explain(error)
    if line is None:
        first = (str(error).strip().splitlines() or [""])[0]
        line = f"{type(error).__name__}: {first} (unexpected; --debug shows the traceback)"
    return line


def fail(
    prog: str, error: BaseException, debug: bool, code: int, who: str = "", flags: dict[str, str] = FLAG_OF
) -> int:
    """Print ``error``'s one line (its traceback first with ``--debug``; a failed check named by its flag in
    ``flags``) and return the exit code: ``code`` for an error of ours (2 where the front end is checking what
    it was asked), 1 for a bug wherever it is met."""
    if debug:
        traceback.print_exception(error)
    print(f"{prog}: error: {who}{error_line(flagged(error, flags))}", file=sys.stderr)
    return code if explain(error) is not None else 1


class _HubRetries(logging.Filter):
    """huggingface_hub logs two warnings per retry of an unreachable hub (five retries over ~23 s): say once
    that it is retrying, drop the rest; other records pass."""

    def __init__(self, prog: str):
        super().__init__()
        self.prog, self.said = prog, False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "thrown while requesting" not in message and not message.startswith("Retrying in"):
            return True
        if not self.said:
            self.said = True
            print(
                f"{self.prog}: cannot reach the Hugging Face hub; retrying for up to ~25 s", file=sys.stderr
            )
        return False


@contextlib.contextmanager
def quiet_hub_retries(prog: str):
    """While loading: the hub's retry warnings become one line (``_HubRetries``)."""
    loggers = [logging.getLogger(n) for n in ("huggingface_hub.utils._http", "huggingface_hub.hf_api")]
    quiet = _HubRetries(prog)
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


def load_pipeline(prog: str, options: LoadOptions):
    """``AudioLDM2.from_pretrained`` with the options (and their LoRA), the hub's retries in one line."""
    from .pipeline import AudioLDM2

    with quiet_hub_retries(prog):
        pipe = AudioLDM2.from_pretrained(
            options.model, revision=options.revision, device=options.device, dtype=options.dtype,
            low_memory=options.low_memory, compile=options.compile, cuda_graphs=options.cuda_graphs,
            fast=options.fast, cpu_attention=options.cpu_attention,
        )  # fmt: skip
    if options.lora is not None:
        pipe.load_lora(*lora_spec(options.lora))
    return pipe
