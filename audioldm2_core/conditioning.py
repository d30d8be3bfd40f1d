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

Speech checkpoints (``anhnct/audioldm2_gigaspeech``, ``_ljspeech``; ``stack.speech``): the second stream is
the ``transcription``'s phonemes through the VITS encoder (``vits.py``) instead of the prompt through T5, as
diffusers does it when ``text_encoder_2`` is a ``VitsModel``:

    transcription --PhonemeTokenizer--> ids (B, 310), padded; the end token 182 written over the first id 0
                  --VITS encoder------> (B, 310, 192), mask (B, 310)
    projection: [sos, CLAP, eos, sos_1, VITS states + learned positions, eos_1]  (B, 315, 768)
    GPT-2 generate: max_new_tokens (the checkpoint's 512) states

- "The first id 0": with ``add_blank`` every other id is the blank 0, so the end token lands on position 0
  (the leading blank), not after the phonemes; without it, on the first pad. Either way it is what diffusers
  does (its loop looks for the value 0, not for padding), so it is what the checkpoints were converted for.
- The negative branch does not encode anything through VITS: its phoneme states are zeros (B, 310, 192) and
  its mask is zeros in the encoder's float dtype (diffusers' ``torch.zeros(...).to(dtype)``), so the guidance
  batch's mask is float; the CLAP half still encodes the negative prompt ("" by default). GPT-2 then
  generates ``max_new_tokens`` states for both halves.
- The returned ``prompt_embeds`` / ``attention_mask`` are the VITS states and phoneme mask (what diffusers
  returns); the speech UNet (``[[None, 768]]``) never reads them.
- ``transcription`` (str or list, one per prompt) is required for a speech checkpoint when the prompt is
  text, and an error for any other checkpoint; with precomputed ``prompt_embeds`` it is not needed (diffusers
  asks for it anyway, and ignores it). ``transcription_is_phonemes=True`` takes it as IPA already
  (no espeak-ng needed); otherwise the checkpoint's tokenizer normalises and phonemises it (``tokenization.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .clap_text import ClapTextEncoder, load_clap_text
from .errors import UsageError, UsageTypeError
from .gpt2 import GPT2, generate, load_gpt2
from .loading import Checkpoint
from .projection import AudioLDM2Projection, load_projection
from .t5 import T5Encoder, load_t5
from .tokenization import PhonemeTokenizer, TextTokenizer, load_tokenizer
from .vits import VitsPhonemeEncoder, load_vits

__all__ = ["TextStack", "load_text_stack", "encode_prompt", "mark_phoneme_end", "PHONEME_END_ID"]

# diffusers writes this id over the first 0 of each phoneme row (hard-coded: the last of the speech
# checkpoints' 183 VITS symbols)
PHONEME_END_ID = 182


@dataclass(frozen=True)
class TextStack:
    """Everything that turns text into conditions."""

    tokenizer: TextTokenizer  # RoBERTa, for CLAP
    tokenizer_2: TextTokenizer | PhonemeTokenizer  # T5; speech checkpoints: VITS phonemes
    clap: ClapTextEncoder
    t5: T5Encoder | VitsPhonemeEncoder  # the second text encoder: Flan-T5, or VITS for speech
    projection: AudioLDM2Projection
    gpt2: GPT2
    max_new_tokens: int  # default GPT-2 continuation length (language_model config: 8, speech 512)

    @property
    def speech(self) -> bool:
        """A text-to-speech stack: the second stream is the transcription's phonemes through VITS."""
        return isinstance(self.t5, VitsPhonemeEncoder)


def load_text_stack(
    ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> TextStack:
    """Load the two tokenizers and the four text models of a checkpoint."""
    gpt2 = load_gpt2(ckpt, dtype, device)
    return TextStack(
        tokenizer=load_tokenizer(ckpt, "tokenizer"),
        tokenizer_2=load_tokenizer(ckpt, "tokenizer_2"),
        clap=load_clap_text(ckpt, dtype, device),
        t5=(load_vits if ckpt.is_speech else load_t5)(ckpt, dtype, device),
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
            raise UsageError(f"`{name}` is an empty list")
        return list(value)
    raise UsageTypeError(f"`{name}` must be a str or a list of str, got {type(value).__name__}: {value!r}")


def _check_tensor(t: torch.Tensor | None, name: str, ndim: int) -> None:
    if t is not None and (not isinstance(t, torch.Tensor) or t.ndim != ndim):
        what = f"a {t.ndim}-D tensor" if isinstance(t, torch.Tensor) else type(t).__name__
        raise UsageTypeError(f"`{name}` must be a {ndim}-D tensor, got {what}")


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


def mark_phoneme_end(
    input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' end token: in each row, the first id equal to 0 becomes ``PHONEME_END_ID``, attended to.

    (B, L) -> (B, L), new tensors. A row without a 0 (cut at the maximum length, without blanks) is unchanged.
    """
    ids, mask = input_ids.clone(), attention_mask.clone()
    is_zero = ids == 0
    rows = is_zero.any(dim=1).nonzero().squeeze(1)
    first = is_zero.int().argmax(dim=1)[rows]  # argmax returns the first maximum
    ids[rows, first], mask[rows, first] = PHONEME_END_ID, 1
    return ids, mask


def _encode_speech(
    stack: TextStack,
    texts: list[str],
    phoneme_ids: torch.Tensor | None,
    phoneme_mask: torch.Tensor | None,
    negative_mask: torch.Tensor | None,
    device: torch.device,
    max_new_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speech: N prompts for CLAP (the negatives first), the positives' phonemes (B, L) (None: no positives)
    and the negatives' zero mask (B, L) (None: no negatives) -> phoneme states (N, L, d_vits), GPT-2 states."""
    clap_tokens = stack.tokenizer(texts)
    clap = stack.clap(clap_tokens.input_ids.to(device), clap_tokens.attention_mask.to(device))  # (N, 512)
    states, masks = [], []
    if negative_mask is not None:  # the unconditional branch: zero phoneme states, nothing attended
        B, L = negative_mask.shape
        states.append(torch.zeros(B, L, stack.t5.cfg.hidden_size, dtype=_dtype(stack.t5), device=device))
        masks.append(negative_mask)
    if phoneme_ids is not None:
        states.append(stack.t5(phoneme_ids, phoneme_mask))  # (B, L, d_vits)
        masks.append(phoneme_mask)
    states, mask = torch.cat(states), torch.cat(masks)  # a float negative mask makes the whole mask float
    one = clap_tokens.attention_mask.new_ones(len(texts), 1).to(device)
    hidden, mask = stack.projection(clap[:, None, :], states, one, mask)
    return states, generate(stack.gpt2, hidden, mask, max_new_tokens)


@dataclass(frozen=True)
class Side:
    """One side of the guidance batch (the prompts' or the negative prompts'): T5 (speech: VITS) states, their
    mask and GPT-2's states; None where it is to be encoded from text."""

    embeds: torch.Tensor | None = None  # (B, L, d_t5)
    mask: torch.Tensor | None = None  # (B, L)
    generated: torch.Tensor | None = None  # (B, new, d_lm)


@dataclass(frozen=True)
class PromptInputs:
    """``encode_prompt``'s arguments, checked: which side comes from text and which from tensors."""

    prompts: list[str] | None  # None: the positive side is given as tensors
    negatives: list[str] | None  # the negative side's texts, when it is encoded from text (guided)
    transcriptions: list[str] | None  # speech: the words to say, one per prompt
    is_phonemes: bool
    batch_size: int
    num_waveforms_per_prompt: int
    guided: bool
    max_new_tokens: int
    positive: Side
    negative: Side


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
    transcription: str | Sequence[str] | None = None,
    transcription_is_phonemes: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode prompts into ``(prompt_embeds, attention_mask, generated_prompt_embeds)`` as diffusers does.

    ``transcription``: the words to speak, one per prompt (speech checkpoints only; required there when the
    prompt is text); ``transcription_is_phonemes``: it is IPA already, not to be phonemised.

    Shapes (B prompts, n = num_waveforms_per_prompt, g = 2 with guidance, else 1): T5 states
    (g * B * n, L, d_t5), their mask (g * B * n, L) int64, GPT-2 states (g * B * n, max_new_tokens, d_lm);
    with guidance the first B * n rows are the negative prompts'. See the module docstring for the rules.
    """
    for t, name, ndim in (
        (prompt_embeds, "prompt_embeds", 3),
        (negative_prompt_embeds, "negative_prompt_embeds", 3),
        (generated_prompt_embeds, "generated_prompt_embeds", 3),
        (negative_generated_prompt_embeds, "negative_generated_prompt_embeds", 3),
        (attention_mask, "attention_mask", 2),
        (negative_attention_mask, "negative_attention_mask", 2),
    ):
        _check_tensor(t, name, ndim)
    inputs = _inputs(
        stack, _prompt_list(prompt, "prompt"), _prompt_list(negative_prompt, "negative_prompt"),
        isinstance(negative_prompt, str), _prompt_list(transcription, "transcription"), transcription_is_phonemes,
        num_waveforms_per_prompt, do_classifier_free_guidance, max_new_tokens,
        Side(prompt_embeds, attention_mask, generated_prompt_embeds),
        Side(negative_prompt_embeds, negative_attention_mask, negative_generated_prompt_embeds),
    )  # fmt: skip
    device = torch.device(device)
    positive, negative, seq_len = (_speech_sides if stack.speech else _text_sides)(stack, inputs, device)
    return _finish(stack, inputs, seq_len, device, positive, negative)


def _inputs(stack, prompts, negatives, one_negative, transcriptions, is_phonemes, n, guided, max_new_tokens,
            positive: Side, negative: Side) -> PromptInputs:  # fmt: skip
    """The checks of ``encode_prompt``'s arguments (diffusers' ``check_inputs`` and ours), in its order."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise UsageTypeError(f"`num_waveforms_per_prompt` must be an int, got {n!r}")
    if n < 1:
        raise UsageError(f"`num_waveforms_per_prompt` must be at least 1, got {n}")
    max_new_tokens = stack.max_new_tokens if max_new_tokens is None else max_new_tokens
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UsageError(f"`max_new_tokens` must be a positive int, got {max_new_tokens!r}")
    if prompts is not None:
        if positive != Side(None, None, None):
            raise UsageError(
                "pass either `prompt` or precomputed `prompt_embeds` + `generated_prompt_embeds` (+ optional "
                "`attention_mask`), not both"
            )
    elif positive.embeds is None or positive.generated is None:
        raise UsageError("pass `prompt`, or both `prompt_embeds` and `generated_prompt_embeds`")
    batch_size = len(prompts) if prompts is not None else positive.embeds.shape[0]
    _check_speech(stack, prompts, transcriptions, is_phonemes, batch_size)
    if guided:
        negatives = _negatives(negatives, one_negative, negative, batch_size)
    return PromptInputs(prompts, negatives, transcriptions, is_phonemes, batch_size, n, guided, max_new_tokens,
                        positive, negative)  # fmt: skip


def _check_speech(stack, prompts, transcriptions, is_phonemes, batch_size: int) -> None:
    """Speech: the transcription takes T5's place; it goes with a text prompt, one per prompt."""
    if not isinstance(is_phonemes, bool):
        raise UsageTypeError(f"`transcription_is_phonemes` must be a bool, got {is_phonemes!r}")
    if not stack.speech and (transcriptions is not None or is_phonemes):
        raise UsageError(
            "`transcription` is for the text-to-speech checkpoints (anhnct/audioldm2_gigaspeech, "
            "anhnct/audioldm2_ljspeech); this checkpoint's second text encoder is T5, which reads the prompt"
        )
    if stack.speech and prompts is not None:
        if transcriptions is None:
            raise UsageError(
                "this is a text-to-speech checkpoint: pass `transcription=` (the words to speak; the prompt "
                "describes the voice), one per prompt"
            )
        if len(transcriptions) != batch_size:
            raise UsageError(
                f"`transcription` has {len(transcriptions)} entries for {batch_size} prompts; give one per prompt"
            )
    elif stack.speech and transcriptions is not None:
        raise UsageError(
            "`transcription` goes with `prompt`; precomputed `prompt_embeds` already hold the phoneme states"
        )


def _negatives(negatives, one_negative: bool, given: Side, batch_size: int) -> list[str] | None:
    """Under guidance: the negative side's texts (empty prompts by default), or None when it is given as
    tensors."""
    if given.embeds is not None:
        if negatives is not None:
            raise UsageError("pass either `negative_prompt` or `negative_prompt_embeds`, not both")
        if given.generated is None:
            raise UsageError("`negative_prompt_embeds` needs `negative_generated_prompt_embeds`")
        return None
    if given.generated is not None or given.mask is not None:
        raise UsageError(
            "`negative_generated_prompt_embeds` / `negative_attention_mask` need `negative_prompt_embeds`"
        )
    if negatives is None:
        return [""] * batch_size  # the unconditional branch encodes empty prompts
    if len(negatives) == 1 and batch_size > 1 and one_negative:
        negatives = negatives * batch_size
    if len(negatives) != batch_size:
        raise UsageError(
            f"`negative_prompt` has batch size {len(negatives)}, but `prompt` has batch size {batch_size}; "
            "they must match"
        )
    return negatives


def _text_sides(stack: TextStack, inputs: PromptInputs, device: torch.device) -> tuple[Side, Side, int]:
    """Both sides through CLAP, T5, the projection and GPT-2 in one batch; the negative T5 tokens take the
    prompt's T5 length. Returns (positive, negative, L)."""
    texts: list[str] = []
    t5_tokens = []
    if inputs.prompts is not None:
        tokens = stack.tokenizer_2(inputs.prompts)  # padded to the longest prompt, at most model_max_length
        seq_len = tokens.input_ids.shape[1]
        texts, t5_tokens = inputs.prompts, [tokens]
    else:
        seq_len = inputs.positive.embeds.shape[1]
    if inputs.negatives is not None:
        note = " (the prompt's T5 length; diffusers pads or truncates negative prompts to it)"
        tokens = stack.tokenizer_2(
            inputs.negatives, padding="max_length", max_length=seq_len, truncation_note=note
        )
        texts, t5_tokens = inputs.negatives + texts, [tokens] + t5_tokens  # negative rows first
    positive, negative = inputs.positive, inputs.negative
    if texts:  # N = (B if negative from text) + (B if prompt from text)
        t5_ids = torch.cat([t.input_ids for t in t5_tokens])
        t5_mask = torch.cat([t.attention_mask for t in t5_tokens])
        states, generated = _encode_texts(stack, texts, t5_ids, t5_mask, device, inputs.max_new_tokens)
        t5_mask = t5_mask.to(device)
        positive, negative = _split(inputs, states, generated, t5_mask[-inputs.batch_size :], t5_mask)
    return positive, negative, seq_len


def _speech_sides(stack: TextStack, inputs: PromptInputs, device: torch.device) -> tuple[Side, Side, int]:
    """``_text_sides`` of a speech checkpoint (module docstring): the positives' phonemes through VITS, the
    negatives' zero states."""
    seq_len = (
        stack.tokenizer_2.model_max_length if inputs.prompts is not None else inputs.positive.embeds.shape[1]
    )
    texts: list[str] = []
    phoneme_ids = phoneme_mask = zero_mask = None
    if inputs.negatives is not None:
        texts += inputs.negatives
        zero_mask = torch.zeros(inputs.batch_size, seq_len, dtype=_dtype(stack.t5), device=device)
    if inputs.prompts is not None:
        if stack.t5.cfg.vocab_size <= PHONEME_END_ID:
            raise UsageError(
                f"the VITS encoder has {stack.t5.cfg.vocab_size} symbols; the end token {PHONEME_END_ID} that "
                "diffusers writes needs at least 183"
            )
        tokens = stack.tokenizer_2(inputs.transcriptions, is_phonemes=inputs.is_phonemes)
        phoneme_ids, phoneme_mask = mark_phoneme_end(tokens.input_ids, tokens.attention_mask)
        phoneme_ids, phoneme_mask = phoneme_ids.to(device), phoneme_mask.to(device)
        texts += inputs.prompts
    positive, negative = inputs.positive, inputs.negative
    if texts:
        states, generated = _encode_speech(
            stack, texts, phoneme_ids, phoneme_mask, zero_mask, device, inputs.max_new_tokens
        )
        positive, negative = _split(inputs, states, generated, phoneme_mask, zero_mask)
    return positive, negative, seq_len


def _split(inputs: PromptInputs, states, generated, positive_mask, negative_mask) -> tuple[Side, Side]:
    """The rows of one encoded batch, [negative (B, if from text), positive (B, if from text)], as sides
    (the masks: the positives' (B, L), and the negatives' in their first B rows)."""
    B = inputs.batch_size
    positive, negative = inputs.positive, inputs.negative
    if inputs.prompts is not None:  # the last B rows
        positive = Side(states[-B:], positive_mask, generated[-B:])
    if inputs.negatives is not None:  # the first B rows
        negative = Side(states[:B], negative_mask[:B], generated[:B])
    return positive, negative


def _finish(
    stack: TextStack, inputs: PromptInputs, seq_len: int, device: torch.device, positive: Side, negative: Side
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check both sides' shapes, cast, repeat each row ``num_waveforms_per_prompt`` times, and concatenate
    ``[negative, positive]`` under guidance."""
    t5_dtype, lm_dtype = _dtype(stack.t5), _dtype(stack.gpt2)
    batch_size, n = inputs.batch_size, inputs.num_waveforms_per_prompt

    def finish(side: Side, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        embeds, mask, generated = side.embeds, side.mask, side.generated
        if embeds.shape[0] != batch_size or generated.shape[0] != batch_size:
            raise UsageError(
                f"{name} batch sizes differ: embeds {tuple(embeds.shape)}, generated {tuple(generated.shape)}, "
                f"expected {batch_size} rows"
            )
        if embeds.shape[1] != seq_len:
            raise UsageError(f"{name} embeds have {embeds.shape[1]} positions, the prompt's have {seq_len}")
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=device)
        elif mask.shape != embeds.shape[:2]:
            raise UsageError(
                f"{name} attention mask {tuple(mask.shape)} does not match embeds {tuple(embeds.shape)}"
            )
        return (
            embeds.to(device=device, dtype=t5_dtype).repeat_interleave(n, dim=0),  # (B * n, L, d_t5)
            mask.to(device=device).repeat_interleave(n, dim=0),  # (B * n, L)
            generated.to(device=device, dtype=lm_dtype).repeat_interleave(n, dim=0),  # (B * n, new, d_lm)
        )

    out = finish(positive, "prompt")
    if not inputs.guided:
        return out
    neg = finish(negative, "negative")
    if neg[0].shape != out[0].shape or neg[2].shape != out[2].shape:
        raise UsageError(
            f"negative and positive conditions differ in shape: {tuple(neg[0].shape)} vs "
            f"{tuple(out[0].shape)}, {tuple(neg[2].shape)} vs {tuple(out[2].shape)}"
        )
    return tuple(torch.cat([a, b]) for a, b in zip(neg, out, strict=True))  # type: ignore[return-value]
