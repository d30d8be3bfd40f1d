"""GPT-2 as AudioLDM 2 uses it: a language model that continues a sequence of *embeddings*, not tokens.

Place in the AudioLDM 2 data flow: ``projection.py`` turns the CLAP and T5 encodings of the prompt into one
sequence of GPT-2-wide vectors (B, L, 768) with a mask; ``generate`` continues it by ``max_new_tokens`` (8)
vectors, each the final hidden state of the previous step fed back as the next input embedding. Those
vectors (B, 8, 768), the "language of audio" (LOA), are the UNet's first cross-attention condition.

    inputs_embeds (B, T, D) + wpe[positions]
      h[i]      n_layer x pre-norm block: ln_1, causal self-attention (c_attn, c_proj),
                ln_2, MLP (c_fc, gelu_new, c_proj)
      ln_f
    hidden states (B, T, D)

    generate:  prefill(the whole prompt sequence)            -> state 1 (the last position's output)
               decode_one(state k at the next position) x 7  -> states 2..8

References: karpathy/nanoGPT ``model.py`` and pytorch-labs/gpt-fast ``generate.py`` for the shape of the
code; for the numbers, diffusers ``AudioLDM2Pipeline.generate_language_model`` (pipelines/audioldm2/
pipeline_audioldm2.py) driving transformers 5 ``GPT2Model`` (models/gpt2/modeling_gpt2.py).

Semantics we follow exactly (they are what the reference does, not what one might guess):
- Position ids are a plain arange over the whole sequence, padding included: the prompt's positions are
  0..L-1 and the k-th new state sits at L-1+k. They are *not* derived from the mask.
- The mask is the projection's: padding sits in the middle of the sequence (between the T5 tokens and the
  T5 end vector), masked as keys for every query; each new position is valid, so the mask grows by ones.
  Attention is causal on top of it.
- What is fed back is the output of ``ln_f`` at the last position (transformers' ``hidden_states[-1]``).

Checkpoint quirks, each handled in one place:
- ``c_attn``, ``c_proj``, ``c_fc`` are OpenAI's ``Conv1D``: a linear layer whose weight is stored
  (in, out), the transpose of ``nn.Linear``'s. We keep that layout (``Conv1D`` below, ``x @ W + b``) rather
  than transposing at load time, so the file's tensors load as they are.
- The file is a ``GPT2Model`` and holds the token embedding ``wte`` (vocab x D, 154 MB at float32), which
  embedding-driven generation never uses. ``_language_model_weights`` asserts it is there and does not read
  it; the module has no ``wte``. The same function skips the causal-mask buffers (``attn.bias``,
  ``attn.masked_bias``) that files from old transformers versions may hold, as transformers itself does.

Left out on purpose: token ids and the LM head, sampling, cross-attention, ``scale_attn_by_inverse_layer_idx``
and ``reorder_and_upcast_attn`` (rejected by the config), dropout, a growing cache object.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import GPT2Config, gpt2_config
from .errors import ConfigError, UsageError, WeightsError
from .loading import Checkpoint, empty_init, load_strict

__all__ = ["GPT2", "KVCache", "generate", "load_gpt2"]


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of GELU, written as transformers' ``NewGELUActivation`` writes it."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class KVCache:
    """Keys and values of every layer for one generation, allocated once: (n_layer, B, heads, T_max, d).

    A plain object, not a module: it is created per call by ``generate`` and holds no weights.
    """

    def __init__(self, cfg: GPT2Config, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (cfg.n_layer, batch, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(
        self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, heads, T, d) at positions pos..pos+T-1; return all keys and values so far."""
        end = pos + k.shape[2]
        self.k[layer, :, :, pos:end] = k
        self.v[layer, :, :, pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, heads, end, d)


class Conv1D(nn.Module):
    """OpenAI GPT-2's linear layer: weight stored (in, out); ``y = b + x @ W``."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_in, d_out))
        self.bias = nn.Parameter(torch.empty(d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)  # b + x @ W, as transformers
        return y.view(*x.shape[:-1], -1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPT2Config, layer: int):
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ConfigError(f"GPT-2: n_embd {cfg.n_embd} not divisible by {cfg.n_head} heads")
        self.n_head, self.layer = cfg.n_head, layer
        self.c_attn = Conv1D(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = Conv1D(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cache: KVCache | None, pos: int) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.c_attn(x).split(D, dim=2)
        # (B, T, D) -> (B, heads, T, d)
        q, k, v = (t.view(B, T, self.n_head, D // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(self.layer, pos, k, v)  # (B, h, pos + T, d)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # scale 1/sqrt(d), as the reference
        return self.c_proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.c_fc = Conv1D(cfg.n_embd, cfg.n_inner)
        self.c_proj = Conv1D(cfg.n_inner, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(gelu_new(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cache: KVCache | None, pos: int) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache, pos)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """``GPT2Model`` without the token embedding; attribute names are the checkpoint's keys."""

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.cfg = cfg
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)

    def forward(
        self,
        x: torch.Tensor,
        key_valid: torch.Tensor | None = None,
        cache: KVCache | None = None,
        pos: int = 0,
    ) -> torch.Tensor:
        """Embeddings (B, T, D) at positions pos..pos+T-1 -> final hidden states (B, T, D).

        key_valid (B, pos + T): the mask of every position so far (padding False / 0; None: all valid).
        Without ``cache`` this is the plain causal forward over x (pos 0), as for teacher-forced training;
        with one, the keys and values of positions < pos come from it.
        """
        B, T = x.shape[:2]
        if cache is None and pos != 0:
            raise UsageError("GPT-2: a forward from position > 0 needs the cache of the positions before it")
        key_valid = (
            torch.ones(B, pos + T, dtype=torch.bool, device=x.device) if key_valid is None else key_valid
        )
        key_valid = key_valid.bool()
        positions = torch.arange(pos, pos + T, device=x.device)
        # query i (at pos + i) sees key j when j <= pos + i and j is not padding: (B, 1, T, pos + T)
        causal = positions[:, None] >= torch.arange(pos + T, device=x.device)[None, :]
        mask = causal[None, None] & key_valid[:, None, None, :]
        x = x + self.wpe(positions)
        for block in self.h:
            x = block(x, mask, cache, pos)
        return self.ln_f(x)


def prefill(
    model: GPT2, inputs_embeds: torch.Tensor, key_valid: torch.Tensor, cache: KVCache
) -> torch.Tensor:
    """Run the whole prompt sequence (B, L, D); return the last position's output (B, 1, D)."""
    return model(inputs_embeds, key_valid, cache, pos=0)[:, -1:]


def decode_one(
    model: GPT2, x: torch.Tensor, key_valid: torch.Tensor, cache: KVCache, pos: int
) -> torch.Tensor:
    """Feed one state (B, 1, D) at position ``pos``; return the next one (B, 1, D)."""
    return model(x, key_valid[:, : pos + 1], cache, pos)


def generate(
    model: GPT2, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int
) -> torch.Tensor:
    """Continue a sequence of embeddings (B, L, D) with mask (B, L) by ``max_new_tokens`` states (B, n, D).

    Equals diffusers' ``AudioLDM2Pipeline.generate_language_model(inputs_embeds, attention_mask=...,
    max_new_tokens=n)`` (the pipeline reads ``n`` from ``model.cfg.max_new_tokens``, 8). With autograd
    recording, each step reruns the whole sequence without a cache (the cache's in-place writes would
    invalidate the keys saved for backward); the result is the same.
    """
    B, L, D = inputs_embeds.shape
    if attention_mask.shape != (B, L):
        raise UsageError(
            f"GPT-2: attention_mask {tuple(attention_mask.shape)} does not match inputs {(B, L)}"
        )
    if max_new_tokens < 1:
        raise UsageError(f"GPT-2: max_new_tokens must be at least 1, got {max_new_tokens}")
    if L + max_new_tokens - 1 > model.cfg.n_positions:
        raise UsageError(
            f"GPT-2: {L} input states + {max_new_tokens} new ones exceed its {model.cfg.n_positions} positions"
        )
    # every generated position is valid: the mask grows by ones, (B, L + max_new_tokens - 1)
    key_valid = torch.cat([attention_mask != 0, attention_mask.new_ones(B, max_new_tokens - 1).bool()], dim=1)
    if torch.is_grad_enabled():
        sequence = inputs_embeds
        for _ in range(max_new_tokens):
            x = model(sequence, key_valid[:, : sequence.shape[1]])[:, -1:]
            sequence = torch.cat([sequence, x], dim=1)
        return sequence[:, L:]
    cache = KVCache(model.cfg, B, L + max_new_tokens - 1, inputs_embeds.dtype, inputs_embeds.device)
    x = prefill(model, inputs_embeds, key_valid[:, :L], cache)
    states = [x]
    for pos in range(L, L + max_new_tokens - 1):
        x = decode_one(model, x, key_valid, cache, pos)
        states.append(x)
    return torch.cat(states, dim=1)


def _language_model_weights(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """Read ``language_model/`` without ``wte.weight`` (asserted present) and old causal-mask buffers.

    The one place where the file and our module differ. ``wte`` is what makes the file a ``GPT2Model``; its
    absence means some other file. ``h.N.attn.bias`` / ``h.N.attn.masked_bias`` are constant mask tables
    that transformers < 4.31 saved and that transformers ignores on load (``_keys_to_ignore_on_load_unexpected``).
    A ``GPT2LMHeadModel`` folder (what a pipeline built for transformers 5 saves, as diffusers' own tests build
    it) holds the same tensors under ``transformer.``, and ``lm_head.weight`` only when untied: never used.
    """
    head = ckpt.index["language_model"][1] == "GPT2LMHeadModel"
    prefix = "transformer." if head else ""
    skip = {prefix + "wte.weight", "lm_head.weight"} if head else {"wte.weight"}
    seen: list[str] = []

    def wanted(key: str) -> bool:
        seen.append(key)
        return key not in skip and not key.endswith((".attn.bias", ".attn.masked_bias"))

    state = ckpt.read_weights("language_model", select=wanted)
    if prefix + "wte.weight" not in seen:
        raise WeightsError(f"{ckpt.root}/language_model: no {prefix}wte.weight; not a GPT-2 file")
    return {k.removeprefix(prefix): v for k, v in state.items()}


def load_gpt2(
    ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> GPT2:
    """Build the GPT-2 of a checkpoint and fill it strictly from ``language_model/``."""
    cfg = gpt2_config(ckpt.config("language_model"))
    with empty_init():  # meta device, no random init: the file fills every tensor
        model = GPT2(cfg)
    source = f"{ckpt.root}/language_model"
    return load_strict(model, _language_model_weights(ckpt), source, dtype=dtype, device=device).eval()
