"""Candidate re-ranking: order each prompt's generated waveforms by CLAP text-audio similarity.

Place in the AudioLDM 2 data flow: the last step, when ``num_waveforms_per_prompt`` N > 1. The batch holds
P * N waveforms, prompt-major (candidates of prompt p at rows p*N ... p*N + N-1, the order in which the
pipeline repeats each prompt's conditioning). Inputs are unit-norm CLAP embeddings:

    text_embeds (P, D)       the CLAP text embedding of each prompt (``ClapModel`` text branch + projection,
                             L2-normalised; the positive prompts only, once each)
    audio_embeds (P*N, D)    ``clap_audio.ClapAudio`` of ``audio.clap_features(audio.resample(...))``
    logit_scale              the checkpoint's ``logit_scale_t`` (a log; exponentiated here)

Reference: ``AudioLDM2Pipeline.score_waveforms`` in diffusers. It computes ``ClapModel(...).logits_per_text``
= text_embeds @ audio_embeds.T * exp(logit_scale_t), a (P, P*N) matrix, which :func:`score` reproduces.
It then takes, for every prompt, the N best of ALL P*N waveforms (``argsort(..., dim=1)[:, :N]``), so with
P > 1 a prompt can be handed another prompt's audio and one waveform can appear twice (diffusers issue
13602). :func:`rank_within_prompts` ranks each prompt's own N candidates only.

Ties are broken by generation order (a stable sort), so the ranking is deterministic.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .errors import UsageError

__all__ = ["Ranking", "score", "rank_within_prompts"]


class Ranking(NamedTuple):
    order: torch.Tensor  # (P, N) long: batch rows (0 .. P*N-1), best first within each prompt's group
    scores: torch.Tensor  # (P, N): the logits of those rows against their own prompt, descending


def score(
    text_embeds: torch.Tensor, audio_embeds: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """(P, D), (P*N, D), log scale -> (P, P*N) logits, as the reference's ``logits_per_text``."""
    logit_scale = torch.as_tensor(logit_scale, dtype=text_embeds.dtype, device=text_embeds.device)
    return torch.matmul(text_embeds, audio_embeds.t()) * logit_scale.exp()


def rank_within_prompts(logits: torch.Tensor, num_per_prompt: int) -> Ranking:
    """(P, P*N) logits from :func:`score` -> each prompt's own N candidates, best first."""
    P, total = logits.shape
    N = num_per_prompt
    if N < 1 or total != P * N:
        raise UsageError(
            f"logits of shape {tuple(logits.shape)} do not hold {N} candidates for each of {P} prompts"
        )
    own = logits.view(P, P, N)[torch.arange(P), torch.arange(P)]  # (P, N): prompt p vs rows p*N .. p*N+N-1
    scores, local = torch.sort(own, dim=1, descending=True, stable=True)
    order = local + N * torch.arange(P, device=logits.device)[:, None]
    return Ranking(order=order, scores=scores)
