"""Projection model: the two text-encoder streams -> one GPT-2 input sequence (diffusers'
``AudioLDM2ProjectionModel``).

Place in the AudioLDM 2 data flow: between the text encoders and GPT-2. The CLAP embedding (as a one-token
sequence) and the Flan-T5 states (or, in the TTS checkpoints, the VITS phoneme-encoder states) are each mapped
to the GPT-2 width by a linear layer, framed by a learned start and end vector of their own, and
concatenated; the masks are framed and concatenated the same way. ``gpt2.py`` then continues this sequence.

    hidden_states (B, L1, text_encoder_dim), attention_mask (B, L1)        CLAP: L1 = 1, mask of ones
    hidden_states_1 (B, L2, text_encoder_1_dim), attention_mask_1 (B, L2)  T5 (padded) or VITS
      [sos_embed,   projection(hidden_states),     eos_embed]                (B, L1 + 2, D)
      [sos_embed_1, projection_1(hidden_states_1), eos_embed_1]              (B, L2 + 2, D)
    concatenated: (B, L1 + L2 + 4, language_model_dim), mask (B, L1 + L2 + 4)

Reference: diffusers ``AudioLDM2ProjectionModel.forward`` and ``add_special_tokens``
(pipelines/audioldm2/modeling_audioldm2.py).

Quirks:
- The end vector goes after the *padded* sequence, so a padded T5 stream leaves its padding in the middle
  of the GPT-2 input, masked out; the mask marks the four framing vectors as valid (ones).
- TTS checkpoints (``use_learned_position_embedding``) add a learned table to the second stream before its
  projection. The table is stored (1, text_encoder_1_dim, max_seq_length), so that stream must be exactly
  ``max_seq_length`` long (the pipeline pads the phonemes to it).
- The masks keep the reference's dtypes: a float mask (the TTS pipeline's negative branch) concatenated with
  an integer one gives a float mask, as ``torch.cat`` promotes it there.

Left out on purpose: ``None`` masks (the reference mishandles a single missing mask: it passes a tensor slice
as a shape; the pipeline always passes both), the output dataclass.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ProjectionConfig, projection_config
from .errors import UsageError
from .loading import Checkpoint, empty_init, load_strict

__all__ = ["AudioLDM2Projection", "load_projection"]


def add_special_tokens(
    x: torch.Tensor, mask: torch.Tensor, sos: torch.Tensor, eos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, D), (B, L) -> (B, L + 2, D), (B, L + 2): learned start/end vectors around the sequence."""
    B = x.shape[0]
    one = mask.new_ones((B, 1))
    x = torch.cat([sos.expand(B, 1, -1), x, eos.expand(B, 1, -1)], dim=1)
    return x, torch.cat([one, mask, one], dim=-1)


class AudioLDM2Projection(nn.Module):
    """``AudioLDM2ProjectionModel``; attribute names are the checkpoint's keys."""

    def __init__(self, cfg: ProjectionConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.language_model_dim
        self.projection = nn.Linear(cfg.text_encoder_dim, D)  # CLAP stream
        self.projection_1 = nn.Linear(cfg.text_encoder_1_dim, D)  # T5 / VITS stream
        self.sos_embed = nn.Parameter(torch.empty(D))
        self.eos_embed = nn.Parameter(torch.empty(D))
        self.sos_embed_1 = nn.Parameter(torch.empty(D))
        self.eos_embed_1 = nn.Parameter(torch.empty(D))
        if cfg.use_learned_position_embedding:
            assert cfg.max_seq_length is not None  # checked by projection_config
            self.learnable_positional_embedding = nn.Parameter(
                torch.empty(1, cfg.text_encoder_1_dim, cfg.max_seq_length)
            )

    def forward(
        self,
        hidden_states: torch.Tensor,
        hidden_states_1: torch.Tensor,
        attention_mask: torch.Tensor,
        attention_mask_1: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CLAP (B, L1, C1) and T5/VITS (B, L2, C2) states with their masks -> the GPT-2 input sequence
        (B, L1 + L2 + 4, D) and its mask (B, L1 + L2 + 4)."""
        x, mask = add_special_tokens(
            self.projection(hidden_states), attention_mask, self.sos_embed, self.eos_embed
        )
        if self.cfg.use_learned_position_embedding:
            length = hidden_states_1.shape[1]
            if length != self.cfg.max_seq_length:
                raise UsageError(
                    f"projection: the second stream has {length} positions; the learned position table needs "
                    f"exactly {self.cfg.max_seq_length}"
                )
            # table (1, C2, L2) -> (1, L2, C2); the reference permutes the states instead, same sum
            hidden_states_1 = hidden_states_1 + self.learnable_positional_embedding.transpose(1, 2)
        x_1, mask_1 = add_special_tokens(
            self.projection_1(hidden_states_1), attention_mask_1, self.sos_embed_1, self.eos_embed_1
        )
        return torch.cat([x, x_1], dim=1), torch.cat([mask, mask_1], dim=-1)


def load_projection(
    ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> AudioLDM2Projection:
    """Build the projection model of a checkpoint and fill it strictly from ``projection_model/``."""
    cfg = projection_config(ckpt.config("projection_model"))
    with empty_init():  # meta device, no random init: the file fills every tensor
        model = AudioLDM2Projection(cfg)
    source = f"{ckpt.root}/projection_model"
    return load_strict(
        model, ckpt.read_weights("projection_model"), source, dtype=dtype, device=device
    ).eval()
