"""CLAP text encoder: token ids -> one unit-length text embedding per prompt (the text tower of LAION CLAP).

Place in the AudioLDM 2 data flow: the prompt, tokenized with the RoBERTa tokenizer (``tokenizer/``, padded
to 512), goes through this module; the resulting embedding (B, 512) becomes a one-token sequence (B, 1, 512)
that ``projection.py`` maps to the GPT-2 width, next to the Flan-T5 states of ``t5.py``. The same embedding
scores generated waveforms against the prompt when several candidates are asked for.

    input_ids, attention_mask (B, L)
      text_model.embeddings   word + RoBERTa position + token-type row 0, LayerNorm
      text_model.encoder      num_layers x post-norm BERT layer (self-attention, GELU feed-forward)
      text_model.pooler       dense + tanh on the first token (<s>)                       (B, hidden)
      text_projection         linear1, ReLU, linear2                                       (B, projection_dim)
      L2 normalisation                                                                     (B, projection_dim)

Reference: transformers ``ClapModel.get_text_features(input_ids, attention_mask)`` (models/clap/
modeling_clap.py); in transformers 5.x it returns a ``BaseModelOutputWithPooling`` whose ``pooler_output``
is the *normalised projection* (not the pooler's output), which is what diffusers' pipeline takes and what
``ClapTextEncoder.forward`` returns.

Quirks:
- RoBERTa position ids are derived from the token ids, not from the mask: non-pad tokens get 2, 3, 4, ...
  (``pad_token_id + 1`` onwards, counting only non-pad tokens), pad tokens get ``pad_token_id`` (1), whose
  row of the position table is what every pad position reads.
- ``type_vocab_size`` is 1: every position adds row 0 of ``token_type_embeddings``.
- The BERT layers are post-norm: ``LayerNorm(x + sublayer(x))``; GELU is the exact (erf) one.
- The weight file is a whole ``ClapModel``: besides the text tower it holds the HTSAT audio tower
  (``audio_model.*``, ``audio_projection.*``) and the two logit scales. Only the text keys are read;
  ``_text_weights`` checks that the rest is exactly the audio side. The file also holds two index tables
  transformers saves as buffers (``embeddings.position_ids``, ``embeddings.token_type_ids``); they are
  checked to be the trivial ones and dropped, since we compute both from the input.

Left out on purpose: the audio tower (see the re-ranking code), ``inputs_embeds``/``position_ids``/
``token_type_ids`` arguments, returning per-layer states or attentions, dropout, gradient checkpointing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ClapTextConfig, clap_config
from .errors import ConfigError, UsageError, WeightsError
from .loading import Checkpoint, empty_init, load_strict

__all__ = ["ClapTextEncoder", "load_clap_text", "roberta_position_ids"]


def roberta_position_ids(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """(B, L) token ids -> (B, L) RoBERTa positions: pad_token_id + 1, + 2, ... for real tokens, pad_token_id
    for padding (fairseq's ``make_positions``)."""
    not_pad = input_ids.ne(pad_token_id).long()
    return torch.cumsum(not_pad, dim=1) * not_pad + pad_token_id


class Embeddings(nn.Module):
    def __init__(self, cfg: ClapTextConfig):
        super().__init__()
        self.cfg = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = roberta_position_ids(input_ids, self.cfg.pad_token_id)
        if int(positions.max()) >= self.cfg.max_position_embeddings:
            raise UsageError(
                f"CLAP text: {input_ids.shape[1]} tokens exceed the {self.cfg.max_position_embeddings - 2} "
                "positions of the encoder"
            )
        x = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]  # single token type
        x = x + self.position_embeddings(positions)
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ClapTextConfig):
        super().__init__()
        if cfg.hidden_size % cfg.num_heads:
            raise ConfigError(
                f"CLAP text: hidden_size {cfg.hidden_size} not divisible by {cfg.num_heads} heads"
            )
        self.num_heads = cfg.num_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = (
            lin(x).view(B, L, self.num_heads, D // self.num_heads).transpose(1, 2)  # (B, heads, L, d)
            for lin in (self.query, self.key, self.value)
        )
        # key_mask (B, 1, 1, L): every query ignores the padded keys; scale is the default 1/sqrt(d)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return y.transpose(1, 2).reshape(B, L, D)


class DenseLayerNorm(nn.Module):
    """BERT's post-norm residual: ``LayerNorm(dense(x) + residual)`` (``attention.output`` and ``output``)."""

    def __init__(self, d_in: int, cfg: ClapTextConfig):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: ClapTextConfig):
        super().__init__()
        self.self = SelfAttention(cfg)  # the checkpoint's name: `attention.self.query`
        self.output = DenseLayerNorm(cfg.hidden_size, cfg)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, key_mask), x)


class Intermediate(nn.Module):
    def __init__(self, cfg: ClapTextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact erf GELU (hidden_act "gelu")


class Layer(nn.Module):
    def __init__(self, cfg: ClapTextConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = DenseLayerNorm(cfg.intermediate_size, cfg)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, key_mask)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, cfg: ClapTextConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, key_mask)
        return x


class Pooler(nn.Module):
    def __init__(self, cfg: ClapTextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))  # the <s> token's state, (B, hidden)


class RobertaModel(nn.Module):
    """transformers' ``ClapTextModel``: a RoBERTa encoder with BERT's pooler."""

    def __init__(self, cfg: ClapTextConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.pooler = Pooler(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        key_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L)
        return self.pooler(self.encoder(self.embeddings(input_ids), key_mask))


class ProjectionHead(nn.Module):
    """CLAP's ``ClapProjectionLayer``: into the joint audio-text space."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear1 = nn.Linear(d_in, d_out)
        self.linear2 = nn.Linear(d_out, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.relu(self.linear1(x)))


class ClapTextEncoder(nn.Module):
    """The text half of ``ClapModel``; attribute names are the checkpoint's keys."""

    def __init__(self, cfg: ClapTextConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = RobertaModel(cfg)
        self.text_projection = ProjectionHead(cfg.hidden_size, cfg.projection_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids and mask (B, L) -> unit-length text embeddings (B, projection_dim).

        Equals ``ClapModel.get_text_features(input_ids, attention_mask).pooler_output`` (transformers 5).
        """
        return F.normalize(self.text_projection(self.text_model(input_ids, attention_mask)), dim=-1)


# Keys of the file that are not the text tower: the audio tower and the two contrastive temperatures.
_AUDIO_PREFIXES = ("audio_model.", "audio_projection.")
_LOGIT_SCALES = ("logit_scale_a", "logit_scale_t")
# Index tables transformers saves as buffers; we compute both from the input instead.
_INDEX_TABLES = ("text_model.embeddings.position_ids", "text_model.embeddings.token_type_ids")


def _text_weights(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """Read the text tower's tensors only; assert the rest of ``text_encoder/`` is exactly the audio side.

    This is the one place where the CLAP file and our module differ. The audio tower (about 30 M
    parameters) is not read (``select`` is consulted before a tensor is loaded), but a key that is neither
    text nor audio means the file is not the ``ClapModel`` we expect, and is an error. The two index tables
    are read (a few KB), checked to be ``arange`` and zeros (what the reference's gather then reduces to),
    and dropped.
    """
    source = f"{ckpt.root}/text_encoder"
    seen: list[str] = []

    def is_text(key: str) -> bool:
        seen.append(key)
        return key.startswith(("text_model.", "text_projection."))

    state = ckpt.read_weights("text_encoder", select=is_text)
    rest = [k for k in seen if k not in state]
    stray = sorted(k for k in rest if not (k.startswith(_AUDIO_PREFIXES) or k in _LOGIT_SCALES))
    has_audio = all(any(k.startswith(p) for k in rest) for p in _AUDIO_PREFIXES)
    if stray or not has_audio or not set(_LOGIT_SCALES) <= set(rest):
        raise WeightsError(
            f"{source}: expected a ClapModel file (text_model.*, text_projection.*, audio_model.*, "
            f"audio_projection.*, logit_scale_a, logit_scale_t); keys of none of these: {stray[:12]}; "
            f"audio keys found: {len(rest) - len(stray)}"
        )
    position_ids = state.pop(_INDEX_TABLES[0], None)
    token_type_ids = state.pop(_INDEX_TABLES[1], None)
    if position_ids is not None and not torch.equal(
        position_ids.flatten(), torch.arange(position_ids.numel(), dtype=position_ids.dtype)
    ):
        raise WeightsError(f"{source}: {_INDEX_TABLES[0]} is not 0, 1, 2, ...; this encoder cannot use it")
    if token_type_ids is not None and bool(token_type_ids.ne(0).any()):
        raise WeightsError(f"{source}: {_INDEX_TABLES[1]} is not all zeros; this encoder cannot use it")
    return state


def load_clap_text(
    ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> ClapTextEncoder:
    """Build the CLAP text encoder of a checkpoint and fill it strictly from ``text_encoder/``."""
    cfg = clap_config(ckpt.config("text_encoder")).text
    with empty_init():  # meta device, no random init: the file fills every tensor
        model = ClapTextEncoder(cfg)
    return load_strict(
        model, _text_weights(ckpt), f"{ckpt.root}/text_encoder", dtype=dtype, device=device
    ).eval()
