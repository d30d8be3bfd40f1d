"""The AudioLDM 2 pipeline: text -> audio, as a few functions plus a thin object for users.

    prompt --encode_prompt--> T5 states (B, L, 1024) + mask, GPT-2 states (B, 8, 768)
           --denoise-------> latents (B, 8, T/4, 16)        [UNet + classifier-free guidance + a sampler]
           --decode--------> mel (B, 1, T, 64) -> waveform (B, 160 T) -> trimmed to the asked length
    audio  --encode_audio--> latents (1, 8, T/4, 16)         [audio in: audio.log_mel + the VAE's encoder]
           --denoise from step ``start`` (``audio=``, ``strength=``), masked for inpainting (editing.py)

``AudioLDM2.from_pretrained(...)`` loads the components strictly from an official checkpoint (a folder or a
hub repo id); calling it mirrors ``diffusers.AudioLDM2Pipeline.__call__`` argument by argument where the
concept is the same, and, for the same seed, gives the same audio as diffusers to float32 rounding: random
draws (initial latents, DDIM's eta noise) follow diffusers' order and shapes.

Residency: by default every component stays loaded. With ``low_memory=True`` each component is loaded
for the stage that uses it and released afterwards (text encoders, then the UNet, then VAE and vocoder),
which bounds peak memory by the largest stage instead of the sum: the right mode for one-shot CLI runs.

On a GPU: ``dtype=torch.float16`` (the VAE and the vocoder then run in float32, where float16 overflows) or
``torch.bfloat16``; attention is PyTorch's SDPA, which picks its fused CUDA kernels. Two options for the
denoising loop, both off by default: ``compile=True`` runs the UNet under ``torch.compile`` (any device; minutes
of compilation at the first call, so worth it for many steps or many generations; a dict gives
``torch.compile``'s options, e.g. ``{"mode": "max-autotune"}``), and ``cuda_graphs=True``
(CUDA only) records the guided UNet call of the first step in a CUDA graph and replays it for the others, which
removes the per-kernel launch cost of the many small kernels of a UNet call (see ``fast.CudaGraphDenoiser``).

Speed: with ``fast=True`` (the default) every component goes through ``fast.optimize`` after loading, which
switches its modules to exact faster rewrites where this CPU supports them and they pay (``fast/``);
``fast=False`` keeps the plain reference model. Either way the components are public attributes with diffusers'
names (``pipe.unet``, ``pipe.vae``, ...), which a user may read, modify, hook or replace; the stages
(``encode_prompt``, ``denoise``, ``decode``) work under autograd, and only ``__call__`` runs in inference mode.

Speech (``anhnct/audioldm2_gigaspeech``, ``_ljspeech``): ``text_encoder_2`` is the VITS phoneme encoder and
``tokenizer_2`` the phoneme tokenizer; ``pipe(prompt, transcription="words to say")`` (the prompt describes the
voice), see ``conditioning.py``. diffusers takes ``transcription`` as its second positional argument; here it
is a keyword (after ``max_new_tokens``), so that positional calls written for this class keep their meaning.

Left out on purpose: ``return_dict`` / tuple outputs, ``callback_on_step_end`` tensor plumbing, model offload
hooks.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import audio as audio_front_end
from . import conditioning, editing
from . import fast as fast_layer
from .audio import clap_features, resample
from .clap_audio import load_clap_audio
from .clap_text import load_clap_text
from .config import feature_extractor_config, scheduler_config, unet_config, vae_config, vocoder_config
from .gpt2 import load_gpt2
from .loading import Checkpoint, open_checkpoint
from .noise import randn
from .projection import load_projection
from .rerank import rank_within_prompts, score
from .samplers import SamplerFn, add_noise, check_sampler, init_noise_sigma, sample, schedule
from .t5 import load_t5
from .tokenization import load_tokenizer
from .unet import load_unet
from .vae import load_vae, load_vae_encoder
from .vits import load_vits
from .vocoder import load_vocoder

logger = logging.getLogger("audioldm2_core")

__all__ = ["AudioLDM2", "AudioOutput", "audio_shape", "resolve_device"]

MAX_AUDIO_LENGTH_S = 600.0  # a bound on the request, not on the model: 10 minutes of audio in one latent
DEFAULT_STRENGTH = (
    0.6  # style transfer's: enough steps to follow the prompt, few enough to keep the input's form
)


@dataclass(frozen=True)
class _Source:
    """The input audio of an editing call, read and fitted to the output's length."""

    wave: Tensor  # (T,) float32 16 kHz mono, at most ``keep`` samples
    frames: int  # mel frames to encode and generate, a multiple of the VAE's scale
    keep: int  # output samples
    rate: int  # the input's own sample rate (super-resolution's default cutoff is half of it)


@dataclass
class AudioOutput:
    """What a generation returns: ``audios`` as diffusers names it, plus the sample rate."""

    audios: Any  # np.ndarray or Tensor (batch * waveforms, samples) float32, or latents for "latent"
    sample_rate: int
    scores: Tensor | None = None  # CLAP re-ranking scores (batch, waveforms), best first, when re-ranked


def audio_shape(
    audio_length_in_s: float, upsample_factor: float, vae_scale: int, sample_rate: int
) -> tuple[int, int]:
    """Mel frames to generate (a multiple of the VAE scale) and waveform samples to keep, as diffusers."""
    height = int(audio_length_in_s / upsample_factor)
    keep = int(audio_length_in_s * sample_rate)
    if height % vae_scale != 0:
        height = int(np.ceil(height / vae_scale)) * vae_scale
        logger.info(
            "Audio length %ss is increased to %ss for the model; it is cut back after generation.",
            audio_length_in_s,
            height * upsample_factor,
        )
    return height, keep


def _libc() -> ctypes.CDLL | None:
    """This process's C library (its global symbols: POSIX's ``dlopen(NULL)``), or None where there is none
    to open by no name: on Windows ``ctypes.CDLL(None)`` raises ``TypeError``, and the heap is left as it is."""
    try:
        return ctypes.CDLL(None)
    except (OSError, TypeError):
        return None


class _MallInfo2(ctypes.Structure):  # glibc >= 2.33's struct mallinfo2, fields in its order
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")
    ]  # fmt: skip


def _heap_state() -> tuple[int, int, int] | None:
    """(RSS, the process's peak RSS so far, the heap glibc holds free), bytes; None where unknown (not Linux
    with glibc >= 2.33)."""
    libc = _libc()
    if libc is None:
        return None
    try:
        libc.mallinfo2.restype = _MallInfo2
        free = libc.mallinfo2().fordblks
        with open("/proc/self/status") as f:
            status = dict(line.split(":", 1) for line in f)
        rss, peak = (int(status[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM"))
    except (OSError, AttributeError, KeyError, ValueError):
        return None
    return rss, peak, free


def _return_pays(rss: int, peak: int, free: int) -> bool:
    """Whether handing the free heap back can lower the process's peak RSS. The free heap is resident and is
    reused first; the part of it a later allocation cannot reuse (sizes that do not fit) is what sits under a
    later peak, at most ``rss + free`` if the next stage needs as much again. When even that stays below the
    peak so far, the peak is elsewhere (a load that peaked above any later stage) and a trim would only cost
    the page faults of memory taken back (~2% of a generation)."""
    return rss + free >= peak


def _return_freed_memory() -> None:
    """Hand memory freed by a released component back to the system, so that the process's RSS drops,
    where that can lower its peak (``_return_pays``).

    Weights read in the file's dtype are memory maps and go back when unmapped; but tensors made by a cast
    (bfloat16 weights from a float32 file) and activations live on the C heap, and glibc keeps freed heap
    memory for reuse unless asked to trim it. Not glibc (macOS, musl, Windows): nothing to do.
    """
    state = _heap_state()
    if state is not None and not _return_pays(*state):
        return
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(AttributeError):  # not glibc's
            libc.malloc_trim(0)


@contextlib.contextmanager
def _heap_returned_before(modules: Iterable[torch.nn.Module]) -> Iterator[None]:
    """While inside, the heap freed so far goes back to the system before each of ``modules`` runs (forward
    pre-hooks, removed on leaving). For the decoders' stages: the vocoder's convolutions' short-lived copies
    (channels-last weights, oneDNN's reorders) between long-lived activations leave glibc holding ~150-350 MB
    it would reuse, under the generation's peak (10.24 s: the vocoder's heap peak 560 -> 406 MB, ~80 ms a
    call); the VAE's up blocks ~70 MB (60 s, where the VAE is the peak: 1204 -> 1130 MB)."""
    handles = [m.register_forward_pre_hook(lambda *_: _return_freed_memory()) for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """``None`` or ``"auto"``: the environment's ``AUDIOLDM2_DEVICE`` if set, else the fastest device this
    machine has: CUDA, then Apple's MPS, then the CPU (as the original AudioLDM 2). Anything else as
    ``torch.device`` reads it."""
    if device is None or device == "auto":
        device = os.environ.get("AUDIOLDM2_DEVICE", "auto") or "auto"
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r} (auto, cpu, cuda, cuda:1, mps, ...)") from e


def _check_dtype(dtype: torch.dtype | str) -> torch.dtype:
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}
    names |= {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if isinstance(dtype, str):
        if dtype not in names:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(names)}")
        dtype = names[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, not {dtype}")
    return dtype


class _Component:
    """A pipeline attribute holding one component under diffusers' name (``pipe.unet``): loaded on first read
    (with ``low_memory``, again after a stage released it); assigning one replaces it for good."""

    def __set_name__(self, owner, name: str):
        self.name = name

    def __get__(self, pipe: AudioLDM2 | None, owner=None):
        return self if pipe is None else pipe._get(self.name)

    def __set__(self, pipe: AudioLDM2, module) -> None:
        pipe._modules[self.name] = module
        pipe._replaced.add(self.name)


class AudioLDM2:
    """AudioLDM 2 text-to-audio. ``AudioLDM2.from_pretrained("cvssp/audioldm2")("a dog barking").audios``."""

    tokenizer = _Component()  # RoBERTa, for CLAP
    tokenizer_2 = _Component()  # T5 (speech checkpoints: VITS phonemes)
    text_encoder = _Component()  # CLAP's text branch (diffusers: the whole ClapModel)
    text_encoder_2 = _Component()  # Flan-T5 encoder (speech: the text encoder of VITS)
    projection_model = _Component()
    language_model = _Component()  # GPT-2
    unet = _Component()
    vae = _Component()  # the VAE's decoder
    vae_encoder = _Component()  # the VAE's encoder, for audio input
    vocoder = _Component()
    clap_audio = _Component()  # CLAP's audio branch, for re-ranking

    def __init__(
        self,
        ckpt: Checkpoint,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str = torch.float32,
        low_memory: bool = False,
        compile: bool | dict[str, Any] = False,
        cuda_graphs: bool = False,
        fast: bool = True,
        cpu_attention: bool | None = None,
    ):
        self.ckpt = ckpt
        self.fast = bool(fast)
        self.cpu_attention = cpu_attention  # the C++ attention kernel, as fast.optimize takes it
        # component -> the speed layer's decisions for it (rewrite -> Decision), filled as components load
        self.fast_decisions: dict[str, dict[str, fast_layer.Decision]] = {}
        self.device = resolve_device(device)
        self.dtype = _check_dtype(dtype)
        if self.dtype == torch.float16 and self.device.type == "cpu":
            raise ValueError("float16 is not supported on the CPU; use bfloat16 or float32")
        if (
            self.dtype == torch.bfloat16
            and self.device.type == "cpu"
            and not fast_layer.decide("onednn-linear", torch.bfloat16, timed=False).supported
        ):
            # oneDNN then runs its reference kernels: a bfloat16 conv took 300x the float32 one (AVX2 only)
            logger.warning(
                "this CPU has no native bfloat16 (AVX-512 BF16): bfloat16 runs, but far slower than float32"
            )
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA device, not {self.device}")
        self.low_memory = low_memory
        self.compile = fast_layer.compile_options(compile)  # torch.compile's options for the UNet, or None
        self.cuda_graphs = bool(cuda_graphs)
        # Configs are read once, up front: shapes and the schedule do not need the weights.
        self.unet_config = unet_config(ckpt.config("unet"))
        self.vae_config = vae_config(ckpt.config("vae"))
        self.vocoder_config = vocoder_config(ckpt.config("vocoder"))
        self.scheduler_config = scheduler_config(ckpt.config("scheduler"))
        self.max_new_tokens = ckpt.config("language_model").get("max_new_tokens", 8)
        v, s = self.vocoder_config, self.vae_config.scale_factor
        if v.model_in_dim % s != 0:
            raise ValueError(
                f"vocoder mel bins {v.model_in_dim} are not divisible by the VAE scale factor {s}"
            )
        self._modules: dict[str, torch.nn.Module | Any] = {}
        self._replaced: set[str] = set()  # components a user assigned: never released, never reloaded
        if not low_memory:
            for name in self._GENERATION:
                self._get(name)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | Path = "cvssp/audioldm2",
        *,
        revision: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str = torch.float32,
        low_memory: bool = False,
        compile: bool | dict[str, Any] = False,
        cuda_graphs: bool = False,
        fast: bool = True,
        cpu_attention: bool | None = None,
    ) -> AudioLDM2:
        """Load an official checkpoint: a local pipeline folder or a hub repo id (optionally a revision).
        ``device=None`` (or "auto"): CUDA if there is one, else MPS, else the CPU (``resolve_device``).
        ``fast=False``: the plain reference model, without the speed layer (``fast/``). ``cpu_attention``: the
        speed layer's C++ attention kernel for the UNet (True), not (False), or as ``AUDIOLDM2_CPU_ATTENTION``
        says (None)."""
        return cls(
            open_checkpoint(path_or_repo_id, revision),
            device=device,
            dtype=dtype,
            low_memory=low_memory,
            compile=compile,
            cuda_graphs=cuda_graphs,
            fast=fast,
            cpu_attention=cpu_attention,
        )

    # ------------------------------------------------------------------------------ components

    @property
    def _decoder_dtype(self) -> torch.dtype:
        # float16 overflows in the VAE's and vocoder's activations: those run in float32 then.
        return torch.float32 if self.dtype == torch.float16 else self.dtype

    _LOADERS: dict[str, Callable[[AudioLDM2], Any]] = {
        "tokenizer": lambda p: load_tokenizer(p.ckpt, "tokenizer"),
        "tokenizer_2": lambda p: load_tokenizer(p.ckpt, "tokenizer_2"),
        "text_encoder": lambda p: load_clap_text(p.ckpt, p.dtype, p.device),
        "text_encoder_2": lambda p: (load_vits if p.ckpt.is_speech else load_t5)(p.ckpt, p.dtype, p.device),
        "projection_model": lambda p: load_projection(p.ckpt, p.dtype, p.device),
        "language_model": lambda p: load_gpt2(p.ckpt, p.dtype, p.device),
        "unet": lambda p: load_unet(p.ckpt, p.dtype, p.device),
        "vae": lambda p: load_vae(p.ckpt, p._decoder_dtype, p.device),
        "vocoder": lambda p: load_vocoder(p.ckpt, p._decoder_dtype, p.device),
        # Only for re-ranking, and only for audio input: never loaded up front, never read for text-to-audio.
        "clap_audio": lambda p: load_clap_audio(p.ckpt, p.dtype, p.device),
        "vae_encoder": lambda p: load_vae_encoder(p.ckpt, p._decoder_dtype, p.device),
    }
    _GENERATION = tuple(n for n in _LOADERS if n not in ("clap_audio", "vae_encoder"))

    def _get(self, name: str):
        if name not in self._modules:
            # Loaded outside inference mode even when a stage asks for it inside: the weights are then normal
            # tensors, which a user may train, and whose version counters the speed layer's caches read.
            with torch.inference_mode(False):
                module = self._LOADERS[name](self)
                if self.fast and isinstance(module, torch.nn.Module):
                    self.fast_decisions[name] = fast_layer.optimize(module, cpu_attention=self.cpu_attention)
                if name == "unet":
                    module = fast_layer.compiled(module, self.compile, self.device)
            self._modules[name] = module
        return self._modules[name]

    def _release(self, *names: str) -> None:
        """The end of a stage: with ``low_memory`` its components are dropped. On the CPU, either way, the heap
        the stage freed (its activations) goes back to the system: glibc would keep ~0.4-0.6 GB of it, which
        then sits under the next stage's peak (10.24 s: the vocoder's peak RSS 4.66 -> 4.22 GB)."""
        if self.low_memory:
            for name in names:
                if name not in self._replaced:
                    self._modules.pop(name, None)
        if self.low_memory or self.device.type == "cpu":
            _return_freed_memory()

    def text_stack(self) -> conditioning.TextStack:
        return conditioning.TextStack(
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2,
            clap=self.text_encoder,
            t5=self.text_encoder_2,
            projection=self.projection_model,
            gpt2=self.language_model,
            max_new_tokens=self.max_new_tokens,
        )

    # ---------------------------------------------------------------------------------- stages

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device | str | None = None,
        num_waveforms_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        generated_prompt_embeds: Tensor | None = None,
        negative_generated_prompt_embeds: Tensor | None = None,
        attention_mask: Tensor | None = None,
        negative_attention_mask: Tensor | None = None,
        max_new_tokens: int | None = None,
        transcription: str | list[str] | None = None,
        transcription_is_phonemes: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(prompt_embeds, attention_mask, generated_prompt_embeds)`` as diffusers' ``encode_prompt``.

        With guidance the batch is ``[negative, positive]``; each row is repeated
        ``num_waveforms_per_prompt`` times. ``transcription`` (speech checkpoints): the words to speak, one
        per prompt; ``transcription_is_phonemes``: they are IPA already (no espeak-ng needed).
        """
        out = conditioning.encode_prompt(
            self.text_stack(),
            prompt,
            device=self.device if device is None else torch.device(device),
            num_waveforms_per_prompt=num_waveforms_per_prompt,
            do_classifier_free_guidance=do_classifier_free_guidance,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            generated_prompt_embeds=generated_prompt_embeds,
            negative_generated_prompt_embeds=negative_generated_prompt_embeds,
            attention_mask=attention_mask,
            negative_attention_mask=negative_attention_mask,
            max_new_tokens=max_new_tokens,
            transcription=transcription,
            transcription_is_phonemes=transcription_is_phonemes,
        )
        self._release(
            "tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "projection_model", "language_model"
        )
        return out

    def denoise(
        self,
        latents: Tensor,
        prompt_embeds: Tensor,
        attention_mask: Tensor,
        generated_prompt_embeds: Tensor,
        *,
        num_inference_steps: int,
        guidance_scale: float,
        sampler: str | SamplerFn = "ddim",
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        callback: Callable[[int, Tensor, Tensor], None] | None = None,
        start: int = 0,
    ) -> Tensor:
        """Run a sampler from step ``start`` (0: x_T) on ``latents``, already in the sampler's scale (see
        ``samplers.init_noise_sigma`` and ``samplers.add_noise``); the closure below owns guidance and both
        conditions."""
        unet = self.unet
        guided = guidance_scale > 1.0

        def model(x: Tensor, t: Tensor) -> Tensor:
            # Under guidance the conditions are [negative, positive] and both halves denoise x.
            out = unet(
                torch.cat([x] * 2) if guided else x,
                t,
                encoder_hidden_states=generated_prompt_embeds,
                encoder_hidden_states_1=prompt_embeds,
                encoder_attention_mask_1=attention_mask,
            )
            if guided:
                uncond, cond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            return out

        if self.cuda_graphs:
            model = fast_layer.CudaGraphDenoiser(model)
        x = sample(
            sampler,
            model,
            latents,
            self.scheduler_config,
            num_inference_steps,
            start=start,
            eta=eta,
            generator=generator,
            callback=callback,
        )
        self._release("unet")
        return x

    def encode_audio(
        self,
        audio: str | Path | np.ndarray | Tensor,
        sample_rate: int | None = None,
        *,
        sample: bool = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> Tensor:
        """Audio (a file path, or a waveform with its ``sample_rate``) -> latents (1, 8, t, 16), UNet scale.

        The input is read and checked by ``audio.load_audio`` (at most ``MAX_AUDIO_LENGTH_S``; any rate, mono
        or stereo), turned into the log-mel the model was trained on (``audio.log_mel``: 4 t mel frames, the
        input's length rounded up to a whole latent frame of 40 ms) and encoded by the VAE encoder, loaded on
        first use (text-to-audio never reads it): ``scaling_factor * mean`` of the posterior, or with
        ``sample=True`` a draw from it (diffusers' ``latent_dist.sample(generator)``). Returns the latents in
        the VAE's dtype on the pipeline's device; ``audio.load_audio(...).shape[0]`` is the input's length in
        samples at 16 kHz.
        """
        self._check_audio_model()
        wave = audio_front_end.load_audio(audio, sample_rate, max_seconds=MAX_AUDIO_LENGTH_S)
        frames = audio_front_end.mel_frames(wave.shape[0], self.vae_config.scale_factor)
        return self._encode_wave(wave, frames, sample=sample, generator=generator)

    def _check_audio_model(self) -> None:
        v, s = self.vocoder_config, self.vae_config
        if (v.sampling_rate, v.hop_length, v.model_in_dim, s.in_channels) != (
            audio_front_end.SAMPLE_RATE, audio_front_end.HOP_LENGTH, audio_front_end.N_MELS, 1,
        ):  # fmt: skip
            raise ValueError(
                f"audio input needs a 16 kHz model with 64 mel bins and a hop of 160 samples; this checkpoint "
                f"has {v.sampling_rate} Hz, {v.model_in_dim} bins, a hop of {v.hop_length}"
            )

    def _encode_wave(
        self, wave: Tensor, frames: int, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """A 16 kHz mono waveform -> latents (1, 8, frames / 4, 16) of its log-mel cut or padded to ``frames``."""
        mel = audio_front_end.log_mel(wave, frames)
        encoder = self.vae_encoder
        latents = encoder.encode(
            mel[None, None].to(self.device, self._decoder_dtype), sample=sample, generator=generator
        )  # (1, 8, frames / 4, 16)
        self._release("vae_encoder")
        return latents

    def decode(self, latents: Tensor) -> Tensor:
        """Latents (B, 8, t, 16) -> float32 waveforms (B, samples) at the vocoder's rate, untrimmed.

        On the CPU one waveform at a time: each waveform's decoding does not depend on the others', batching
        gains nothing there, and the activations at the peak are one waveform's instead of B's (the VAE's
        widest, 128 channels x frames x 64 in float32, is ~100 MB per 30 s of audio, several alive at once).
        """
        cpu = self.device.type == "cpu"
        split = cpu and len(latents) > 1
        vae = self.vae
        latents = latents.to(self._decoder_dtype)
        # on the CPU the heap each stage of a decoder freed goes back to the system before the next, wider one
        up_blocks = getattr(getattr(vae, "decoder", None), "up_blocks", []) if cpu else []
        with _heap_returned_before(up_blocks):
            # (b, 1, T, 64) each
            mels = [vae.decode(x) for x in latents.split(1)] if split else [vae.decode(latents)]
        self._release("vae")
        vocoder = self.vocoder
        with _heap_returned_before(getattr(vocoder, "upsampler", []) if cpu else []):
            audio = torch.cat([vocoder(mel.squeeze(1)) for mel in mels])  # (B, samples)
        self._release("vocoder")
        return audio.float()

    def score_waveforms(
        self, prompts: list[str], audio: Tensor, num_waveforms_per_prompt: int
    ) -> tuple[Tensor, Tensor]:
        """Order each prompt's candidates by CLAP text-audio similarity, best first.

        ``audio`` (P * N, samples) holds prompt p's N candidates at rows p*N ... p*N + N-1. Returns the
        reordered audio and the scores (P, N), descending: the reference's ``logits_per_text`` (cosine
        similarity times exp(logit_scale_t)). Unlike diffusers, candidates are ranked within their own
        prompt's group only (diffusers issue 13602), ties kept in generation order.
        """
        fe = feature_extractor_config(self.ckpt.config("feature_extractor"))
        tokens = self.tokenizer(prompts)
        text = self.text_encoder(tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device))
        self._release("tokenizer", "text_encoder")
        features = clap_features(resample(audio.float().cpu(), self.sample_rate, fe.sampling_rate), fe)
        clap_audio = self.clap_audio
        embeds = clap_audio(features.to(self.device, self.dtype))  # (P * N, D), unit norm
        logits = score(text.float(), embeds.float(), clap_audio.logit_scale_t.float())
        self._release("clap_audio")
        ranking = rank_within_prompts(logits, num_waveforms_per_prompt)
        return audio[ranking.order.reshape(-1).to(audio.device)], ranking.scores

    # ------------------------------------------------------------------------------- the call

    @property
    def sample_rate(self) -> int:
        return self.vocoder_config.sampling_rate

    def _upsample_factor(self) -> float:
        return math.prod(self.vocoder_config.upsample_rates) / self.vocoder_config.sampling_rate

    def latent_shape(self, audio_length_in_s: float, batch: int = 1) -> tuple[int, int, int, int]:
        """The shape of the latents a generation of ``audio_length_in_s`` starts from (``latents=``)."""
        vae_scale = self.vae_config.scale_factor
        height, _ = audio_shape(audio_length_in_s, self._upsample_factor(), vae_scale, self.sample_rate)
        return self._latent_shape(height, batch)

    def _latent_shape(self, height: int, batch: int) -> tuple[int, int, int, int]:
        vae_scale = self.vae_config.scale_factor
        return (
            batch,
            self.unet_config.in_channels,
            height // vae_scale,
            self.vocoder_config.model_in_dim // vae_scale,
        )

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        audio_length_in_s: float | None = None,
        num_inference_steps: int = 200,
        guidance_scale: float = 3.5,
        negative_prompt: str | list[str] | None = None,
        num_waveforms_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        generated_prompt_embeds: Tensor | None = None,
        negative_generated_prompt_embeds: Tensor | None = None,
        attention_mask: Tensor | None = None,
        negative_attention_mask: Tensor | None = None,
        max_new_tokens: int | None = None,
        output_type: str = "np",
        sampler: str | SamplerFn = "ddim",
        callback: Callable[[int, Tensor, Tensor], None] | None = None,
        callback_steps: int = 1,
        rerank: bool | None = None,
        transcription: str | list[str] | None = None,
        transcription_is_phonemes: bool = False,
        audio: str | Path | np.ndarray | Tensor | None = None,
        audio_sample_rate: int | None = None,
        strength: float | None = None,
        inpaint_spans_s: Sequence[tuple[float, float]] | None = None,
        inpaint_bands_hz: Sequence[tuple[float, float]] | None = None,
        super_resolution: bool = False,
        cutoff_hz: float | None = None,
    ) -> AudioOutput:
        """Generate audio; arguments as ``diffusers.AudioLDM2Pipeline.__call__``, plus ``sampler``.

        ``sampler``: a name in ``samplers.SAMPLERS``: "ddim" (the checkpoint's scheduler, diffusers' default),
        or the diffusers scheduler it names built ``from_config`` of it ("dpmpp-2m", "unipc", "euler-a", ...;
        the table in ``samplers.py``), or a function ``fn(model, x, sched, generator=, callback=, start=)``
        (see the README). ``callback(step, t,
        latents)`` runs every ``callback_steps`` steps. ``rerank`` (default: when
        ``num_waveforms_per_prompt`` > 1 and a prompt is given, as diffusers) orders each prompt's candidates
        by CLAP score, best first, and returns the scores; False keeps generation order. Returns :class:`AudioOutput` with ``audios`` of
        shape (batch * num_waveforms_per_prompt, samples), float32.

        Speech checkpoints: ``transcription`` (str, or a list with one per prompt) is what is said, the prompt
        how it sounds; ``transcription_is_phonemes=True`` passes IPA phonemes as they are (no espeak-ng).

        Audio in (``editing.py``; the README's "Audio in, audio out"): ``audio`` (a file path, or a waveform
        with its ``audio_sample_rate``; what ``audio.load_audio`` reads) is encoded to latents z0 and the
        sampler starts from it, noised to the step ``strength`` gives (diffusers img2img's ``get_timesteps``;
        1: from almost pure noise). Alone it is style transfer (SDEdit; ``strength`` defaults to 0.6).
        ``inpaint_spans_s`` ((start, end) seconds) and/or ``inpaint_bands_hz`` ((low, high) Hz; with both, the
        bands within the spans, as ``audio.latent_mask``) regenerate those parts and keep the rest, which ends
        equal to z0; ``super_resolution=True`` regenerates above ``cutoff_hz`` (default: half the input's own
        sample rate). With a mask ``strength`` defaults to 1. The output is as long as the input, or
        ``audio_length_in_s``: a longer input is cut there, a shorter one padded with silence (after the
        original's peak normalisation, as its ``pad_wav``).
        """
        factor, vae_scale = self._upsample_factor(), self.vae_config.scale_factor
        source = None
        if audio is not None:
            if latents is not None:
                raise ValueError("give latents or audio, not both: with audio the start is the input, noised")
            source = self._audio_source(audio, audio_sample_rate, audio_length_in_s)
            audio_length_in_s = max(source.keep / self.sample_rate, factor * vae_scale)  # for the checks
        else:
            given = dict(audio_sample_rate=audio_sample_rate, strength=strength, inpaint_spans_s=inpaint_spans_s,
                         inpaint_bands_hz=inpaint_bands_hz, super_resolution=super_resolution, cutoff_hz=cutoff_hz)  # fmt: skip
            extra = [k for k, v in given.items() if v not in (None, False)]
            if extra:
                raise ValueError(f"{', '.join(extra)}: only with input audio (pass audio=)")
        if audio_length_in_s is None:
            audio_length_in_s = self.unet_config.sample_size * vae_scale * factor
        self._check_call(
            prompt, audio_length_in_s, num_inference_steps, guidance_scale, num_waveforms_per_prompt,
            output_type, sampler, callback_steps, prompt_embeds, generated_prompt_embeds,
        )  # fmt: skip
        if source is None:
            height, keep = audio_shape(audio_length_in_s, factor, vae_scale, self.sample_rate)
        else:
            height, keep = source.frames, source.keep
            mask = self._edit_mask(source, inpaint_spans_s, inpaint_bands_hz, super_resolution, cutoff_hz)
            if strength is None:
                strength = DEFAULT_STRENGTH if mask is None else 1.0
            start = editing.start_index(num_inference_steps, strength)  # checked before any model runs
        if rerank is None:
            rerank = num_waveforms_per_prompt > 1 and prompt is not None
        elif rerank and prompt is None:
            raise ValueError(
                "re-ranking needs the prompt text; pass rerank=False with precomputed embeddings"
            )

        prompt_embeds, attention_mask, generated_prompt_embeds = self.encode_prompt(
            prompt,
            self.device,
            num_waveforms_per_prompt,
            guidance_scale > 1.0,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            generated_prompt_embeds=generated_prompt_embeds,
            negative_generated_prompt_embeds=negative_generated_prompt_embeds,
            attention_mask=attention_mask,
            negative_attention_mask=negative_attention_mask,
            max_new_tokens=max_new_tokens,
            transcription=transcription,
            transcription_is_phonemes=transcription_is_phonemes,
        )
        batch = prompt_embeds.shape[0] // (2 if guidance_scale > 1.0 else 1)
        shape = self._latent_shape(height, batch)
        step_callback = None
        if callback is not None:
            step_callback = lambda i, t, x: callback(i, t, x) if i % callback_steps == 0 else None  # noqa: E731
        if source is not None:
            # SDEdit's start (and RePaint's): z0 noised to step ``start``, the noise drawn before any other
            z0 = self._encode_wave(source.wave, source.frames).to(prompt_embeds.dtype).expand(shape)
            noise = randn(shape, generator, self.device, prompt_embeds.dtype)
            latents = add_noise(sampler, self.scheduler_config, num_inference_steps, z0, noise, start)
            if mask is not None:
                mask = mask.to(self.device)[None, None]  # (1, 1, t, 16), True = regenerate
                step_callback = editing.repaint_callback(
                    sampler, self.scheduler_config, num_inference_steps, z0, mask, generator, step_callback
                )
            latents = self.denoise(
                latents, prompt_embeds, attention_mask, generated_prompt_embeds,
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, sampler=sampler,
                eta=eta, generator=generator, callback=step_callback, start=start,
            )  # fmt: skip
            if mask is not None:  # exactly the input where kept, whatever a sampler did with the last step
                latents = torch.where(mask, latents, z0.to(latents.dtype))
            return self._finish(latents, keep, output_type, rerank, prompt, num_waveforms_per_prompt)
        if latents is None:
            latents = randn(shape, generator, self.device, prompt_embeds.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; this request needs {shape}")
        else:
            latents = latents.to(self.device, prompt_embeds.dtype)
        latents = latents * init_noise_sigma(sampler, self.scheduler_config, num_inference_steps)
        latents = self.denoise(
            latents,
            prompt_embeds,
            attention_mask,
            generated_prompt_embeds,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            sampler=sampler,
            eta=eta,
            generator=generator,
            callback=step_callback,
        )
        return self._finish(latents, keep, output_type, rerank, prompt, num_waveforms_per_prompt)

    def _finish(self, latents, keep, output_type, rerank, prompt, num_waveforms_per_prompt) -> AudioOutput:
        """Final latents -> the output: decoded, trimmed to ``keep`` samples, re-ranked if asked."""
        if output_type == "latent":
            return AudioOutput(audios=latents, sample_rate=self.sample_rate)
        audio = self.decode(latents)[:, :keep]
        scores = None
        if rerank:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            audio, scores = self.score_waveforms(prompts, audio, num_waveforms_per_prompt)
        return AudioOutput(
            audios=audio.cpu().numpy() if output_type == "np" else audio,
            sample_rate=self.sample_rate,
            scores=scores,
        )

    def _audio_source(self, audio, sample_rate, audio_length_in_s) -> _Source:
        """Read and check the input audio; fit it to ``audio_length_in_s`` (cut, or padded by ``log_mel``)."""
        self._check_audio_model()
        wave = audio_front_end.load_audio(audio, sample_rate, max_seconds=MAX_AUDIO_LENGTH_S)
        keep = wave.shape[0]
        if audio_length_in_s is not None:
            if not isinstance(audio_length_in_s, (int, float)) or isinstance(audio_length_in_s, bool):
                raise TypeError(f"audio_length_in_s must be a number of seconds, got {audio_length_in_s!r}")
            if not (math.isfinite(audio_length_in_s) and 0 < audio_length_in_s <= MAX_AUDIO_LENGTH_S):
                raise ValueError(
                    f"audio_length_in_s must be in (0, {MAX_AUDIO_LENGTH_S}] s, got {audio_length_in_s}"
                )
            keep = int(audio_length_in_s * self.sample_rate)
            wave = wave[:keep]
        frames = audio_front_end.mel_frames(keep, self.vae_config.scale_factor)
        rate = editing.source_sample_rate(audio, sample_rate)
        return _Source(wave, frames, keep, rate)

    def _edit_mask(self, source, spans, bands, super_resolution, cutoff_hz) -> Tensor | None:
        """The latent mask (t, 16), True = regenerate, of the inpainting spans / bands and super-resolution;
        None for style transfer."""
        bands = list(bands or [])
        if super_resolution:
            bands.append((editing.super_resolution_cutoff(source.rate, cutoff_hz), audio_front_end.F_MAX))
        elif cutoff_hz is not None:
            raise ValueError("cutoff_hz is the super-resolution cutoff: pass super_resolution=True with it")
        if not spans and not bands:
            return None
        frames = source.frames // self.vae_config.scale_factor
        return audio_front_end.latent_mask(
            frames, list(spans or []), bands, scale=self.vae_config.scale_factor
        )

    def _check_call(
        self,
        prompt,
        audio_length_in_s,
        num_inference_steps,
        guidance_scale,
        num_waveforms_per_prompt,
        output_type,
        sampler,
        callback_steps,
        prompt_embeds,
        generated_prompt_embeds,
    ) -> None:
        min_length = self._upsample_factor() * self.vae_config.scale_factor
        if not isinstance(audio_length_in_s, (int, float)) or isinstance(audio_length_in_s, bool):
            raise TypeError(f"audio_length_in_s must be a number of seconds, got {audio_length_in_s!r}")
        if not math.isfinite(audio_length_in_s) or audio_length_in_s < min_length:
            raise ValueError(f"audio_length_in_s must be at least {min_length} s, got {audio_length_in_s}")
        if audio_length_in_s > MAX_AUDIO_LENGTH_S:
            raise ValueError(
                f"audio_length_in_s must be at most {MAX_AUDIO_LENGTH_S} s, got {audio_length_in_s}"
            )
        if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool):
            raise TypeError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0 (1 disables guidance), got {guidance_scale}")
        if not isinstance(num_waveforms_per_prompt, int) or num_waveforms_per_prompt < 1:
            raise ValueError(
                f"num_waveforms_per_prompt must be a positive int, got {num_waveforms_per_prompt!r}"
            )
        if output_type not in ("np", "pt", "latent"):
            raise ValueError(f"output_type must be 'np', 'pt' or 'latent', got {output_type!r}")
        check_sampler(sampler)
        schedule(sampler, self.scheduler_config, num_inference_steps)  # refuses counts it cannot run, early
        if not isinstance(callback_steps, int) or callback_steps < 1:
            raise ValueError(f"callback_steps must be a positive int, got {callback_steps!r}")
        if prompt is None and (prompt_embeds is None or generated_prompt_embeds is None):
            raise ValueError("give a prompt, or both prompt_embeds and generated_prompt_embeds")
