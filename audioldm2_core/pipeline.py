"""``AudioLDM2``: the components of a checkpoint, the stages over them, and diffusers' call.

    pipe = AudioLDM2.from_pretrained("cvssp/audioldm2")     # every weight from the files, strictly
    out = pipe("a dog barking in the rain")                  # diffusers' AudioLDM2Pipeline.__call__
    out.audios[0], out.sample_rate                           # float32 waveform, 16000

The call is an adapter: it builds and checks a request (``request.py``), encodes the conditions
(``encode_prompt``), runs ``generate.text_to_audio`` or, for audio in, ``generate.audio_to_audio``, and
finishes (decode, trim, re-rank, output type). For the same seed it gives diffusers' audio to float32 rounding:
every random draw follows diffusers' order and shapes.

The components are public attributes under diffusers' names (``pipe.unet``, ``pipe.vae``, ...), which a user
may read, modify, hook or replace. They are loaded by a ``Residency`` (``residency.py``: all up front, or with
``low_memory`` each for its stage) and, with ``fast=True`` (the default), go through the speed layer's exact
rewrites (``fast/``) on load (``cpu_attention=`` adds the C++ attention kernel); ``compile=`` wraps the UNet in
``torch.compile`` and ``cuda_graphs=`` replays the guided denoiser from a CUDA graph (both off by default;
``fast.compiled``, ``fast.CudaGraphDenoiser``). The stages
(``encode_prompt``, ``denoise``, ``encode_audio``, ``decode``) work under autograd; only ``__call__`` runs in
inference mode. On a GPU, float16 runs the VAE and the vocoder in float32, where float16 overflows.

Left out on purpose: ``return_dict`` / tuple outputs, ``callback_on_step_end`` tensor plumbing, model offload
hooks, ``cross_attention_kwargs``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import audio as audio_front_end
from . import conditioning, editing, generate, lora
from . import fast as fast_layer
from .clap_audio import load_clap_audio
from .clap_text import load_clap_text
from .config import (
    feature_extractor_config,
    gpt2_config,
    scheduler_config,
    unet_config,
    vae_config,
    vocoder_config,
)
from .errors import ConfigError, UsageError
from .gpt2 import load_gpt2
from .loading import Checkpoint, open_checkpoint
from .noise import Generators, randn
from .projection import load_projection
from .request import DTYPE_NAMES, MAX_AUDIO_LENGTH_S, AudioEdit, GenerationRequest, LoadOptions
from .rerank import rank_within_prompts, score
from .residency import Component, Residency, return_heap_before
from .samplers import Denoiser, SamplerFn, sample, schedule
from .t5 import load_t5
from .tokenization import load_tokenizer
from .unet import load_unet
from .vae import load_vae, load_vae_encoder
from .vits import load_vits
from .vocoder import load_vocoder

logger = logging.getLogger("audioldm2_core")

__all__ = ["AudioLDM2", "AudioOutput", "audio_shape", "check_device", "resolve_device"]

_SLOW_BFLOAT16 = "this CPU has no native bfloat16 (AVX-512 BF16): bfloat16 runs, but far slower than float32"
TEXT_COMPONENTS = (
    "tokenizer",
    "tokenizer_2",
    "text_encoder",
    "text_encoder_2",
    "projection_model",
    "language_model",
)


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
    height, keep = int(audio_length_in_s / upsample_factor), int(audio_length_in_s * sample_rate)
    if height % vae_scale != 0:
        height = int(np.ceil(height / vae_scale)) * vae_scale
        logger.info("Audio length %ss is increased to %ss for the model; it is cut back after generation.",
                    audio_length_in_s, height * upsample_factor)  # fmt: skip
    return height, keep


def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """``None`` or ``"auto"``: the environment's ``AUDIOLDM2_DEVICE`` if set, else the fastest device this
    machine has: CUDA, then Apple's MPS, then the CPU. Anything else as ``torch.device`` reads it."""
    if device is None or device == "auto":
        device = os.environ.get("AUDIOLDM2_DEVICE", "auto") or "auto"
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UsageError(
            f"unknown device {device!r} (auto, cpu, cuda, cuda:1, mps, ...)", field="device"
        ) from e


def check_device(device: torch.device) -> None:
    """A CUDA or MPS device that this machine has (``torch.device`` only parses the name; a missing one fails
    later, inside torch, as an AssertionError or a RuntimeError)."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "; this PyTorch is built without CUDA" if torch.version.cuda is None else ""
            raise UsageError(f"{device}: no CUDA device on this machine{why}", field="device")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f"{device}: no such CUDA device (this machine has cuda:0 to cuda:{count - 1})",
                             field="device")  # fmt: skip
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UsageError(f"{device}: no MPS device (Apple silicon) on this machine", field="device")


def _dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise UsageError(f"dtype must be float32, float16 or bfloat16, not {dtype}", field="dtype")
        return str(dtype).removeprefix("torch.")
    return dtype


def component_loaders(ckpt: Checkpoint, dtype: torch.dtype, decoder_dtype: torch.dtype, device: torch.device
                      ) -> dict[str, Callable[[], Any]]:  # fmt: skip
    """A checkpoint's components under diffusers' names, each as a function that loads it strictly."""
    c, d, dev = ckpt, dtype, device
    return {
        "tokenizer": lambda: load_tokenizer(c, "tokenizer"),
        "tokenizer_2": lambda: load_tokenizer(c, "tokenizer_2"),
        "text_encoder": lambda: load_clap_text(c, d, dev),
        "text_encoder_2": lambda: (load_vits if c.is_speech else load_t5)(c, d, dev),
        "projection_model": lambda: load_projection(c, d, dev),
        "language_model": lambda: load_gpt2(c, d, dev),
        "unet": lambda: load_unet(c, d, dev),
        "vae": lambda: load_vae(c, decoder_dtype, dev),
        "vocoder": lambda: load_vocoder(c, decoder_dtype, dev),
        "clap_audio": lambda: load_clap_audio(c, d, dev),  # re-ranking only
        "vae_encoder": lambda: load_vae_encoder(c, decoder_dtype, dev),  # audio input only
    }


class AudioLDM2:
    """AudioLDM 2 text-to-audio. ``AudioLDM2.from_pretrained("cvssp/audioldm2")("a dog barking").audios``."""

    tokenizer = Component()  # RoBERTa, for CLAP
    tokenizer_2 = Component()  # T5 (speech checkpoints: VITS phonemes)
    text_encoder = Component()  # CLAP's text branch (diffusers: the whole ClapModel)
    text_encoder_2 = Component()  # Flan-T5 encoder (speech: the text encoder of VITS)
    projection_model = Component()
    language_model = Component()  # GPT-2
    unet = Component()
    vae = Component()  # the VAE's decoder
    vae_encoder = Component()  # the VAE's encoder, for audio input
    vocoder = Component()
    clap_audio = Component()  # CLAP's audio branch, for re-ranking

    def __init__(self, ckpt: Checkpoint, device=None, dtype: torch.dtype | str = torch.float32,
                 low_memory: bool = False, compile: bool | dict = False, cuda_graphs: bool = False,
                 fast: bool = True, cpu_attention: bool | None = None):  # fmt: skip
        self.ckpt, self.device = ckpt, resolve_device(device)
        check_device(self.device)
        self.options = LoadOptions(str(ckpt.source), None, str(self.device), _dtype_name(dtype), low_memory,
                                   compile, cuda_graphs, fast, cpu_attention)  # fmt: skip
        self.options.check()
        self.dtype = getattr(torch, DTYPE_NAMES[self.options.dtype])
        # float16 overflows in the VAE's and the vocoder's activations: they run in float32 then
        self.decoder_dtype = torch.float32 if self.dtype == torch.float16 else self.dtype
        if self.dtype == torch.bfloat16 and self.device.type == "cpu" and not fast_layer.native_bfloat16():
            logger.warning(_SLOW_BFLOAT16)
        # Configs are read once, up front: shapes and the schedule do not need the weights.
        self.unet_config, self.vae_config = unet_config(ckpt.config("unet")), vae_config(ckpt.config("vae"))
        self.vocoder_config = vocoder_config(ckpt.config("vocoder"))
        self.scheduler_config = scheduler_config(ckpt.config("scheduler"))
        self.max_new_tokens = gpt2_config(ckpt.config("language_model")).max_new_tokens  # 8; speech 512
        if self.vocoder_config.model_in_dim % self.vae_config.scale_factor != 0:
            raise ConfigError(f"vocoder mel bins {self.vocoder_config.model_in_dim} are not divisible by the VAE "
                              f"scale factor {self.vae_config.scale_factor}")  # fmt: skip
        # component -> the speed layer's decisions for it (rewrite -> Decision), filled as components load
        self.fast_decisions: dict[str, dict[str, fast_layer.Decision]] = {}
        loaders = component_loaders(ckpt, self.dtype, self.decoder_dtype, self.device)
        self.residency = Residency(loaders, low_memory, self.device.type == "cpu", self._prepared)
        if not low_memory:
            for name in (*TEXT_COMPONENTS, "unet", "vae", "vocoder"):  # what text-to-audio uses
                self.residency.get(name)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path = "cvssp/audioldm2", *, revision: str | None = None,
                        device=None, dtype: torch.dtype | str = torch.float32, low_memory: bool = False,
                        compile: bool | dict = False, cuda_graphs: bool = False, fast: bool = True,
                        cpu_attention: bool | None = None) -> AudioLDM2:  # fmt: skip
        """Load an official checkpoint: a local pipeline folder or a hub repo id (optionally a revision).
        ``device=None`` (or "auto"): CUDA if there is one, else MPS, else the CPU (``resolve_device``).
        ``fast=False``: the plain reference model, without the speed layer; ``cpu_attention``: the C++ attention
        kernel where it pays (None: as ``AUDIOLDM2_CPU_ATTENTION`` says)."""
        return cls(open_checkpoint(path_or_repo_id, revision), device, dtype, low_memory, compile, cuda_graphs,
                   fast, cpu_attention)  # fmt: skip

    def _prepared(self, name: str, module: Any) -> Any:
        """What loading adds to a component, from outside: the speed layer, the heap hooks of the decoders on
        the CPU (``residency.return_heap_before``), and ``torch.compile`` of the UNet."""
        if self.options.fast and isinstance(module, torch.nn.Module):
            self.fast_decisions[name] = fast_layer.optimize(module, cpu_attention=self.options.cpu_attention)
        if self.device.type == "cpu" and name in ("vae", "vocoder"):
            stages = module.decoder.up_blocks if name == "vae" else module.upsampler
            module.heap_hooks = return_heap_before(
                stages
            )  # removable: ``for h in pipe.vae.heap_hooks: h.remove()``
        if name == "unet":
            module = fast_layer.compiled(
                module, fast_layer.compile_options(self.options.compile), self.device
            )
        return module

    def text_stack(self) -> conditioning.TextStack:
        return conditioning.TextStack(tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2,
                                      clap=self.text_encoder, t5=self.text_encoder_2,
                                      projection=self.projection_model, gpt2=self.language_model,
                                      max_new_tokens=self.max_new_tokens)  # fmt: skip

    def load_lora(self, path: str | Path, scale: float = 1.0, fuse: bool = True) -> None:
        """Apply a UNet LoRA (a file, or a folder: diffusers', PEFT's, a training run's; ``lora.py``), merged into
        the weights (``fuse``) or as adapter modules; ``unload_lora()`` restores the base bit for bit."""
        lora.load_lora(self, path, scale, fuse)

    def unload_lora(self) -> None:
        lora.unload_lora(self)

    # ---------------------------------------------------------------------------------- stages

    def encode_prompt(self, prompt: str | list[str] | None, device: torch.device | str | None = None,
                      num_waveforms_per_prompt: int = 1, do_classifier_free_guidance: bool = True,
                      negative_prompt: str | list[str] | None = None, prompt_embeds: Tensor | None = None,
                      negative_prompt_embeds: Tensor | None = None, generated_prompt_embeds: Tensor | None = None,
                      negative_generated_prompt_embeds: Tensor | None = None, attention_mask: Tensor | None = None,
                      negative_attention_mask: Tensor | None = None, max_new_tokens: int | None = None,
                      transcription: str | list[str] | None = None, transcription_is_phonemes: bool = False,
                      ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        """``(prompt_embeds, attention_mask, generated_prompt_embeds)`` as diffusers' ``encode_prompt``
        (``conditioning.encode_prompt``): with guidance the rows are ``[negative, positive]``, each repeated
        ``num_waveforms_per_prompt`` times. ``transcription``: the words a speech checkpoint says."""
        names = (
            "tokenizer",
            "tokenizer_2",
            "text_encoder",
            "text_encoder_2",
            "projection_model",
            "language_model",
        )
        with self.residency.stage(*names):
            return conditioning.encode_prompt(
                self.text_stack(), prompt, self.device if device is None else torch.device(device),
                num_waveforms_per_prompt, do_classifier_free_guidance, negative_prompt, prompt_embeds,
                negative_prompt_embeds, generated_prompt_embeds, negative_generated_prompt_embeds, attention_mask,
                negative_attention_mask, max_new_tokens, transcription, transcription_is_phonemes,
            )  # fmt: skip

    def denoiser(self, cond: generate.Conditions, guidance_scale: float) -> Denoiser:
        """The guided UNet as the samplers call it (``generate.guided_denoiser``), replayed from a CUDA graph
        with ``cuda_graphs``."""
        model = generate.guided_denoiser(self.unet, cond, guidance_scale)
        return fast_layer.CudaGraphDenoiser(model) if self.options.cuda_graphs else model

    def denoise(self, latents: Tensor, prompt_embeds: Tensor, attention_mask: Tensor,
                generated_prompt_embeds: Tensor, *, num_inference_steps: int, guidance_scale: float,
                sampler: str | SamplerFn = "ddim", eta: float = 0.0, generator: Generators = None,
                callback: Callable[[int, Tensor, Tensor], None] | None = None, start: int = 0) -> Tensor:  # fmt: skip
        """Run a sampler from step ``start`` (0: x_T) on ``latents``, already in the sampler's scale
        (``samplers.init_noise_sigma``, ``samplers.add_noise``), under the guided denoiser."""
        cond = generate.Conditions(
            prompt_embeds, attention_mask, generated_prompt_embeds, guidance_scale > 1.0
        )
        with self.residency.stage("unet"):
            model = self.denoiser(cond, guidance_scale)
            return sample(sampler, model, latents, self.scheduler_config, num_inference_steps, start=start, eta=eta,
                          generator=generator, callback=callback)  # fmt: skip

    def encode_audio(self, audio: str | Path | np.ndarray | Tensor, sample_rate: int | None = None, *,
                     sample: bool = False, generator: Generators = None) -> Tensor:  # fmt: skip
        """Audio (a file path, or a waveform with its ``sample_rate``; what ``audio.load_audio`` reads: any rate,
        mono or stereo, at most ``MAX_AUDIO_LENGTH_S``) -> latents (1, 8, t, 16) at the UNet's scale
        (``generate.encode_audio``: the input's length rounded up to a whole latent frame of 40 ms)."""
        editing.check_model(self.vocoder_config, self.vae_config)
        wave = audio_front_end.load_audio(audio, sample_rate, max_seconds=MAX_AUDIO_LENGTH_S)
        frames = audio_front_end.mel_frames(wave.shape[0], self.vae_config.scale_factor)
        with self.residency.stage("vae_encoder"):
            return generate.encode_audio(self.vae_encoder, wave, frames, sample=sample, generator=generator)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents (B, 8, t, 16) -> float32 waveforms (B, samples) at the vocoder's rate, untrimmed
        (``generate.decode``). On the CPU one waveform at a time: the same numbers, with one waveform's
        activations at the peak instead of B's."""
        parts = latents.split(1) if self.device.type == "cpu" else [latents]
        with self.residency.stage("vae", "vocoder"):
            return torch.cat([generate.decode(self.vae, self.vocoder, x) for x in parts])

    def score_waveforms(self, prompts: list[str], audio: Tensor, num_waveforms_per_prompt: int
                        ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """Order each prompt's candidates by CLAP text-audio similarity, best first: (audio, scores (P, N)),
        the scores the reference's ``logits_per_text``. Unlike diffusers, candidates are ranked within their own
        prompt's group only (diffusers issue 13602), ties kept in generation order."""
        fe = feature_extractor_config(self.ckpt.config("feature_extractor"))
        with self.residency.stage("tokenizer", "text_encoder"):
            tokens = self.tokenizer(prompts)
            text = self.text_encoder(tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device))
        resampled = audio_front_end.resample(audio.float().cpu(), self.sample_rate, fe.sampling_rate)
        features = audio_front_end.clap_features(resampled, fe)
        with self.residency.stage("clap_audio"):
            embeds = self.clap_audio(features.to(self.device, self.dtype))  # (P * N, D), unit norm
            logits = score(text.float(), embeds.float(), self.clap_audio.logit_scale_t.float())
        ranking = rank_within_prompts(logits, num_waveforms_per_prompt)
        return audio[ranking.order.reshape(-1).to(audio.device)], ranking.scores

    # ------------------------------------------------------------------------------- the call

    @property
    def sample_rate(self) -> int:
        return self.vocoder_config.sampling_rate

    @property
    def seconds_per_frame(self) -> float:
        """Seconds of audio per mel frame (the vocoder's hop over its rate: 0.01)."""
        return math.prod(self.vocoder_config.upsample_rates) / self.vocoder_config.sampling_rate

    @property
    def default_length(self) -> float:
        """The checkpoint's own length in seconds (10.24 for the official ones), as diffusers computes it."""
        return self.unet_config.sample_size * self.vae_config.scale_factor * self.seconds_per_frame

    @property
    def min_length(self) -> float:
        """The shortest length one latent frame covers (0.04 s)."""
        return self.seconds_per_frame * self.vae_config.scale_factor

    def latent_shape(self, audio_length_in_s: float, batch: int = 1) -> tuple[int, int, int, int]:
        """The shape of the latents a generation of ``audio_length_in_s`` starts from (``latents=``)."""
        return self._shape(self._frames(audio_length_in_s)[0], batch)

    def _shape(self, frames: int, batch: int) -> tuple[int, int, int, int]:
        s = self.vae_config.scale_factor
        return batch, self.unet_config.in_channels, frames // s, self.vocoder_config.model_in_dim // s

    @torch.inference_mode()
    def __call__(self, prompt: str | list[str] | None = None, audio_length_in_s: float | None = None,
                 num_inference_steps: int = 200, guidance_scale: float = 3.5,
                 negative_prompt: str | list[str] | None = None, num_waveforms_per_prompt: int = 1,
                 eta: float = 0.0, generator: Generators = None, latents: Tensor | None = None,
                 prompt_embeds: Tensor | None = None, negative_prompt_embeds: Tensor | None = None,
                 generated_prompt_embeds: Tensor | None = None,
                 negative_generated_prompt_embeds: Tensor | None = None, attention_mask: Tensor | None = None,
                 negative_attention_mask: Tensor | None = None, max_new_tokens: int | None = None,
                 output_type: str = "np", callback: Callable[[int, Tensor, Tensor], None] | None = None,
                 callback_steps: int = 1, *, sampler: str | SamplerFn = "ddim", rerank: bool | None = None,
                 transcription: str | list[str] | None = None, transcription_is_phonemes: bool = False,
                 audio: str | Path | np.ndarray | Tensor | None = None, audio_sample_rate: int | None = None,
                 strength: float | None = None, inpaint_spans_s: Sequence[tuple[float, float]] | None = None,
                 inpaint_bands_hz: Sequence[tuple[float, float]] | None = None, super_resolution: bool = False,
                 cutoff_hz: float | None = None, edit: AudioEdit | None = None) -> AudioOutput:  # fmt: skip
        """Generate audio; arguments as ``diffusers.AudioLDM2Pipeline.__call__`` (docs/api.md), plus ``sampler``
        (a name of ``request.SAMPLERS`` or a function), ``rerank``, the speech checkpoints' ``transcription`` and
        the audio-in arguments (docs/editing.md), which ``edit=`` may give as one ``request.AudioEdit``."""
        edit = edit or AudioEdit.from_arguments(audio, audio_sample_rate, strength, inpaint_spans_s,
                                                inpaint_bands_hz, super_resolution, cutoff_hz)  # fmt: skip
        request = GenerationRequest(prompt, audio_length_in_s, num_inference_steps, guidance_scale, negative_prompt,
                                    num_waveforms_per_prompt, eta, output_type, sampler, callback_steps, rerank,
                                    max_new_tokens, transcription, transcription_is_phonemes, edit,
                                    prompt_embeds is not None and generated_prompt_embeds is not None)  # fmt: skip
        self._check(request, latents)
        source = self._source(request) if edit is not None else None  # read and encoded before the text
        cond = generate.Conditions(*self.encode_prompt(
            prompt, None, num_waveforms_per_prompt, request.guided, negative_prompt, prompt_embeds,
            negative_prompt_embeds, generated_prompt_embeds, negative_generated_prompt_embeds, attention_mask,
            negative_attention_mask, max_new_tokens, transcription, transcription_is_phonemes), request.guided)  # fmt: skip
        frames, keep = (source.frames, source.keep) if source else self._frames(request.audio_length_in_s)
        shape, args = self._shape(frames, cond.batch), (self.scheduler_config, num_inference_steps, sampler)
        kw = dict(eta=eta, generator=generator, callback=_every(callback, callback_steps))
        with self.residency.stage("unet"):
            if source is None:
                x_T = randn(shape, generator, self.device, cond.t5.dtype) if latents is None else latents
                z = generate.text_to_audio(self.denoiser(cond, guidance_scale), self._fits(x_T, shape, cond),
                                           *args, **kw)  # fmt: skip
            else:  # the noise is the first draw, before any of the sampler's
                noise = randn(shape, generator, self.device, cond.t5.dtype)
                z0 = source.z0.to(cond.t5.dtype).expand(shape)
                z = generate.audio_to_audio(self.denoiser(cond, guidance_scale), z0, noise, *args[:2],
                                            source.start, sampler, mask=source.mask, **kw)  # fmt: skip
        return self._finish(z, keep, request)

    def _check(self, request: GenerationRequest, latents: Tensor | None) -> None:
        """The request's checks with this model's limits, before any model runs."""
        if request.edit is not None and latents is not None:
            raise UsageError("give latents or audio, not both: with audio the start is the input, noised")
        request.check(self.min_length if request.edit is None else 0.0)  # an input is padded to a whole frame
        schedule(
            request.sampler, self.scheduler_config, request.num_inference_steps
        )  # refuses counts it cannot run
        if request.edit is not None:
            editing.check_model(self.vocoder_config, self.vae_config)

    def _frames(self, audio_length_in_s: float | None) -> tuple[int, int]:
        """Mel frames to generate and samples to keep for a length (None: the checkpoint's)."""
        seconds = self.default_length if audio_length_in_s is None else audio_length_in_s
        return audio_shape(seconds, self.seconds_per_frame, self.vae_config.scale_factor, self.sample_rate)

    def _fits(self, x_T: Tensor, shape: tuple[int, ...], cond: generate.Conditions) -> Tensor:
        """A user's ``latents``, checked and cast as the conditions."""
        if tuple(x_T.shape) != shape:
            raise UsageError(f"latents have shape {tuple(x_T.shape)}; this request needs {shape}")
        return x_T.to(self.device, cond.t5.dtype)

    def _source(self, request: GenerationRequest) -> _Source:
        """An edit's input: read (``audio.load_audio``), cut to the asked length, encoded to z0; the step the
        sampler starts from and the latent mask (True = regenerate; None: style transfer)."""
        edit, s = request.edit, self.vae_config.scale_factor
        wave = audio_front_end.load_audio(edit.audio, edit.sample_rate, max_seconds=MAX_AUDIO_LENGTH_S)
        keep = (
            wave.shape[0]
            if request.audio_length_in_s is None
            else int(request.audio_length_in_s * self.sample_rate)
        )
        frames = audio_front_end.mel_frames(keep, s)
        mask = editing.latent_mask_of(edit, frames, s)
        with self.residency.stage("vae_encoder"):
            z0 = generate.encode_audio(self.vae_encoder, wave[:keep], frames)
        mask = None if mask is None else mask.to(self.device)[None, None]  # (1, 1, t, 16)
        return _Source(z0, frames, keep, edit.start_index(request.num_inference_steps), mask)

    def _finish(self, latents: Tensor, keep: int, request: GenerationRequest) -> AudioOutput:
        """Final latents -> the output: decoded, trimmed to ``keep`` samples, re-ranked if asked."""
        if request.output_type == "latent":
            return AudioOutput(audios=latents, sample_rate=self.sample_rate)
        audio, scores = self.decode(latents)[:, :keep], None
        if request.reranked:
            prompts = [request.prompt] if isinstance(request.prompt, str) else list(request.prompt)
            audio, scores = self.score_waveforms(prompts, audio, request.num_waveforms_per_prompt)
        return AudioOutput(
            audio.cpu().numpy() if request.output_type == "np" else audio, self.sample_rate, scores
        )


@dataclass(frozen=True)
class _Source:
    """The input of an edit, encoded."""

    z0: Tensor  # (1, 8, frames / 4, 16) its latents
    frames: int  # mel frames to encode and generate, a multiple of the VAE's scale
    keep: int  # output samples
    start: int  # the first step the sampler runs
    mask: Tensor | None  # (1, 1, frames / 4, 16) True = regenerate; None: style transfer


def _every(callback: Callable | None, steps: int) -> Callable | None:
    """``callback(i, t, x)`` every ``steps`` steps (diffusers' ``callback_steps``)."""
    if callback is None or steps == 1:
        return callback
    return lambda i, t, x: callback(i, t, x) if i % steps == 0 else None
