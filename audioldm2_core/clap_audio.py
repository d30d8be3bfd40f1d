"""CLAP audio encoder (HTSAT): log-mel features -> L2-normalised audio embedding, for candidate re-ranking.

Place in the AudioLDM 2 data flow: after generation, when more than one waveform per prompt is asked for.
Each 16 kHz waveform is resampled to 48 kHz and turned into log-mel features (``audio.py``); this module
embeds them into the joint CLAP space, where ``rerank.py`` compares them with the prompt's CLAP text
embedding. Generation itself never uses it, so it is loaded only when re-ranking asks for it.

    input_features (B, 1, T, 64)  T = 1001 frames for 10 s at 48 kHz, hop 480
      batch_norm                  per-mel-bin BatchNorm (running statistics)
      reshape_mel2img             (B, 1, 256, 256): time stretched to 1024 frames (bicubic), cut into
                                  freq_ratio = 4 chunks of 256 frames stacked along the mel axis
      patch_embed                 4x4 conv, stride 4 -> (B, 64*64, C) tokens, LayerNorm
      4 Swin stages               window attention (8x8 windows, every other block shifted by 4) with a
                                  learned relative position bias; patch merging (2x2 -> 1, width x2)
                                  between stages: 64x64xC -> 32x32x2C -> 16x16x4C -> 8x8x8C
      norm, mean over tokens      (B, 8C) = (B, hidden_size)
      audio_projection            Linear, ReLU, Linear -> (B, projection_dim), then L2-normalised

Reference: ``ClapModel.get_audio_features`` in transformers ``models/clap/modeling_clap.py`` (its
``pooler_output``), the HTSAT of LAION-AI/CLAP (Chen et al. 2022) built on the Swin transformer (Liu et al.
2021). Attribute names are the checkpoint's keys (``audio_model.audio_encoder.layers.0.blocks.1.attention
.self.query``...), so the ``audio_model.*`` / ``audio_projection.*`` tensors of ``text_encoder/`` load
strictly with no rename table.

Quirks:
- The file's top level is the whole ``ClapModel`` (text and audio branches). This module mirrors it minus
  the text branch: ``audio_model`` (a wrapper with one child, ``audio_encoder``, kept for the key names),
  ``audio_projection`` and ``logit_scale_t``, the log temperature that ``logits_per_text`` (what the
  reference pipeline ranks by) multiplies with. ``logit_scale_a`` belongs to ``logits_per_audio`` and is
  not read.
- Two kinds of tensors in the file are not weights: ``relative_position_index`` (a constant table derived
  from the window size) and BatchNorm's ``num_batches_tracked`` (a training counter). The loader checks the
  former against the table computed here and drops both (``_derived_keys``); the module has no buffer
  for them, so a file without them loads too.
- The reference's "group 2D CNN" reshape of the last hidden state before its AdaptiveAvgPool1d only
  permutes tokens before a global average, so the pooled output is the mean over all tokens (equal to
  float32 rounding).
- A stage whose resolution equals the window (the last one: 8x8) is one window and is never shifted, as in
  the reference. Layouts the hub does not use (a resolution not a multiple of the window, which the
  reference pads; a window larger than the resolution, which the reference's bias table cannot serve)
  are rejected at construction.
- Shifted windows mask pairs of tokens from different regions with -100 (not -inf), as the reference.
- Fusion (``enable_fusion``, four-channel input for longer-than-10-s audio) is rejected by the config.

Left out on purpose: fusion, the AudioSet classification head (not in the HF model), drop path, dropout,
``output_attentions`` / hidden-state outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .clap_text import ProjectionHead
from .config import ClapAudioConfig, clap_audio_config, htsat_stages
from .errors import UnsupportedConfigError, UsageError, WeightsError
from .loading import Checkpoint, empty_init, load_strict

__all__ = ["ClapAudio", "load_clap_audio", "is_audio_key", "relative_position_index"]

_MASKED = -100.0  # the reference's value for token pairs split by the cyclic shift


# ------------------------------------------------------------------------------------- window helpers


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, window * window, C), windows in row-major order within each batch item."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, C)


def window_reverse(windows: torch.Tensor, window: int, H: int, W: int) -> torch.Tensor:
    """(B * nW, window * window, C) -> (B, H, W, C); inverse of :func:`window_partition`."""
    C = windows.shape[-1]
    x = windows.view(-1, H // window, W // window, window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


def relative_position_index(window: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(N, N) index into the (2w-1)^2-row bias table for each token pair of a w x w window (N = w * w)."""
    r = torch.arange(window, device=device)
    coords = torch.stack(torch.meshgrid(r, r, indexing="ij")).flatten(1)  # (2, N): row, column of each token
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2), each in [-(w-1), w-1]
    rel = rel + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shifted_window_mask(H: int, W: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """(nW, N, N) additive mask: 0 where two tokens of a window came from the same side of the cyclic shift.

    After rolling by -shift, the last window of each row/column holds tokens from up to three regions
    (``[0, H-w)``, ``[H-w, H-shift)``, ``[H-shift, H)`` per axis) that are not neighbours in the image.
    """
    h = torch.arange(H, device=device)
    w = torch.arange(W, device=device)
    h_region = (h >= H - window).long() + (h >= H - shift).long()
    w_region = (w >= W - window).long() + (w >= W - shift).long()
    region = (h_region[:, None] * 3 + w_region[None, :]).float()  # (H, W)
    region = window_partition(region[None, :, :, None], window)[..., 0]  # (nW, N)
    differ = region[:, None, :] != region[:, :, None]  # (nW, N, N)
    return torch.zeros(differ.shape, device=device).masked_fill(differ, _MASKED)


# ---------------------------------------------------------------------------------------- Swin blocks


class _Dense(nn.Module):
    """HF wraps single Linear layers in modules (``intermediate``, ``output``, ``attention.output``);
    this container mirrors their one ``.dense`` key."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)


class SwinSelfAttention(nn.Module):
    """Multi-head attention inside each window, with a learned bias per relative offset and head."""

    def __init__(self, dim: int, num_heads: int, window: int, qkv_bias: bool):
        super().__init__()
        if dim % num_heads:
            raise UnsupportedConfigError(f"CLAP audio: width {dim} is not a multiple of {num_heads} heads")
        self.num_heads, self.window = num_heads, window
        self.relative_position_bias_table = nn.Parameter(torch.empty((2 * window - 1) ** 2, num_heads))
        self.query = nn.Linear(dim, dim, bias=qkv_bias)
        self.key = nn.Linear(dim, dim, bias=qkv_bias)
        self.value = nn.Linear(dim, dim, bias=qkv_bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x (B * nW, N, C), mask (nW, N, N) or None -> (B * nW, N, C)."""
        BW, N, C = x.shape
        heads, d = self.num_heads, C // self.num_heads
        q, k, v = (p(x).view(BW, N, heads, d).transpose(1, 2) for p in (self.query, self.key, self.value))
        table = self.relative_position_bias_table  # ((2w-1)^2, heads)
        bias = table[relative_position_index(self.window, table.device).view(-1)]  # (N * N, heads)
        bias = bias.view(N, N, heads).permute(2, 0, 1)  # (heads, N, N)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        else:
            nW = mask.shape[0]
            # group windows by batch item so the per-window mask broadcasts: (B, nW, heads, N, d)
            q, k, v = (t.view(BW // nW, nW, heads, N, d) for t in (q, k, v))
            attn_mask = (bias[None] + mask[:, None]).to(q.dtype)  # (nW, heads, N, N)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return out.reshape(BW, heads, N, d).transpose(1, 2).reshape(BW, N, C)


class SwinAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, window: int, qkv_bias: bool):
        super().__init__()
        self.self = SwinSelfAttention(dim, num_heads, window, qkv_bias)  # HF key: attention.self
        self.output = _Dense(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, mask))


class SwinLayer(nn.Module):
    """Pre-norm block: (shifted) window attention, then a GELU MLP, each in a residual."""

    def __init__(self, cfg: ClapAudioConfig, dim: int, resolution: tuple[int, int], heads: int, shift: int):
        super().__init__()
        self.resolution, self.window, self.shift = resolution, cfg.window_size, shift
        self.layernorm_before = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.attention = SwinAttention(dim, heads, cfg.window_size, cfg.qkv_bias)
        self.layernorm_after = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.intermediate = _Dense(dim, int(cfg.mlp_ratio * dim))
        self.output = _Dense(int(cfg.mlp_ratio * dim), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H * W, C) -> (B, H * W, C)."""
        (H, W), w, s = self.resolution, self.window, self.shift
        B, L, C = x.shape
        h = self.layernorm_before(x).view(B, H, W, C)
        mask = None
        if s:
            h = torch.roll(h, shifts=(-s, -s), dims=(1, 2))
            mask = shifted_window_mask(H, W, w, s, x.device)
        h = self.attention(window_partition(h, w), mask)  # (B * nW, w * w, C)
        h = window_reverse(h, w, H, W)  # (B, H, W, C)
        if s:
            h = torch.roll(h, shifts=(s, s), dims=(1, 2))
        x = x + h.reshape(B, L, C)
        return x + self.output(F.gelu(self.intermediate(self.layernorm_after(x))))


class SwinPatchMerging(nn.Module):
    """2x2 neighbouring tokens -> one token: concatenate (4C), LayerNorm, project to 2C."""

    def __init__(self, dim: int, resolution: tuple[int, int]):
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)  # default eps 1e-5, not layer_norm_eps (as the reference)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H * W, C) -> (B, H/2 * W/2, 2C)."""
        (H, W), (B, _, C) = self.resolution, x.shape
        x = x.view(B, H, W, C)
        # channel order of the checkpoint: (row 0, col 0), (row 1, col 0), (row 0, col 1), (row 1, col 1)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(B, -1, 4 * C)))


class SwinStage(nn.Module):
    def __init__(self, cfg: ClapAudioConfig, i: int, resolution: tuple[int, int]):
        super().__init__()
        dim = cfg.patch_embeds_hidden_size * 2**i
        # A stage no larger than the window is a single window, never shifted (the reference's
        # set_shift_and_window_size); otherwise every second block is shifted by half a window.
        one_window = min(resolution) <= cfg.window_size
        shifts = [0 if j % 2 == 0 or one_window else cfg.window_size // 2 for j in range(cfg.depths[i])]
        self.blocks = nn.ModuleList([SwinLayer(cfg, dim, resolution, cfg.num_heads[i], s) for s in shifts])
        last = i == len(cfg.depths) - 1
        self.downsample = None if last else SwinPatchMerging(dim, resolution)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


# ------------------------------------------------------------------------------------------- encoder


class MelBatchNorm(nn.Module):
    """Inference BatchNorm over the mel axis (the file's ``batch_norm``, a BatchNorm2d over 64 channels).

    Not ``nn.BatchNorm2d``: that would demand the training counter ``num_batches_tracked`` from the file.
    """

    def __init__(self, num_mel_bins: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(num_mel_bins))
        self.bias = nn.Parameter(torch.empty(num_mel_bins))
        self.register_buffer("running_mean", torch.empty(num_mel_bins))  # persistent: filled by the loader
        self.register_buffer("running_var", torch.empty(num_mel_bins))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, T, mel) -> same shape, normalised per mel bin (the reference's transpose(1, 3) trick)."""
        x = x.transpose(1, 3)  # (B, mel, T, C)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return x.transpose(1, 3)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ClapAudioConfig):
        super().__init__()
        kernel, stride = cfg.patch_size, cfg.patch_stride  # (H, W) pairs
        padding = ((kernel[0] - stride[0]) // 2, (kernel[1] - stride[1]) // 2)
        self.proj = nn.Conv2d(
            cfg.patch_embed_input_channels,
            cfg.patch_embeds_hidden_size,
            kernel,
            stride=stride,
            padding=padding,
        )
        self.norm = (
            nn.LayerNorm(cfg.patch_embeds_hidden_size) if cfg.enable_patch_layer_norm else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 1, S, S) -> (B, S/4 * S/4, C)."""
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class HTSATEncoder(nn.Module):
    """The Swin transformer over the log-mel "image" (HF ``ClapAudioEncoder``)."""

    def __init__(self, cfg: ClapAudioConfig):
        super().__init__()
        resolutions = htsat_stages(cfg)  # (H, W) per stage; raises for layouts we cannot run
        self.spec_size = cfg.spec_size
        self.freq_ratio = cfg.spec_size // cfg.num_mel_bins
        self.batch_norm = MelBatchNorm(cfg.num_mel_bins)
        self.patch_embed = PatchEmbed(cfg)
        self.layers = nn.ModuleList([SwinStage(cfg, i, r) for i, r in enumerate(resolutions)])
        self.norm = nn.LayerNorm(cfg.hidden_size)  # default eps 1e-5, as the reference

    def reshape_mel2img(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, mel) -> (B, C, S, S): the log-mel stretched to S * r frames and folded into a square.

        S = spec_size, r = freq_ratio = S / mel: the time axis is cut into r chunks of S frames that are
        stacked along the mel axis, so the square holds r mel "bands" of r consecutive time chunks.
        """
        B, C, T, M = x.shape
        width, height = self.spec_size * self.freq_ratio, self.spec_size // self.freq_ratio
        if T > width or M > height:
            raise UsageError(f"CLAP audio: features of {T} frames x {M} mel bins exceed {width} x {height}")
        if T < width:  # bicubic stretch in time (identity along mel: align_corners with equal sizes)
            x = F.interpolate(x, (width, M), mode="bicubic", align_corners=True)
        if M < height:
            x = F.interpolate(x, (x.shape[2], height), mode="bicubic", align_corners=True)
        B, C, T, M = x.shape
        x = x.reshape(B, C * self.freq_ratio, T // self.freq_ratio, M)  # (B, C*r, S, mel): r time chunks
        x = x.permute(0, 1, 3, 2)  # (B, C*r, mel, S)
        return x.reshape(B, C, M * self.freq_ratio, T // self.freq_ratio)  # (B, C, S, S)

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        """input_features (B, 1, T, mel) -> pooled (B, hidden_size)."""
        x = self.reshape_mel2img(self.batch_norm(input_features))
        x = self.patch_embed(x)  # (B, (S/4)^2, C)
        for stage in self.layers:
            x = stage(x)
        return self.norm(x).mean(dim=1)  # the reference's token regrouping + average pool, in one


class ClapAudioModel(nn.Module):
    """HF's wrapper level; it only exists so the keys read ``audio_model.audio_encoder.*``."""

    def __init__(self, cfg: ClapAudioConfig):
        super().__init__()
        self.audio_encoder = HTSATEncoder(cfg)


class ClapAudio(nn.Module):
    """``ClapModel`` without its text branch: audio features -> unit-norm embeddings, plus the text scale."""

    def __init__(self, cfg: ClapAudioConfig):
        super().__init__()
        self.cfg = cfg
        self.audio_model = ClapAudioModel(cfg)
        self.audio_projection = ProjectionHead(cfg.hidden_size, cfg.projection_dim)  # the text branch's MLP
        self.logit_scale_t = nn.Parameter(torch.empty(()))  # log of the logits_per_text temperature

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        """input_features (B, 1, T, mel) log-mel from ``audio.clap_features`` -> (B, projection_dim), unit norm."""
        pooled = self.audio_model.audio_encoder(input_features)
        return F.normalize(self.audio_projection(pooled), dim=-1)


# ------------------------------------------------------------------------------------------- loading


def is_audio_key(key: str) -> bool:
    """The keys of ``text_encoder/`` that re-ranking reads; the text branch and ``logit_scale_a`` are not."""
    return key.startswith(("audio_model.", "audio_projection.")) or key == "logit_scale_t"


def _derived_keys(
    state: dict[str, torch.Tensor], cfg: ClapAudioConfig, source: str
) -> dict[str, torch.Tensor]:
    """Drop the non-weight tensors of the file after checking the constant ones (see module docstring)."""
    expected = relative_position_index(cfg.window_size)
    out = {}
    for key, value in state.items():
        if key.endswith(".relative_position_index"):
            if value.shape != expected.shape or not torch.equal(value.long(), expected):
                raise WeightsError(f"{source}: {key} is not the table of a {cfg.window_size}-wide window")
        elif not key.endswith(".num_batches_tracked"):
            out[key] = value
    return out


def load_clap_audio(
    ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> ClapAudio:
    """Build the CLAP audio branch and fill it strictly from the audio keys of ``text_encoder/``."""
    cfg = clap_audio_config(ckpt.config("text_encoder"))
    with empty_init():  # meta device, no random init: the file fills every tensor
        model = ClapAudio(cfg)
    source = f"{ckpt.root}/text_encoder"
    state = _derived_keys(ckpt.read_weights("text_encoder", select=is_audio_key), cfg, source)
    return load_strict(model, state, source, dtype=dtype, device=device).eval()
