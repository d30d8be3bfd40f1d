"""The parity oracle: diffusers' ``AudioLDM2Pipeline`` run on a checkpoint folder, with its intermediates.

Used by the tests (through ``tests/oracle.py``) and by ``audioldm2-weights parity``; it needs the test extra
(diffusers, transformers). Two known traps of the reference stack are handled here and nowhere else:
- the hub's ``language_model`` is a ``GPT2Model``, which crashes diffusers' ``generate_language_model`` under
  transformers 5 (it needs a ``GenerationMixin``); the same file is loaded as ``GPT2LMHeadModel`` (whose
  ``transformer`` is that GPT2Model; the missing ``lm_head`` is tied to ``wte`` and never used) and passed in;
- the CLAP config says ``torch_dtype: float64``, so float32 is forced.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch


@functools.lru_cache(maxsize=4)
def reference_pipeline(path: str | Path):
    """diffusers' pipeline for a checkpoint folder, in float32 on the CPU (cached per folder)."""
    from diffusers import AudioLDM2Pipeline
    from transformers import GPT2LMHeadModel

    lm = GPT2LMHeadModel.from_pretrained(path, subfolder="language_model", dtype=torch.float32)
    pipe = AudioLDM2Pipeline.from_pretrained(path, language_model=lm, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_reference(
    path: str | Path, prompt=None, *, seed: int | None = 0, sampler: str = "ddim", **kwargs: Any
):
    """Run the reference pipeline and return its intermediates and output as a dict of tensors.

    Keys: ``prompt_embeds``, ``attention_mask``, ``generated_prompt_embeds`` (what encode_prompt returned,
    CFG-concatenated), ``timesteps``, ``initial_latents``, ``latents`` (final, before the VAE scaling),
    ``mel`` (VAE output), ``waveform_full`` (vocoder output before trimming), ``audio`` (the pipeline's
    output, float32 tensor). ``sampler``: "ddim" (the hub scheduler) or "dpmpp" / "dpmpp-karras"
    (``DPMSolverMultistepScheduler.from_config`` of it).
    """
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    pipe = reference_pipeline(str(path))
    base = DDIMScheduler.from_config(pipe.scheduler.config)
    if sampler == "ddim":
        pipe.scheduler = base
    elif sampler in ("dpmpp", "dpmpp-karras"):
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(
            base.config, use_karras_sigmas=sampler == "dpmpp-karras"
        )
    else:
        raise ValueError(sampler)

    out: dict[str, Any] = {}
    encode, decode, vocode, prepare = (
        pipe.encode_prompt,
        pipe.vae.decode,
        pipe.vocoder.forward,
        pipe.prepare_latents,
    )

    def encode_prompt(*a, **k):
        r = encode(*a, **k)
        out["prompt_embeds"], out["attention_mask"], out["generated_prompt_embeds"] = (t.clone() for t in r)
        return r

    def prepare_latents(*a, **k):
        r = prepare(*a, **k)
        out["initial_latents"] = r.clone()
        out["timesteps"] = pipe.scheduler.timesteps.clone()
        return r

    def vae_decode(z, *a, **k):
        out["latents"] = (z * pipe.vae.config.scaling_factor).clone()
        r = decode(z, *a, **k)
        out["mel"] = r.sample.clone()
        return r

    def vocoder(x, *a, **k):
        r = vocode(x, *a, **k)
        out["waveform_full"] = r.clone()
        return r

    pipe.encode_prompt, pipe.prepare_latents = encode_prompt, prepare_latents
    pipe.vae.decode, pipe.vocoder.forward = vae_decode, vocoder
    try:
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            audio = pipe(prompt, generator=generator, output_type="pt", **kwargs).audios
    finally:
        del pipe.encode_prompt, pipe.prepare_latents, pipe.vae.decode, pipe.vocoder.forward
    out["audio"] = audio
    return out
