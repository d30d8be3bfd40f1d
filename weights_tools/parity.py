"""``audioldm2-weights parity PATH_OR_REPO_ID``: this stack against diffusers on one checkpoint, stage by stage.

The reference is ``weights_tools.reference.reference_pipeline`` (diffusers' ``AudioLDM2Pipeline`` in float32
on the CPU, with the ``GPT2LMHeadModel`` substitution transformers 5 needs). Each component stage feeds
*the reference's* inputs to both sides, so a stage's error is that component's alone:

    tokenizers   the prompt and "" (the unconditional branch): ids and masks, exact
                 (speech checkpoints: CLAP's tokens and the transcription's phoneme ids and mask)
    clap         CLAP text embedding of those tokens
    t5           Flan-T5 states (speech: ``vits``, the phoneme states, with diffusers' end token written)
    projection   the GPT-2 input sequence, from the reference's CLAP and T5 outputs
    gpt2         the 8 generated states, from the reference's projection
    unet         one denoiser call on seeded latents at t = T/2, with the reference's conditions
    vae          decoding seeded latents to a mel spectrogram
    vocoder      the reference's mel to a waveform
    gen-latents  the whole pipeline, same seed and settings: the latents the sampler ends with
    gen-audio    ... and the audio (a tiny random vocoder hardly depends on its input: hence both)

Each stage prints the max abs error and the relative L2 error ``||ours - ref|| / ||ref||`` against the
project's tolerances (1e-5 per component, 1e-4 for the whole generation, 0 for token ids), in float32. A
stage that cannot run (a weight that does not load, a shape that differs) fails with its error. Exit
status 1 when any stage fails. Needs the test extra (diffusers, transformers).

On a speech checkpoint (``anhnct/audioldm2_gigaspeech``, ``_ljspeech``) the ``--transcription`` is spoken
(``--phonemes``: it is IPA, read as it is by both sides; otherwise both phonemise it with espeak-ng), the
projection gets the VITS states beside the unconditional branch's zeros, and GPT-2 generates
``--max-new-tokens`` states (default: the checkpoint's, 512 for these: a minute or two for the reference).

Both sides load the same files, so a checkpoint whose weights are wrong passes if both read them alike:
this checks the implementation on these weights, not the weights.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from audioldm2_core import (
    clap_text,
    conditioning,
    gpt2,
    pipeline,
    projection,
    t5,
    tokenization,
    unet,
    vae,
    vits,
    vocoder,
)
from audioldm2_core.config import unet_config, vae_config, vocoder_config
from audioldm2_core.loading import open_checkpoint
from audioldm2_core.samplers import SAMPLERS

from . import ToolError

COMPONENT_TOL = 1e-5
GENERATION_TOL = 1e-4


@dataclass
class Stage:
    name: str
    tolerance: float
    max_abs: float | None = None
    rel_l2: float | None = None
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and self.rel_l2 is not None and self.rel_l2 <= self.tolerance


@dataclass(frozen=True)
class Settings:
    prompt: str = "a dog barks in the rain"
    steps: int = 3
    seconds: float = 2.0
    guidance_scale: float = 3.5
    seed: int = 0
    sampler: str = "ddim"
    transcription: str = "Hello world, this is a test."  # speech checkpoints only
    transcription_is_phonemes: bool = False
    max_new_tokens: int | None = None  # None: the checkpoint's (language_model config)


def errors(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max abs error, relative L2 error), in float64; shapes must agree."""
    if tuple(ours.shape) != tuple(ref.shape):
        raise ValueError(f"shape {tuple(ours.shape)}, reference {tuple(ref.shape)}")
    diff = ours.detach().double().cpu() - ref.detach().double().cpu()
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    denom = ref.detach().double().norm().item()
    return max_abs, diff.norm().item() / denom if denom > 0 else diff.norm().item()


def _reference():
    try:
        from .reference import reference_pipeline, run_reference
    except ImportError as e:
        raise ToolError(f"parity needs diffusers and transformers (the test extra): {e}") from e
    return reference_pipeline, run_reference


@torch.no_grad()
def run_parity(
    path_or_repo_id: str,
    settings: Settings = Settings(),
    revision: str | None = None,
    on_stage: Callable[[Stage], None] | None = None,
) -> list[Stage]:
    """Run every stage (see the module docstring); ``on_stage`` is called as each one finishes."""
    if settings.sampler not in SAMPLERS:
        raise ToolError(f"unknown sampler {settings.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    ckpt = open_checkpoint(path_or_repo_id, revision)
    reference_pipeline, run_reference = _reference()
    ref = reference_pipeline(str(ckpt.root))
    stages: list[Stage] = []

    def stage(name: str, ours: Callable[[], Any], want: Any, tol: float = COMPONENT_TOL) -> None:
        s = Stage(name, tol)
        try:
            got = ours()
            pairs = list(zip(got, want, strict=True)) if isinstance(want, tuple) else [(got, want)]
            measured = [errors(a, b) for a, b in pairs]
            if not all(math.isfinite(v) for m in measured for v in m):
                raise ValueError("non-finite values (NaN or inf) in the output")
            s.max_abs = max(m[0] for m in measured)
            s.rel_l2 = max(m[1] for m in measured)
        except Exception as e:  # the stage fails with its error; the others still run
            s.error = " ".join(f"{type(e).__name__}: {e}".split())
        stages.append(s)
        if on_stage is not None:
            on_stage(s)

    texts = [settings.prompt, ""]  # the prompt and the unconditional branch, as guidance batches them
    new_tokens = settings.max_new_tokens or ckpt.config("language_model").get("max_new_tokens", 8)
    if ckpt.is_speech:
        return _run_speech(ckpt, ref, run_reference, settings, texts, new_tokens, stage, stages)
    tok = ref.tokenizer(
        texts,
        padding="max_length",
        max_length=ref.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    tok_2 = ref.tokenizer_2(
        texts, padding=True, max_length=ref.tokenizer_2.model_max_length, truncation=True, return_tensors="pt"
    )

    def our_tokens():
        a = tokenization.load_tokenizer(ckpt, "tokenizer")(texts, padding="max_length")
        b = tokenization.load_tokenizer(ckpt, "tokenizer_2")(texts)
        return a.input_ids, a.attention_mask, b.input_ids, b.attention_mask

    want = (tok.input_ids, tok.attention_mask, tok_2.input_ids, tok_2.attention_mask)
    stage("tokenizers", our_tokens, want, tol=0.0)

    clap_ref = ref.text_encoder.get_text_features(tok.input_ids, attention_mask=tok.attention_mask)
    clap_ref = getattr(clap_ref, "pooler_output", clap_ref)  # transformers 5 returns an output object
    stage("clap", lambda: clap_text.load_clap_text(ckpt)(tok.input_ids, tok.attention_mask), clap_ref)

    t5_ref = ref.text_encoder_2(tok_2.input_ids, attention_mask=tok_2.attention_mask).last_hidden_state
    stage("t5", lambda: t5.load_t5(ckpt)(tok_2.input_ids, tok_2.attention_mask), t5_ref)

    one = tok_2.attention_mask.new_ones(len(texts), 1)  # CLAP is a one-token sequence, always attended
    proj = ref.projection_model(
        hidden_states=clap_ref[:, None, :],
        hidden_states_1=t5_ref,
        attention_mask=one,
        attention_mask_1=tok_2.attention_mask,
    )
    stage(
        "projection",
        lambda: projection.load_projection(ckpt)(clap_ref[:, None, :], t5_ref, one, tok_2.attention_mask),
        (proj.hidden_states, proj.attention_mask),
    )

    gen_ref = ref.generate_language_model(
        proj.hidden_states, attention_mask=proj.attention_mask, max_new_tokens=new_tokens
    )
    stage(
        "gpt2",
        lambda: gpt2.generate(gpt2.load_gpt2(ckpt), proj.hidden_states, proj.attention_mask, new_tokens),
        gen_ref,
    )

    _decoder_and_generation_stages(
        ckpt,
        ref,
        run_reference,
        settings,
        stage,
        gen_ref,
        t5_ref,
        tok_2.attention_mask,
        len(texts),
        new_tokens,
    )
    return stages


def _decoder_and_generation_stages(
    ckpt,
    ref,
    run_reference,
    settings: Settings,
    stage,
    gen_ref,
    states_1,
    mask_1,
    batch: int,
    new_tokens: int,
) -> None:
    """unet, vae, vocoder, gen-latents, gen-audio: the same for every checkpoint family."""
    u_cfg = unet_config(ckpt.config("unet"))
    v_cfg = vae_config(ckpt.config("vae"))
    voc_cfg = vocoder_config(ckpt.config("vocoder"))
    factor = math.prod(voc_cfg.upsample_rates) / voc_cfg.sampling_rate
    frames, _ = pipeline.audio_shape(settings.seconds, factor, v_cfg.scale_factor, voc_cfg.sampling_rate)
    latent_hw = (frames // v_cfg.scale_factor, voc_cfg.model_in_dim // v_cfg.scale_factor)
    g = torch.Generator().manual_seed(settings.seed)
    x = torch.randn((batch, u_cfg.in_channels, *latent_hw), generator=g)
    t = torch.tensor(ckpt.config("scheduler").get("num_train_timesteps", 1000) // 2)
    cond = dict(
        encoder_hidden_states=gen_ref, encoder_hidden_states_1=states_1, encoder_attention_mask_1=mask_1
    )
    stage("unet", lambda: unet.load_unet(ckpt)(x, t, **cond), ref.unet(x, t, **cond).sample)

    z = torch.randn((1, v_cfg.latent_channels, *latent_hw), generator=g)
    mel_ref = ref.vae.decode(1 / ref.vae.config.scaling_factor * z).sample  # as the pipeline calls it
    stage("vae", lambda: vae.load_vae(ckpt).decode(z), mel_ref)
    stage("vocoder", lambda: vocoder.load_vocoder(ckpt)(mel_ref.squeeze(1)), ref.vocoder(mel_ref.squeeze(1)))

    kw: dict[str, Any] = dict(
        num_inference_steps=settings.steps,
        audio_length_in_s=settings.seconds,
        guidance_scale=settings.guidance_scale,
        max_new_tokens=new_tokens,
    )
    ours_kw: dict[str, Any] = {}
    if ckpt.is_speech:
        kw["transcription"] = settings.transcription
        ours_kw["transcription_is_phonemes"] = settings.transcription_is_phonemes
    with _reading_phonemes(ref, settings):
        want = run_reference(ckpt.root, settings.prompt, seed=settings.seed, sampler=settings.sampler, **kw)
    got: dict[str, Any] = {}

    def generate(key: str) -> torch.Tensor:
        if not got:  # one run of ours serves both stages; a failure fails both
            try:
                pipe = pipeline.AudioLDM2(ckpt)
                g = torch.Generator().manual_seed(settings.seed)
                last = lambda i, t, x: got.update(latents=x.clone())  # noqa: E731  x after the last step
                out = pipe(
                    settings.prompt, generator=g, sampler=settings.sampler, callback=last, **kw, **ours_kw
                )
                got["audio"] = torch.from_numpy(out.audios)
            except Exception as e:
                got["error"] = e
        if "error" in got:
            raise got["error"]
        return got[key]

    # The denoised latents as well as the audio: a tiny random vocoder's output hardly depends on its input.
    stage("gen-latents", lambda: generate("latents"), want["latents"], tol=GENERATION_TOL)
    stage("gen-audio", lambda: generate("audio"), want["audio"], tol=GENERATION_TOL)


@contextlib.contextmanager
def _reading_phonemes(ref, settings: Settings):
    """With ``transcription_is_phonemes``, the reference's VitsTokenizer reads the IPA as it is (neither
    normalised nor phonemised), as ours does."""
    tok = ref.tokenizer_2
    if not (settings.transcription_is_phonemes and hasattr(tok, "phonemize")):
        yield
        return
    saved = tok.phonemize, tok.normalize
    tok.phonemize = tok.normalize = False
    try:
        yield
    finally:
        tok.phonemize, tok.normalize = saved


def _run_speech(ckpt, ref, run_reference, settings: Settings, texts, new_tokens: int, stage, stages) -> list:
    """The stages of a speech checkpoint: VITS phonemes in T5's place (diffusers' ``encode_prompt``)."""
    tok = ref.tokenizer(
        texts,
        padding="max_length",
        max_length=ref.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    max_len = ref.tokenizer_2.model_max_length
    with _reading_phonemes(ref, settings):
        phon = ref.tokenizer_2(
            [settings.transcription],
            padding="max_length",
            max_length=max_len,
            truncation=True,
            return_tensors="pt",
        )

    def our_tokens():
        a = tokenization.load_tokenizer(ckpt, "tokenizer")(texts, padding="max_length")
        b = tokenization.load_tokenizer(ckpt, "tokenizer_2")(
            [settings.transcription], is_phonemes=settings.transcription_is_phonemes
        )
        return a.input_ids, a.attention_mask, b.input_ids, b.attention_mask

    stage(
        "tokenizers",
        our_tokens,
        (tok.input_ids, tok.attention_mask, phon.input_ids, phon.attention_mask),
        0.0,
    )

    clap_ref = ref.text_encoder.get_text_features(tok.input_ids, attention_mask=tok.attention_mask)
    clap_ref = getattr(clap_ref, "pooler_output", clap_ref)
    stage("clap", lambda: clap_text.load_clap_text(ckpt)(tok.input_ids, tok.attention_mask), clap_ref)

    ids, mask = conditioning.mark_phoneme_end(phon.input_ids, phon.attention_mask)  # diffusers' end token
    vits_ref = ref.text_encoder_2.text_encoder(ids, attention_mask=mask, padding_mask=mask.unsqueeze(-1))[0]
    stage("vits", lambda: vits.load_vits(ckpt)(ids, mask), vits_ref)

    # rows [prompt, ""]: the unconditional branch's phoneme states and mask are zeros (float mask)
    states_1 = torch.cat([vits_ref, torch.zeros_like(vits_ref)])
    mask_1 = torch.cat([mask, torch.zeros(mask.shape, dtype=vits_ref.dtype)])
    one = tok.attention_mask.new_ones(len(texts), 1)
    proj = ref.projection_model(
        hidden_states=clap_ref[:, None, :],
        hidden_states_1=states_1,
        attention_mask=one,
        attention_mask_1=mask_1,
    )
    stage(
        "projection",
        lambda: projection.load_projection(ckpt)(clap_ref[:, None, :], states_1, one, mask_1),
        (proj.hidden_states, proj.attention_mask),
    )
    gen_ref = ref.generate_language_model(
        proj.hidden_states, attention_mask=proj.attention_mask, max_new_tokens=new_tokens
    )
    stage(
        "gpt2",
        lambda: gpt2.generate(gpt2.load_gpt2(ckpt), proj.hidden_states, proj.attention_mask, new_tokens),
        gen_ref,
    )
    _decoder_and_generation_stages(
        ckpt, ref, run_reference, settings, stage, gen_ref, states_1, mask_1, len(texts), new_tokens
    )
    return stages


def _fmt(v: float | None) -> str:
    return "-" if v is None else "0" if v == 0 else f"{v:.2e}"


def format_stage(s: Stage) -> str:
    line = f"{s.name:<12} {_fmt(s.max_abs):>10} {_fmt(s.rel_l2):>10} {_fmt(s.tolerance):>9}  "
    return line + ("pass" if s.passed else "FAIL" + (f": {s.error}" if s.error else ""))


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = Settings()
    p.add_argument("checkpoint", help="checkpoint folder or hub repo id")
    p.add_argument("--revision", default=None, help="hub revision (repo ids only)")
    p.add_argument("--prompt", default=d.prompt, help=f"text prompt (default: {d.prompt!r})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"sampler steps (default: {d.steps})")
    p.add_argument("--seconds", type=float, default=d.seconds, help=f"audio length (default: {d.seconds})")
    p.add_argument("--guidance-scale", type=float, default=d.guidance_scale, help="guidance (default: 3.5)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed for latents and noise (default: {d.seed})")
    p.add_argument("--sampler", default=d.sampler, choices=list(SAMPLERS), help="sampler (default: ddim)")
    p.add_argument(
        "--transcription",
        default=d.transcription,
        help=f"speech checkpoints: the words to speak (default: {d.transcription!r})",
    )
    p.add_argument("--phonemes", action="store_true", help="speech: --transcription is IPA (no espeak-ng)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="GPT-2 states to generate (default: the checkpoint's)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def run(args: argparse.Namespace) -> int:
    settings = Settings(
        prompt=args.prompt,
        steps=args.steps,
        seconds=args.seconds,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        sampler=args.sampler,
        transcription=args.transcription,
        transcription_is_phonemes=args.phonemes,
        max_new_tokens=args.max_new_tokens,
    )
    if settings.steps < 1 or not settings.seconds > 0:
        raise ToolError("--steps must be at least 1 and --seconds positive")
    if settings.max_new_tokens is not None and settings.max_new_tokens < 1:
        raise ToolError("--max-new-tokens must be at least 1")
    try:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging
    except ImportError as e:
        raise ToolError(f"parity needs diffusers and transformers (the test extra): {e}") from e
    diffusers_logging.disable_progress_bar()  # the reference's loading bars would bury the table
    transformers_logging.disable_progress_bar()
    on_stage = None
    if not args.json:
        s = settings
        print(
            f"parity of {args.checkpoint} with diffusers, float32 on the CPU: prompt {s.prompt!r}, "
            f"{s.steps} {s.sampler} steps, {s.seconds} s, guidance {s.guidance_scale}, seed {s.seed}"
        )
        print(f"{'stage':<12} {'max abs':>10} {'rel L2':>10} {'tolerance':>9}  result")
        on_stage = lambda s: print(format_stage(s), flush=True)  # noqa: E731
    stages = run_parity(args.checkpoint, settings, args.revision, on_stage)
    failed = [s.name for s in stages if not s.passed]
    if args.json:
        out = {
            "checkpoint": args.checkpoint,
            "settings": asdict(settings),
            "passed": not failed,
            "stages": [{**asdict(s), "passed": s.passed} for s in stages],
        }
        json.dump(out, sys.stdout, indent=2)
        print()
    else:
        print(f"FAIL: {', '.join(failed)}" if failed else f"PASS: all {len(stages)} stages within tolerance")
    return 1 if failed else 0
