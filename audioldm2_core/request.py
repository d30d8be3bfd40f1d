"""What a request may be: the settings of a generation, an audio edit and a load, with their limits and checks.

The pipeline (``AudioLDM2.__call__``), the command line, dataset synthesis and the demo all build these frozen
objects and call their ``check()``; none re-declares a limit or a check. A failed check raises
``errors.UsageError`` (a ValueError; ``UsageTypeError`` for a wrong type, also a TypeError) whose message names
the argument as the Python API spells it and carries ``field``, so that a front end can say which flag or line
of a file gave it. No torch here: the command line checks its flags before it imports a model.

Checks that need the model (the shortest length its VAE and vocoder can make, the step counts a sampler
accepts, whether the input audio fits) are made where the model is known, with these limits.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import UsageError, UsageTypeError

__all__ = [
    "SAMPLERS",
    "MAX_AUDIO_LENGTH_S",
    "DEFAULT_STRENGTH",
    "DTYPES",
    "AudioEdit",
    "GenerationRequest",
    "LoadOptions",
    "lora_spec",
]

MAX_AUDIO_LENGTH_S = 600.0  # a bound on the request, not on the model: 10 minutes of audio in one latent
DEFAULT_STEPS = 200  # diffusers' default
DEFAULT_GUIDANCE = 3.5  # diffusers' default
DEFAULT_STRENGTH = (
    0.6  # style transfer's: enough steps to follow the prompt, few enough to keep the input's form
)
OUTPUT_TYPES = ("np", "pt", "latent")
DTYPES = ("float32", "bfloat16", "float16")  # and their short names: DTYPE_NAMES
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16"} | {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}

# The samplers by name (``samplers.py`` runs them; docs/samplers.md names diffusers' scheduler for each).
SAMPLERS: dict[str, str] = {
    "ddim": "DDIM (Song et al. 2021); eta=0 deterministic, eta=1 DDPM-like; the AudioLDM 2 default",
    "dpmpp-2m": "DPM-Solver++(2M) (Lu et al. 2022), multistep second order",
    "dpmpp-2m-karras": "DPM-Solver++(2M) on the Karras et al. 2022 sigma spacing (rho=7)",
    "dpmpp-2m-sde": "DPM-Solver++(2M) SDE (Lu et al. 2022), stochastic",
    "dpmpp-2m-sde-karras": "DPM-Solver++(2M) SDE on Karras sigmas",
    "unipc": "UniPC (Zhao et al. 2023), bh2 predictor-corrector, order 2",
    "deis": "DEIS (Zhang & Chen 2022), exponential integrator, order 2",
    "dpmpp-2s": "DPM-Solver++(2S) (Lu et al. 2022), singlestep second order",
    "euler": "Euler (Karras et al. 2022)",
    "euler-a": "Euler ancestral (k-diffusion), stochastic",
    "heun": "Heun (Karras et al. 2022), two UNet calls per step",
    "kdpm2": "DPM-Solver-2 (Karras et al. 2022 / k-diffusion), two UNet calls per step",
    "kdpm2-a": "DPM-Solver-2 ancestral (k-diffusion), two UNet calls per step, stochastic",
    "lms": "linear multistep, order 4 (k-diffusion)",
    "pndm": "PNDM (Liu et al. 2022), Runge-Kutta warm-up then PLMS",
    "ddpm": "DDPM (Ho et al. 2020) ancestral sampling, stochastic",
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fail(name: str, message: str, type_error: bool = False) -> None:
    raise (UsageTypeError if type_error else UsageError)(f"{name} {message}", field=name)


def check_length(seconds: Any, min_s: float = 0.0, name: str = "audio_length_in_s") -> None:
    """A length in seconds: a finite number above ``min_s`` (the model's shortest, where known; else > 0) and
    at most ``MAX_AUDIO_LENGTH_S``."""
    if not _is_number(seconds):
        _fail(name, f"must be a number of seconds, got {seconds!r}", type_error=True)
    if not math.isfinite(seconds) or seconds < min_s or seconds <= 0:
        limits = f"be at least {min_s} s" if min_s else f"be in (0, {MAX_AUDIO_LENGTH_S}] s"
        _fail(name, f"must {limits}, got {seconds}")
    if seconds > MAX_AUDIO_LENGTH_S:
        _fail(name, f"must be at most {MAX_AUDIO_LENGTH_S} s, got {seconds}")


def check_sampler_name(sampler: Any) -> None:
    """A name in ``SAMPLERS``, or a function of the samplers' signature."""
    if not (callable(sampler) or (isinstance(sampler, str) and sampler in SAMPLERS)):
        raise UsageError(
            f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}, or pass a function",
            field="sampler",
        )


@dataclass(frozen=True)
class AudioEdit:
    """Audio in, audio out (``editing.py``): the input and how to edit it.

    Alone it is style transfer (SDEdit); ``spans_s`` (seconds) and ``bands_hz`` (Hz; within the spans when both
    are given) regenerate those parts and keep the rest; ``super_resolution`` regenerates above ``cutoff_hz``
    (default: half the input's own sample rate)."""

    audio: Any  # a file path, or a waveform (numpy or torch; (samples,) or (channels, samples))
    sample_rate: int | None = None  # a waveform's rate (a file's is read from it)
    strength: float | None = None  # (0, 1]; None: DEFAULT_STRENGTH for style transfer, 1 with a mask
    spans_s: tuple[tuple[float, float], ...] = ()
    bands_hz: tuple[tuple[float, float], ...] = ()
    super_resolution: bool = False
    cutoff_hz: float | None = None

    @classmethod
    def from_arguments(cls, audio=None, audio_sample_rate=None, strength=None, inpaint_spans_s=None,
                       inpaint_bands_hz=None, super_resolution=False, cutoff_hz=None) -> AudioEdit | None:  # fmt: skip
        """The pipeline's audio-in arguments (diffusers' img2img / inpainting names) as an edit; None without
        ``audio`` (then the others are an error)."""
        if audio is None:
            given = dict(audio_sample_rate=audio_sample_rate, strength=strength, inpaint_spans_s=inpaint_spans_s,
                         inpaint_bands_hz=inpaint_bands_hz, super_resolution=super_resolution, cutoff_hz=cutoff_hz)  # fmt: skip
            extra = [k for k, v in given.items() if v not in (None, False)]
            if extra:
                raise UsageError(f"{', '.join(extra)}: only with input audio (pass audio=)", field=extra[0])
            return None
        spans, bands = (tuple(map(tuple, v or ())) for v in (inpaint_spans_s, inpaint_bands_hz))
        return cls(audio, audio_sample_rate, strength, spans, bands, bool(super_resolution), cutoff_hz)

    @property
    def masked(self) -> bool:
        """Whether parts of the input are kept (inpainting, super-resolution), not all of it redrawn."""
        return bool(self.spans_s or self.bands_hz or self.super_resolution)

    @property
    def resolved_strength(self) -> float:
        if self.strength is not None:
            return self.strength
        return 1.0 if self.masked else DEFAULT_STRENGTH

    def start_index(self, steps: int) -> int:
        """The first step to run: diffusers img2img's ``get_timesteps`` (strength 1: step 0, almost pure
        noise; 0.5: the second half of the steps). A strength that leaves no step is an error."""
        strength = self.resolved_strength
        if not _is_number(strength) or not 0 < strength <= 1:
            _fail("strength", f"must be a number in (0, 1] (1: from noise), got {strength!r}")
        init = min(int(steps * strength), steps)
        if init == 0:
            raise UsageError(
                f"strength {strength} with {steps} steps runs no step (int({steps} * {strength}) = 0): "
                "nothing would change the input; raise the strength or the steps",
                field="strength",
            )
        return steps - init

    def check(self, steps: int) -> None:
        """What can be checked before the input is read (the file, its rate and length are checked then)."""
        if self.audio is None or (isinstance(self.audio, str) and not self.audio):
            raise UsageError(
                "give the input audio (a file path, or a waveform with its sample rate)", field="audio"
            )
        self.start_index(steps)
        if self.cutoff_hz is not None and not self.super_resolution:
            _fail("cutoff_hz", "is the super-resolution cutoff: pass super_resolution=True with it")
        for name, pairs in (("inpaint_spans_s", self.spans_s), ("inpaint_bands_hz", self.bands_hz)):
            if not all(len(p) == 2 and all(_is_number(v) for v in p) for p in pairs):
                _fail(name, f"must be (start, end) pairs of numbers, got {pairs!r}", type_error=True)


@dataclass(frozen=True)
class GenerationRequest:
    """One call's settings, named as diffusers' ``AudioLDM2Pipeline.__call__`` names them (tensors, generators
    and callbacks are passed beside it)."""

    prompt: str | Sequence[str] | None = None
    audio_length_in_s: float | None = None  # None: the model's own (10.24 s), or the input audio's
    num_inference_steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE  # <= 1: no classifier-free guidance
    negative_prompt: str | Sequence[str] | None = None
    num_waveforms_per_prompt: int = 1
    eta: float = 0.0  # DDIM's
    output_type: str = "np"
    sampler: str | Callable = "ddim"
    callback_steps: int = 1
    rerank: bool | None = None  # None: when there are several candidates and a prompt
    max_new_tokens: int | None = None  # GPT-2 states; None: the checkpoint's
    transcription: str | Sequence[str] | None = None  # speech checkpoints: the words to say
    transcription_is_phonemes: bool = False
    edit: AudioEdit | None = None
    precomputed: bool = False  # the conditions come as tensors (prompt_embeds and generated_prompt_embeds)
    # The front ends' extras: the text must be given and not blank (the API also takes precomputed embeddings)
    text_required: bool = field(default=False, compare=False)

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    def arguments(self) -> dict[str, Any]:
        """The pipeline call's keywords for this request: ``pipe(**request.arguments(), generator=g)``."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("precomputed", "text_required")
        }

    @property
    def reranked(self) -> bool:
        if self.rerank is None:
            return self.num_waveforms_per_prompt > 1 and self.prompt is not None
        return bool(self.rerank)

    def check(self, min_length_s: float = 0.0) -> None:
        """Raise the clear error of the first setting that cannot run (``min_length_s``: the model's shortest
        length, where known)."""
        if self.text_required and (not isinstance(self.prompt, str) or not self.prompt.strip()):
            raise UsageError("the prompt is empty", field="prompt")
        if self.audio_length_in_s is not None:
            check_length(self.audio_length_in_s, min_length_s)
        steps = self.num_inference_steps
        if not _is_int(steps):
            _fail("num_inference_steps", f"must be an int, got {steps!r}", type_error=True)
        if steps < 1:
            _fail("num_inference_steps", f"must be at least 1, got {steps}")
        g = self.guidance_scale
        if not _is_number(g) or not math.isfinite(g):
            _fail("guidance_scale", f"must be a finite number, got {g!r}")
        if g < 0:
            _fail("guidance_scale", f"must be >= 0 (1 disables guidance), got {g}")
        for name in ("num_waveforms_per_prompt", "callback_steps"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                _fail(name, f"must be a positive int, got {value!r}")
        if self.max_new_tokens is not None and (not _is_int(self.max_new_tokens) or self.max_new_tokens < 1):
            _fail("max_new_tokens", f"must be a positive int, got {self.max_new_tokens!r}")
        if not _is_number(self.eta) or not 0 <= self.eta <= 1:
            _fail("eta", f"must be a number in [0, 1] (0: DDIM, 1: DDPM-like), got {self.eta!r}")
        if self.output_type not in OUTPUT_TYPES:
            _fail("output_type", f"must be 'np', 'pt' or 'latent', got {self.output_type!r}")
        check_sampler_name(self.sampler)
        if self.transcription_is_phonemes and self.transcription is None:
            _fail(
                "transcription_is_phonemes", "says how to read the transcription: give the transcription too"
            )
        if self.prompt is None and not self.precomputed:
            _fail("prompt", "is missing: give a prompt, or both prompt_embeds and generated_prompt_embeds")
        if self.rerank and self.prompt is None:
            raise UsageError(
                "re-ranking needs the prompt text; pass rerank=False with precomputed embeddings",
                field="rerank",
            )
        if self.edit is not None:
            self.edit.check(steps)


def lora_spec(spec: str) -> tuple[str, float]:
    """``"PATH[:SCALE]"`` -> (PATH, SCALE); the scale defaults to 1 (a colon not followed by a number is part of
    the path)."""
    path, sep, scale = spec.rpartition(":")
    if sep:
        try:
            value = float(scale)
        except ValueError:
            return spec, 1.0
        if not math.isfinite(value):
            _fail("lora", f"scale must be a finite number, got {scale!r}")
        return path, value
    return spec, 1.0


CPU_ATTENTION_ENV = "AUDIOLDM2_CPU_ATTENTION"  # 1 / 0: the C++ attention kernel, where no one chose


@dataclass(frozen=True)
class LoadOptions:
    """How to load a checkpoint (``AudioLDM2.from_pretrained``'s keywords)."""

    model: str = "cvssp/audioldm2"  # a hub repo id or a local pipeline folder
    revision: str | None = None
    device: str | None = None  # None / "auto": CUDA, then MPS, then the CPU
    dtype: str = "float32"  # a name of DTYPE_NAMES ("auto" is the front ends', resolved before loading)
    low_memory: bool = False  # each component loaded for its stage only
    compile: bool | dict = False  # torch.compile of the UNet (a dict: its options)
    cuda_graphs: bool = False
    fast: bool = True  # the speed layer's exact rewrites
    cpu_attention: bool | None = None  # the C++ attention kernel; None: as AUDIOLDM2_CPU_ATTENTION says
    lora: str | None = None  # "PATH[:SCALE]": a UNet LoRA applied after loading (``AudioLDM2.load_lora``)

    def check(self) -> None:
        if self.dtype not in DTYPE_NAMES:
            _fail("dtype", f"is unknown: {self.dtype!r}; choose one of {sorted(DTYPE_NAMES)}")
        if not isinstance(self.compile, (bool, dict)):
            _fail("compile", f"must be a bool or a dict of torch.compile options, not {self.compile!r}", True)
        if self.cuda_graphs and self.device is not None and not str(self.device).startswith("cuda"):
            _fail("cuda_graphs", f"needs a CUDA device, not {self.device}")
        if self.dtype in ("float16", "fp16") and str(self.device).startswith("cpu"):
            _fail("dtype", "float16 is not supported on the CPU; use bfloat16 or float32")
        if self.lora is not None:
            path, _ = lora_spec(self.lora)
            if not os.path.exists(path):
                _fail("lora", f"{path}: no such file or folder")
