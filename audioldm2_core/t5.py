"""Flan-T5 encoder: token ids -> one hidden state per token (the encoder half of T5, as ``T5EncoderModel``).

Place in the AudioLDM 2 data flow: the prompt, tokenized with the T5 tokenizer (``tokenizer_2/``), goes
through this module; its states (B, L, 1024) are the second condition stream. ``projection.py`` maps them to
the GPT-2 width for the language model, and the UNet also attends to them directly (cross-attention width
1024) with this same attention mask.

    input_ids, attention_mask (B, L)
      shared                    token embedding (no scaling, no absolute positions)
      encoder.block[i]          num_layers x pre-norm block:
        layer[0]                RMS norm, self-attention + relative position bias (table in block 0 only)
        layer[1]                RMS norm, gated-GELU feed-forward (Flan-T5) or ReLU (T5 v1.0)
      encoder.final_layer_norm  RMS norm
    hidden states (B, L, d_model)

Reference: transformers ``T5EncoderModel(input_ids, attention_mask).last_hidden_state``
(models/t5/modeling_t5.py).

Quirks:
- No 1/sqrt(d) scaling of attention logits (it is folded into the initialisation of ``q``).
- Only block 0 holds ``relative_attention_bias``; the bias it computes, (1, heads, L, L), is reused by every
  block. Buckets are bidirectional: half for keys before the query, half for keys after, exact up to 8 tokens
  away, logarithmic up to ``relative_attention_max_distance``, then constant.
- RMS norm: no mean subtraction, no bias; the mean square is taken in float32.
- Flan-T5's feed-forward is ``wo(gelu_new(wi_0 x) * wi_1 x)`` (the tanh approximation of GELU), whatever
  ``dense_act_fn`` says; T5 v1.0 (``feed_forward_proj: relu``) is ``wo(relu(wi x))``.
- Padded positions get states too (queries are not masked, only keys); the pipeline passes them on with the
  mask, so they are computed exactly as the reference computes them.
- Tied embedding: ``T5EncoderModel`` holds one embedding under two names, ``shared`` and
  ``encoder.embed_tokens``; a file may hold either or both. ``_untie_embedding`` is the one place that deals
  with it; the module has only ``shared``.
- float16: transformers keeps every ``wo`` in float32 when a T5 is loaded in float16 (``_keep_in_fp32_modules``,
  Flan-T5's feed-forward output overflows float16) and casts its input up; the residual stream then becomes
  float32 from the first feed-forward on. ``load_t5`` does the same (``_half_except_wo``), and the blocks
  clamp float16 states to the finite range exactly as the reference does (``_clamp_fp16``), so float16 runs
  follow the reference rather than a plain float16 cast.

Left out on purpose: the decoder, ``inputs_embeds``, caches, returning per-layer states or attentions,
dropout, gradient checkpointing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import T5Config, t5_config
from .errors import WeightsError
from .loading import Checkpoint, empty_init, load_strict, release_pages

__all__ = ["T5Encoder", "load_t5", "relative_position_bucket"]


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of GELU, written as transformers' ``NewGELUActivation`` writes it."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """The reference's float16 guard after each sublayer: inf -> largest finite value (minus 1000 if any inf)."""
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), big - 1000, big)
    return torch.clamp(x, min=-limit, max=limit)


def relative_position_bucket(
    relative_position: torch.Tensor, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """Bidirectional T5 buckets of ``key_position - query_position`` (Mesh TensorFlow's scheme)."""
    num_buckets //= 2  # half the buckets for keys after the query, half for keys before
    buckets = (relative_position > 0).long() * num_buckets
    distance = relative_position.abs()
    max_exact = num_buckets // 2  # distances below this get a bucket each
    is_small = distance < max_exact
    # log(0) = -inf for distance 0 is harmless: those entries take the is_small branch
    log_bucket = (
        max_exact
        + (
            torch.log(distance.float() / max_exact)
            / math.log(max_distance / max_exact)
            * (num_buckets - max_exact)
        ).long()
    )
    log_bucket = torch.clamp(log_bucket, max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, log_bucket)


class T5LayerNorm(nn.Module):
    """RMS norm: ``weight * x / sqrt(mean(x^2) + eps)``, no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.cfg = cfg
        inner = cfg.num_heads * cfg.d_kv  # need not equal d_model
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def compute_bias(self, length: int) -> torch.Tensor:
        """Relative position bias (1, heads, L, L), added to the attention logits of every block."""
        device = self.relative_attention_bias.weight.device
        position = torch.arange(length, dtype=torch.long, device=device)
        relative = position[None, :] - position[:, None]  # (L_query, L_key): key minus query
        bucket = relative_position_bucket(
            relative, self.cfg.relative_attention_num_buckets, self.cfg.relative_attention_max_distance
        )
        return self.relative_attention_bias(bucket).permute(2, 0, 1).unsqueeze(0)  # (1, heads, L, L)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = (
            lin(x).view(B, L, self.cfg.num_heads, self.cfg.d_kv).transpose(1, 2)  # (B, heads, L, d_kv)
            for lin in (self.q, self.k, self.v)
        )
        # bias: position bias with padded keys at the dtype's minimum, (B, heads, L, L); T5 does not scale
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        return self.o(y.transpose(1, 2).reshape(B, L, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nn.Module):
    """Flan-T5 (``gated-gelu``): ``wo(gelu_new(wi_0 x) * wi_1 x)``."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = gelu_new(self.wi_0(x)) * self.wi_1(x)
        return self.wo(h.to(self.wo.weight.dtype))  # wo may be kept in float32 (see the docstring)


class T5DenseActDense(nn.Module):
    """T5 v1.0 (``relu``): ``wo(relu(wi x))``."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(F.relu(self.wi(x)).to(self.wo.weight.dtype))


class T5LayerFF(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg) if cfg.gated else T5DenseActDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        # layer.0 self-attention, layer.1 feed-forward (a decoder block would have cross-attention between)
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, has_relative_attention_bias), T5LayerFF(cfg)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = _clamp_fp16(self.layer[0](x, bias))
        return _clamp_fp16(self.layer[1](x))


class T5Stack(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.block = nn.ModuleList(
            T5Block(cfg, has_relative_attention_bias=i == 0) for i in range(cfg.num_layers)
        )
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        bias = self.block[0].layer[0].SelfAttention.compute_bias(L)  # (1, heads, L, L)
        key_valid = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L)
        bias = bias.masked_fill(~key_valid, torch.finfo(bias.dtype).min)  # (B, heads, L, L)
        for block in self.block:
            x = block(x, bias)
        return self.final_layer_norm(x)


class T5Encoder(nn.Module):
    """``T5EncoderModel`` without the decoder; attribute names are the checkpoint's keys."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids and mask (B, L) -> hidden states (B, L, d_model).

        Equals ``T5EncoderModel(input_ids, attention_mask=attention_mask).last_hidden_state``.
        """
        return self.encoder(self.shared(input_ids), attention_mask)


def _untie_embedding(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Leave the token embedding under ``shared.weight`` only.

    ``T5EncoderModel`` ties ``encoder.embed_tokens.weight`` to ``shared.weight``. safetensors files written by
    transformers keep one name (``shared.weight``); pickled ``.bin`` files written by older versions keep both.
    Both present: they must be equal, and the alias is dropped. Only the alias: it is renamed.
    """
    alias = state.pop("encoder.embed_tokens.weight", None)
    if alias is None:
        return state
    shared = state.get("shared.weight")
    if shared is None:
        state["shared.weight"] = alias
    elif shared.shape != alias.shape or not torch.equal(shared, alias):
        raise WeightsError(
            f"{source}: shared.weight and encoder.embed_tokens.weight differ; they should be tied"
        )
    return state


def _half_except_wo(model: T5Encoder) -> None:
    """float16 as transformers does it for T5: every parameter in float16 except the ``wo`` weights, which
    ``_keep_in_fp32_modules = ["wo"]`` keeps in float32 (for float16 only, not bfloat16). Called on a model
    loaded in float32, so ``wo`` keeps the file's values unrounded; the file's pages under the others go."""
    for name, p in model.named_parameters():
        if not name.endswith("DenseReluDense.wo.weight"):
            full = p.data
            p.data = full.half()
            release_pages(full)


def load_t5(
    ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> T5Encoder:
    """Build the T5 encoder of a checkpoint and fill it strictly from ``text_encoder_2/``."""
    cfg = t5_config(ckpt.config("text_encoder_2"))
    source = f"{ckpt.root}/text_encoder_2"
    with empty_init():  # meta device, no random init: the file fills every tensor
        model = T5Encoder(cfg)
    state = _untie_embedding(ckpt.read_weights("text_encoder_2"), source)
    if dtype != torch.float16:
        return load_strict(model, state, source, dtype=dtype, device=device).eval()
    model = load_strict(model, state, source, dtype=torch.float32, device=device)
    _half_except_wo(model)
    return model.eval()
