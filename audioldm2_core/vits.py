"""VITS phoneme encoder: phoneme ids -> one hidden state per phoneme (the text encoder of ``VitsModel``).

Place in the AudioLDM 2 data flow, speech checkpoints only (``anhnct/audioldm2_gigaspeech``, ``_ljspeech``):
the transcription, turned into phoneme ids by ``tokenization.PhonemeTokenizer`` and padded to the tokenizer's
``model_max_length`` (310), goes through this module; its states (B, 310, 192) take the place of the Flan-T5
states as the projection model's second stream (``projection.py`` adds a learned position table first). The
speech UNet (``[[None, 768]]``) does not attend to them directly: they reach it only through GPT-2.

    input_ids, attention_mask (B, L)
      text_encoder.embed_tokens        token embedding, times sqrt(hidden_size)
      text_encoder.encoder.layers[i]   num_layers x post-norm layer:
        attention                      self-attention with windowed relative positions (emb_rel_k, emb_rel_v)
        layer_norm                     LayerNorm(x + attention)
        feed_forward                   masked conv1d (kernel 3) -> ReLU -> masked conv1d
        final_layer_norm               LayerNorm(x + feed_forward)
      (padded positions zeroed before the first and after the last layer)
    hidden states (B, L, hidden_size)

Reference: transformers ``VitsModel.text_encoder(input_ids, attention_mask=m, padding_mask=m[..., None])
.last_hidden_state`` (models/vits/modeling_vits.py), called so by diffusers' ``AudioLDM2Pipeline.encode_prompt``.
VITS itself: Kim et al. 2021, "Conditional Variational Autoencoder with Adversarial Learning for End-to-End
Text-to-Speech"; the relative attention is Shaw et al. 2018, windowed as in the original VITS code.

Quirks:
- Relative positions: a key ``j`` seen from query ``i`` gets the key embedding ``emb_rel_k[j - i + w]`` (its
  dot product with the query added to the logit) and the value embedding ``emb_rel_v[j - i + w]`` (added to the
  output, weighted by the attention probability), for ``|j - i| <= w`` (``window_size``); farther keys get
  neither. One table of (2w + 1, head_dim) is shared by all heads. The reference builds these terms with
  pad-and-reshape "skewing"; we gather the same entries with index tables, which is the same sum.
- Attention is written out (matmul, softmax, matmul) rather than SDPA: the value term needs the attention
  probabilities themselves.
- Queries are scaled by 1/sqrt(head_dim) before *both* the key and the relative-key dot products.
- Padded positions keep states inside the stack (only keys are masked, and the feed-forward zeroes them
  around each convolution); the output is zeroed there.
- The checkpoint is a whole ``VitsModel`` (flow, HiFi-GAN, duration predictor, posterior encoder, and the text
  encoder's ``project`` to prior means/variances): none of it is used. ``_text_encoder_weights`` reads only
  the text encoder's tensors and checks that the rest of the file is exactly those unused parts.

Left out on purpose: everything of VITS after the text encoder (this is a conditioning encoder here, not a
synthesiser), ``window_size=None``, activations other than ReLU, dropout and layerdrop, returning attentions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import VitsConfig, vits_config
from .errors import UsageError, WeightsError
from .loading import Checkpoint, empty_init, load_strict

__all__ = ["VitsPhonemeEncoder", "load_vits"]


class VitsAttention(nn.Module):
    """Multi-head self-attention with windowed relative position embeddings for keys and values."""

    def __init__(self, cfg: VitsConfig):
        super().__init__()
        self.heads, self.head_dim, self.window = (
            cfg.num_heads,
            cfg.hidden_size // cfg.num_heads,
            cfg.window_size,
        )
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.use_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.use_bias)
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.use_bias)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.use_bias)
        # offsets -w..w, one row each, shared by the heads
        self.emb_rel_k = nn.Parameter(torch.empty(1, 2 * cfg.window_size + 1, self.head_dim))
        self.emb_rel_v = nn.Parameter(torch.empty(1, 2 * cfg.window_size + 1, self.head_dim))

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        """x (B, L, C), key_bias (B, 1, 1, L): 0 on tokens, the dtype's minimum on padding -> (B, L, C)."""
        B, L, C = x.shape
        w = self.window
        q = self.q_proj(x) * self.head_dim**-0.5
        q, k, v = (
            t.view(B, L, self.heads, self.head_dim).transpose(1, 2)
            for t in (q, self.k_proj(x), self.v_proj(x))
        )
        # (B, heads, L, head_dim) each

        pos = torch.arange(L, device=x.device)
        rel = pos[None, :] - pos[:, None]  # (L_query, L_key): key minus query
        in_window = rel.abs() <= w
        # relative keys: q_i . emb_rel_k[j - i + w], computed once per offset then spread over the keys
        rel_logits = q @ self.emb_rel_k[0].transpose(0, 1)  # (B, heads, L, 2w + 1)
        index = (rel + w).clamp(0, 2 * w).expand(B, self.heads, L, L)
        rel_bias = rel_logits.gather(-1, index).masked_fill(~in_window, 0.0)  # (B, heads, L, L)

        logits = q @ k.transpose(-1, -2) + rel_bias + key_bias  # (B, heads, L, L)
        probs = logits.softmax(dim=-1)
        out = probs @ v  # (B, heads, L, head_dim)

        # relative values: sum over offsets of p(i, i + offset) * emb_rel_v[offset + w]
        keys = (
            pos[:, None] + torch.arange(-w, w + 1, device=x.device)[None, :]
        )  # (L, 2w + 1): key at each offset
        valid = (keys >= 0) & (keys < L)
        rel_probs = probs.gather(-1, keys.clamp(0, L - 1).expand(B, self.heads, L, 2 * w + 1))
        out = out + rel_probs.masked_fill(~valid, 0.0) @ self.emb_rel_v[0]  # (B, heads, L, head_dim)

        return self.out_proj(out.transpose(1, 2).reshape(B, L, C))


class VitsFeedForward(nn.Module):
    """conv1d -> ReLU -> conv1d along the phoneme axis, padded "same", with padded positions zeroed before
    each convolution and after the last."""

    def __init__(self, cfg: VitsConfig):
        super().__init__()
        self.conv_1 = nn.Conv1d(cfg.hidden_size, cfg.ffn_dim, cfg.ffn_kernel_size)
        self.conv_2 = nn.Conv1d(cfg.ffn_dim, cfg.hidden_size, cfg.ffn_kernel_size)
        k = cfg.ffn_kernel_size
        self.padding = ((k - 1) // 2, k // 2)  # left, right (the extra one on the right for even kernels)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, L, C), mask (B, L, 1) of 0/1 -> (B, L, C)."""
        x, mask = x.transpose(1, 2), mask.transpose(1, 2)  # (B, C, L), (B, 1, L)
        h = F.relu(self.conv_1(F.pad(x * mask, self.padding)))
        h = self.conv_2(F.pad(h * mask, self.padding)) * mask
        return h.transpose(1, 2)


class VitsEncoderLayer(nn.Module):
    """Post-norm: LayerNorm after each residual sum (the original Transformer's order, not GPT-2's)."""

    def __init__(self, cfg: VitsConfig):
        super().__init__()
        self.attention = VitsAttention(cfg)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.feed_forward = VitsFeedForward(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm(x + self.attention(x, key_bias))
        return self.final_layer_norm(x + self.feed_forward(x, mask))


class VitsEncoder(nn.Module):
    def __init__(self, cfg: VitsConfig):
        super().__init__()
        self.layers = nn.ModuleList(VitsEncoderLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask[..., None].to(x.dtype)  # (B, L, 1): the reference's padding_mask
        key_valid = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L)
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        key_bias = torch.where(
            key_valid, zero, torch.finfo(x.dtype).min
        )  # added to the logits, as the reference
        x = x * mask
        for layer in self.layers:
            x = layer(x, mask, key_bias)
        return x * mask


class VitsTextEncoder(nn.Module):
    """transformers' ``VitsTextEncoder`` without ``project`` (the prior statistics, unused here)."""

    def __init__(self, cfg: VitsConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.encoder = VitsEncoder(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids) * math.sqrt(self.embed_tokens.embedding_dim)
        return self.encoder(x, attention_mask)


class VitsPhonemeEncoder(nn.Module):
    """The text encoder of a ``VitsModel``, under the file's key names (``text_encoder.*``)."""

    def __init__(self, cfg: VitsConfig):
        super().__init__()
        self.cfg = cfg
        self.text_encoder = VitsTextEncoder(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Phoneme ids and mask (B, L) -> hidden states (B, L, hidden_size), zero at padded positions.

        Equals ``VitsModel.text_encoder(input_ids, attention_mask=attention_mask,
        padding_mask=attention_mask.unsqueeze(-1)).last_hidden_state``.
        """
        if input_ids.shape != attention_mask.shape or input_ids.ndim != 2:
            raise UsageError(
                f"VITS: input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                "must both be (batch, length)"
            )
        return self.text_encoder(input_ids, attention_mask)


# The parts of a VitsModel file AudioLDM 2 never runs: present in the file, never read.
_UNUSED = (
    "flow.",
    "decoder.",
    "duration_predictor.",
    "posterior_encoder.",
    "embed_speaker.",
    "text_encoder.project.",
)


def _text_encoder_weights(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """Read the text encoder's tensors only, and check that the rest of the file is exactly the unused parts.

    A key that belongs to neither means the file is not the ``VitsModel`` we think it is: an error, not
    something to skip silently. The flow and the HiFi-GAN decoder must be there (what makes it a VitsModel).
    """
    seen: list[str] = []

    def wanted(key: str) -> bool:
        seen.append(key)
        return key.startswith("text_encoder.") and not key.startswith("text_encoder.project.")

    state = ckpt.read_weights("text_encoder_2", select=wanted)
    rest = [k for k in seen if k not in state]
    stray = [k for k in rest if not k.startswith(_UNUSED)]
    missing = [p for p in ("flow.", "decoder.") if not any(k.startswith(p) for k in rest)]
    if stray or missing:
        raise WeightsError(
            f"{ckpt.root}/text_encoder_2: expected a whole VitsModel file, whose parts besides the text encoder "
            f"are {', '.join(p + '*' for p in _UNUSED)}; keys of no known part: {sorted(stray)[:12]}; "
            f"parts missing: {missing}"
        )
    return state


def load_vits(
    ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> VitsPhonemeEncoder:
    """Build the VITS phoneme encoder of a speech checkpoint and fill it strictly from ``text_encoder_2/``."""
    cfg = vits_config(ckpt.config("text_encoder_2"))
    with empty_init():  # meta device, no random init: the file fills every tensor
        model = VitsPhonemeEncoder(cfg)
    source = f"{ckpt.root}/text_encoder_2"
    return load_strict(model, _text_encoder_weights(ckpt), source, dtype=dtype, device=device).eval()
