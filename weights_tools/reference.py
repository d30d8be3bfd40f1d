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
    # The checkpoint's own scheduler, kept: a swapped-in scheduler's config carries its options (e.g.
    # use_karras_sigmas) through the next from_config, so every swap starts from this one.
    pipe.hub_scheduler = pipe.scheduler
    return pipe


# Each of our sampler names -> the diffusers scheduler it equals, built as
# ``<class>.from_config(<the checkpoint's DDIM config>, **options)`` (as a diffusers user swaps samplers).
DIFFUSERS_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp-2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp-2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp-2m-sde-karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "dpmpp-2s": ("DPMSolverSinglestepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "kdpm2": ("KDPM2DiscreteScheduler", {}),
    "kdpm2-a": ("KDPM2AncestralDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
}
_ALIASES = {"dpmpp": "dpmpp-2m", "dpmpp-karras": "dpmpp-2m-karras"}  # the names older callers use


def diffusers_scheduler(name: str, config: dict[str, Any]):
    """The diffusers scheduler our sampler ``name`` equals, built from a DDIM scheduler config."""
    import diffusers

    cls, options = DIFFUSERS_SCHEDULERS[_ALIASES.get(name, name)]
    base = diffusers.DDIMScheduler.from_config(config)
    return getattr(diffusers, cls).from_config(base.config, **options)


def run_reference(
    path: str | Path, prompt=None, *, seed: int | None = 0, sampler: str = "ddim", **kwargs: Any
):
    """Run the reference pipeline and return its intermediates and output as a dict of tensors.

    Keys: ``prompt_embeds``, ``attention_mask``, ``generated_prompt_embeds`` (what encode_prompt returned,
    CFG-concatenated), ``timesteps``, ``initial_latents``, ``latents`` (final, before the VAE scaling),
    ``mel`` (VAE output), ``waveform_full`` (vocoder output before trimming), ``audio`` (the pipeline's
    output, float32 tensor). ``sampler``: one of our sampler names (``DIFFUSERS_SCHEDULERS``; "dpmpp" and
    "dpmpp-karras" also stand for "dpmpp-2m(-karras)"); the pipeline gets that diffusers scheduler.
    """
    pipe = reference_pipeline(str(path))
    if _ALIASES.get(sampler, sampler) not in DIFFUSERS_SCHEDULERS:
        raise ValueError(sampler)
    pipe.scheduler = diffusers_scheduler(sampler, pipe.hub_scheduler.config)

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
