"""Text conditioning: prompts -> the UNet's two cross-attention conditions (diffusers' ``encode_prompt``).

Place in the AudioLDM 2 data flow, per prompt:

    prompt --tokenizer (RoBERTa)--> CLAP text encoder --> (B, 512), as a 1-token sequence   (B, 1, 512)
           --tokenizer_2 (T5)-----> Flan-T5 encoder ----> (B, L, 1024), mask (B, L)
    projection: [sos, CLAP, eos, sos_1, T5 states, eos_1]  (B, L + 5, 768), mask (B, L + 5)
    GPT-2 generate: max_new_tokens (8) states                                             (B, 8, 768)

and returns ``(prompt_embeds, attention_mask, generated_prompt_embeds)``: the T5 states (B', L, 1024) with
their mask (B', L), and the GPT-2 states (B', 8, 768). With classifier-free guidance the negative prompts'
conditions come first: rows ``[negative, positive]``, B' = 2 * B * num_waveforms_per_prompt; each prompt's
rows are repeated ``num_waveforms_per_prompt`` times in place (repeat_interleave).

Reference: diffusers ``AudioLDM2Pipeline.encode_prompt`` (pipelines/audioldm2/pipeline_audioldm2.py), with
the text checks of its ``check_inputs``. Same meaning, same numbers (to float32 rounding), same quirks:

- The T5 prompts are padded to the longest prompt of the batch (at most 128 tokens); the negative prompts
  are padded *or truncated* to that same length L (a negative prompt longer than the prompt loses its tail;
  we log a warning where diffusers is silent). With precomputed ``prompt_embeds``, L is their length.
- ``negative_prompt=None`` means empty strings: the unconditional branch encodes ``""``, it is not zeros.
- Precomputed ``prompt_embeds`` need ``generated_prompt_embeds``; a missing ``attention_mask`` means all
  ones. Likewise for the negative ones.

Where we differ on purpose (only for inputs diffusers rejects or silently ignores):
- A ``str`` negative prompt applies to every prompt of a list; a negative prompt also works with
  precomputed ``prompt_embeds`` (diffusers raises a TypeError for both).
- Passing both a prompt and the tensors it would replace (``generated_prompt_embeds``, ``attention_mask``,
  or the negative ones) is an error; diffusers silently recomputes them.

Efficiency, without changing the result (see tests/test_conditioning.py): the positive and negative prompts
go through every model in *one* batch (their T5 lengths are equal by construction, and the CLAP and GPT-2
inputs are the same shape); CLAP's input is padded to the longest prompt instead of 512 tokens, which with
the attention mask changes nothing but the work (RoBERTa pad tokens sit at the pad position and are never
attended to).

Left out on purpose: the VITS text encoder and ``transcription`` of the TTS checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .clap_text import ClapTextEncoder, load_clap_text
from .gpt2 import GPT2, generate, load_gpt2
from .loading import Checkpoint
from .projection import AudioLDM2Projection, load_projection
from .t5 import T5Encoder, load_t5
from .tokenization import TextTokenizer, load_tokenizer

__all__ = ["TextStack", "load_text_stack", "encode_prompt"]


@dataclass(frozen=True)
class TextStack:
    """Everything that turns text into conditions."""

    tokenizer: TextTokenizer  # RoBERTa, for CLAP
    tokenizer_2: TextTokenizer  # T5
    clap: ClapTextEncoder
    t5: T5Encoder
    projection: AudioLDM2Projection
    gpt2: GPT2
    max_new_tokens: int  # default GPT-2 continuation length (language_model config, 8)


def load_text_stack(
    ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> TextStack:
    """Load the two tokenizers and the four text models of a checkpoint."""
    gpt2 = load_gpt2(ckpt, dtype, device)
    return TextStack(
        tokenizer=load_tokenizer(ckpt, "tokenizer"),
        tokenizer_2=load_tokenizer(ckpt, "tokenizer_2"),
        clap=load_clap_text(ckpt, dtype, device),
        t5=load_t5(ckpt, dtype, device),
        projection=load_projection(ckpt, dtype, device),
        gpt2=gpt2,
        max_new_tokens=gpt2.cfg.max_new_tokens,
    )


def _dtype(module: nn.Module) -> torch.dtype:
    """A module's dtype as transformers reports it: that of its first parameter."""
    return next(module.parameters()).dtype


def _prompt_list(value: str | Sequence[str] | None, name: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        if not value:
            raise ValueError(f"`{name}` is an empty list")
        return list(value)
    raise TypeError(f"`{name}` must be a str or a list of str, got {type(value).__name__}: {value!r}")


def _check_tensor(t: torch.Tensor | None, name: str, ndim: int) -> None:
    if t is not None and (not isinstance(t, torch.Tensor) or t.ndim != ndim):
        what = f"a {t.ndim}-D tensor" if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"`{name}` must be a {ndim}-D tensor, got {what}")


def _encode_texts(
    stack: TextStack,
    texts: list[str],
    t5_ids: torch.Tensor,
    t5_mask: torch.Tensor,
    device: torch.device,
    max_new_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """N prompts (and their T5 tokens (N, L)) -> T5 states (N, L, d_t5), GPT-2 states (N, new, d_lm)."""
    clap_tokens = stack.tokenizer(texts)  # padded to the longest, not to 512: same result, less work
    clap = stack.clap(clap_tokens.input_ids.to(device), clap_tokens.attention_mask.to(device))  # (N, 512)
    t5_mask = t5_mask.to(device)
    t5_states = stack.t5(t5_ids.to(device), t5_mask)  # (N, L, 1024)
    # CLAP is a single vector per prompt: a one-token sequence, always attended to
    hidden, mask = stack.projection(clap[:, None, :], t5_states, t5_mask.new_ones(len(texts), 1), t5_mask)
    return t5_states, generate(stack.gpt2, hidden, mask, max_new_tokens)


def encode_prompt(
    stack: TextStack,
    prompt: str | Sequence[str] | None,
    device: torch.device | str,
    num_waveforms_per_prompt: int = 1,
    do_classifier_free_guidance: bool = True,
    negative_prompt: str | Sequence[str] | None = None,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    generated_prompt_embeds: torch.Tensor | None = None,
    negative_generated_prompt_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    negative_attention_mask: torch.Tensor | None = None,
    max_new_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode prompts into ``(prompt_embeds, attention_mask, generated_prompt_embeds)`` as diffusers does.

    Shapes (B prompts, n = num_waveforms_per_prompt, g = 2 with guidance, else 1): T5 states
    (g * B * n, L, d_t5), their mask (g * B * n, L) int64, GPT-2 states (g * B * n, max_new_tokens, d_lm);
    with guidance the first B * n rows are the negative prompts'. See the module docstring for the rules.
    """
    device = torch.device(device)
    prompts = _prompt_list(prompt, "prompt")
    negatives = _prompt_list(negative_prompt, "negative_prompt")
    for t, name, ndim in (
        (prompt_embeds, "prompt_embeds", 3),
        (negative_prompt_embeds, "negative_prompt_embeds", 3),
        (generated_prompt_embeds, "generated_prompt_embeds", 3),
        (negative_generated_prompt_embeds, "negative_generated_prompt_embeds", 3),
        (attention_mask, "attention_mask", 2),
        (negative_attention_mask, "negative_attention_mask", 2),
    ):
        _check_tensor(t, name, ndim)
    if isinstance(num_waveforms_per_prompt, bool) or not isinstance(num_waveforms_per_prompt, int):
        raise TypeError(f"`num_waveforms_per_prompt` must be an int, got {num_waveforms_per_prompt!r}")
    if num_waveforms_per_prompt < 1:
        raise ValueError(f"`num_waveforms_per_prompt` must be at least 1, got {num_waveforms_per_prompt}")
    max_new_tokens = stack.max_new_tokens if max_new_tokens is None else max_new_tokens
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be a positive int, got {max_new_tokens!r}")

    # --- which side comes from text, which from tensors
    if prompts is not None:
        if prompt_embeds is not None or generated_prompt_embeds is not None or attention_mask is not None:
            raise ValueError(
                "pass either `prompt` or precomputed `prompt_embeds` + `generated_prompt_embeds` (+ optional "
                "`attention_mask`), not both"
            )
    elif prompt_embeds is None or generated_prompt_embeds is None:
        raise ValueError("pass `prompt`, or both `prompt_embeds` and `generated_prompt_embeds`")
    batch_size = len(prompts) if prompts is not None else prompt_embeds.shape[0]

    negative_from_text = do_classifier_free_guidance and negative_prompt_embeds is None
    if do_classifier_free_guidance:
        if negative_prompt_embeds is not None:
            if negatives is not None:
                raise ValueError("pass either `negative_prompt` or `negative_prompt_embeds`, not both")
            if negative_generated_prompt_embeds is None:
                raise ValueError("`negative_prompt_embeds` needs `negative_generated_prompt_embeds`")
        elif negative_generated_prompt_embeds is not None or negative_attention_mask is not None:
            raise ValueError(
                "`negative_generated_prompt_embeds` / `negative_attention_mask` need `negative_prompt_embeds`"
            )
        if negative_from_text:
            if negatives is None:
                negatives = [""] * batch_size  # the unconditional branch encodes empty prompts
            elif len(negatives) == 1 and batch_size > 1 and isinstance(negative_prompt, str):
                negatives = negatives * batch_size
            if len(negatives) != batch_size:
                raise ValueError(
                    f"`negative_prompt` has batch size {len(negatives)}, but `prompt` has batch size "
                    f"{batch_size}; they must match"
                )

    # --- tokenize; the negative T5 tokens take the prompt's T5 length
    texts: list[str] = []
    t5_tokens = []
    if prompts is not None:
        tokens = stack.tokenizer_2(prompts)  # padded to the longest prompt, at most model_max_length
        seq_len = tokens.input_ids.shape[1]
        texts, t5_tokens = prompts, [tokens]
    else:
        seq_len = prompt_embeds.shape[1]
    if negative_from_text:
        note = " (the prompt's T5 length; diffusers pads or truncates negative prompts to it)"
        tokens = stack.tokenizer_2(negatives, padding="max_length", max_length=seq_len, truncation_note=note)
        texts, t5_tokens = negatives + texts, [tokens] + t5_tokens  # negative rows first

    # --- encode both sides in one batch: N = (B if negative from text) + (B if prompt from text)
    if texts:
        t5_ids = torch.cat([t.input_ids for t in t5_tokens])
        t5_mask = torch.cat([t.attention_mask for t in t5_tokens])
        states, generated = _encode_texts(stack, texts, t5_ids, t5_mask, device, max_new_tokens)
        t5_mask = t5_mask.to(device)
        if prompts is not None:  # the last B rows
            prompt_embeds, attention_mask = states[-batch_size:], t5_mask[-batch_size:]
            generated_prompt_embeds = generated[-batch_size:]
        if negative_from_text:  # the first B rows
            negative_prompt_embeds, negative_attention_mask = states[:batch_size], t5_mask[:batch_size]
            negative_generated_prompt_embeds = generated[:batch_size]

    t5_dtype, lm_dtype = _dtype(stack.t5), _dtype(stack.gpt2)

    def finish(
        embeds: torch.Tensor, mask: torch.Tensor | None, generated: torch.Tensor, side: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if embeds.shape[0] != batch_size or generated.shape[0] != batch_size:
            raise ValueError(
                f"{side} batch sizes differ: embeds {tuple(embeds.shape)}, generated {tuple(generated.shape)}, "
                f"expected {batch_size} rows"
            )
        if embeds.shape[1] != seq_len:
            raise ValueError(f"{side} embeds have {embeds.shape[1]} positions, the prompt's have {seq_len}")
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=device)
        elif mask.shape != embeds.shape[:2]:
            raise ValueError(
                f"{side} attention mask {tuple(mask.shape)} does not match embeds {tuple(embeds.shape)}"
            )
        n = num_waveforms_per_prompt
        return (
            embeds.to(device=device, dtype=t5_dtype).repeat_interleave(n, dim=0),  # (B * n, L, d_t5)
            mask.to(device=device).repeat_interleave(n, dim=0),  # (B * n, L)
            generated.to(device=device, dtype=lm_dtype).repeat_interleave(n, dim=0),  # (B * n, new, d_lm)
        )

    out = finish(prompt_embeds, attention_mask, generated_prompt_embeds, "prompt")
    if not do_classifier_free_guidance:
        return out
    negative = finish(
        negative_prompt_embeds, negative_attention_mask, negative_generated_prompt_embeds, "negative"
    )
    if negative[0].shape != out[0].shape or negative[2].shape != out[2].shape:
        raise ValueError(
            f"negative and positive conditions differ in shape: {tuple(negative[0].shape)} vs "
            f"{tuple(out[0].shape)}, {tuple(negative[2].shape)} vs {tuple(out[2].shape)}"
        )
    return tuple(torch.cat([neg, pos]) for neg, pos in zip(negative, out, strict=True))  # type: ignore[return-value]
