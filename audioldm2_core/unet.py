"""The AudioLDM 2 denoiser: a latent-diffusion UNet whose transformers attend two text streams.

A hand-written equivalent of diffusers' ``AudioLDM2UNet2DConditionModel`` (with ``ResnetBlock2D``,
``Transformer2DModel``, ``BasicTransformerBlock``, ``Attention``, GEGLU ``FeedForward``, ``Timesteps``,
``TimestepEmbedding``, ``Downsample2D``, ``Upsample2D``), itself the Stable Diffusion UNet (Rombach et
al. 2022) with several transformers after each resnet instead of one.

Place in the data flow: text -> CLAP + T5 -> projection -> GPT-2 generates the "LOA" sequence ->
**this UNet predicts the noise of the latent at each sampler step** -> VAE decoder -> mel -> vocoder.

Shapes (B = batch, twice the prompts under classifier-free guidance):
    sample                   (B, C=8, T, F)  noisy latent; T = mel frames / 4 (time), F = 64 mel bins / 4 = 16
    timestep                 int, float, 0-d tensor or (B,)
    encoder_hidden_states    (B, L1, 768)    GPT-2 stream (AudioLDM 2's "LOA", L1 = 8); never masked
    encoder_hidden_states_1  (B, L2, 1024)   T5 stream: the Flan-T5 encoder output itself (not projected)
    encoder_attention_mask_1 (B, L2)         1 keep / 0 pad, for the T5 stream
    returns                  (B, C, T, F)    the predicted noise (or v, per the scheduler config)

Layout: conv_in -> down blocks (resnets, each followed by one Transformer2D per entry of the block's
``cross_attention_dim`` list, then a stride-2 conv) -> mid block (resnet, transformers, resnet) -> up
blocks (concatenate the matching skip, resnet, transformers; nearest x2 + conv) -> GroupNorm, SiLU, conv_out.
The first down block and the last up block have no transformers (``DownBlock2D`` / ``UpBlock2D``).

Quirks, all as in the reference:
- Which stream a transformer attends is decided by its *position* in the block's list, not by its width:
  positions 0 and 1 get ``encoder_hidden_states`` (GPT-2, no mask: the pipeline passes none), positions
  2 and up get ``encoder_hidden_states_1`` with ``encoder_attention_mask_1``. A ``None`` entry is a
  transformer whose second attention is another self-attention (diffusers' ``double_self_attention``).
  Hub configs: base/music ``[None, 768, 1024]``, large ``[None, 768, 1024, None]`` (2 layers per
  transformer), speech ``[None, 768]`` (the second stream is then unused).
- The hub's ``attention_head_dim`` is a head *count* (see config.py); head width = channels // heads.
- Padding is an additive bias of -10000, not -inf: a prompt whose keys are all padding is then
  attended as if unmasked, not NaN.
- Latent sizes not divisible by 8 work: each upsampler interpolates to the size of the skip it meets,
  which is what diffusers does then (and equals x2 otherwise). Stride-2 convs round up: T=25 -> 13 -> 7 -> 4.
- The transformers' GroupNorm uses eps 1e-6, the resnets' and the output's ``norm_eps`` (1e-5).

This file is the plain computation, module by module as diffusers writes it. The exact rewrites that make
inference faster (folded cross-attention, fused GEGLU, phase upsampling, oneDNN linears, ...) live in
the speed layer (``fast/``) and are applied to a loaded model from outside; they stand aside for hooked or replaced modules.

Gradient checkpointing (``enable_gradient_checkpointing``, as diffusers'): each resnet and transformer of the
blocks keeps only its inputs for the backward and runs again there, trading a second forward for most of the
activations' memory; the numbers are the same.

Left out on purpose: class/timestep-cond embeddings, attention processors and slicing, dropout, FreeU,
adapter registries (wrap or replace a module instead), ``return_dict``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import UNetConfig, unet_config
from .errors import UsageError
from .loading import Checkpoint, empty_init, load_strict

__all__ = ["AudioLDM2UNet", "load_unet", "timestep_embedding"]

# One (context, additive attention bias) pair per transformer position; (None, None) = self-attention.
Contexts = list[tuple[Tensor | None, Tensor | None]]


def timestep_embedding(t: Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> Tensor:
    """DDPM sinusoidal embedding (diffusers ``Timesteps``): (B,) -> (B, dim) float32; [cos, sin] if flip."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device)
    exponent = exponent / (half - freq_shift)
    args = t[:, None].float() * torch.exp(exponent)[None, :]  # (B, half)
    emb = torch.cat(
        [torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)], -1
    )
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added in between; 1x1 conv skip when widths differ."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, groups: int, eps: float, scale: float = 1.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.output_scale_factor = scale  # mid_block_scale_factor for the mid block (1 on the hub)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        """x (B, in_ch, H, W), temb (B, temb_dim) -> (B, out_ch, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor


class Attention(nn.Module):
    """Multi-head attention without q/k/v biases; self-attention when no context is given."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])  # to_out.1 was a Dropout: no weights

    def forward(self, x: Tensor, context: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        """x (B, N, query_dim), context (B, L, context_dim), bias broadcastable to (B, heads, N, L)."""
        context = x if context is None else context
        B, N, _ = x.shape
        L = context.shape[1]
        q = self.to_q(x).view(B, N, self.heads, -1).transpose(1, 2)  # (B, heads, N, d)
        k = self.to_k(context).view(B, L, self.heads, -1).transpose(1, 2)  # (B, heads, L, d)
        v = self.to_v(context).view(B, L, self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # scale 1/sqrt(d)
        return self.to_out[0](out.transpose(1, 2).reshape(B, N, -1))  # (B, N, heads * d)


class GEGLU(nn.Module):
    """A GELU-gated linear unit (Shazeer 2020): one projection to twice the width, split into value and gate."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: Tensor) -> Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)  # exact (erf) GELU


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # net.1 was a Dropout: an Identity keeps the checkpoint's indices (net.0.proj, net.2).
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim)])

    def forward(self, x: Tensor) -> Tensor:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm: self-attention, then cross-attention (or a second self-attention), then GEGLU MLP."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim or dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor | None, bias: Tensor | None) -> Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context, bias) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nn.Module):
    """GroupNorm, 1x1 conv in, transformer blocks over the H*W cells as tokens, 1x1 conv out, residual."""

    def __init__(self, channels: int, heads: int, context_dim: int | None, num_layers: int, groups: int):
        super().__init__()
        head_dim = channels // heads
        inner = heads * head_dim
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, head_dim, context_dim) for _ in range(num_layers)]
        )
        self.proj_out = nn.Conv2d(inner, channels, 1)

    def forward(self, x: Tensor, context: Tensor | None, bias: Tensor | None) -> Tensor:
        B, _, H, W = x.shape
        h = self.proj_in(self.norm(x))
        inner = h.shape[1]
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, inner)  # (B, H*W, inner): one token per latent cell
        for block in self.transformer_blocks:
            h = block(h, context, bias)
        h = h.reshape(B, H, W, inner).permute(0, 3, 1, 2).contiguous()  # (B, inner, H, W)
        return self.proj_out(h) + x


class Downsample2D(nn.Module):
    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))  # diffusers pads right/bottom only in that case
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: torch.Size | None = None) -> Tensor:
        """Nearest-neighbour to ``size`` (the next skip's H, W: 2x, or less for odd sizes), then a conv."""
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


def _transformers(
    channels: int, context_dims: tuple[int | None, ...], num_layers: int, heads: int, groups: int, n: int
) -> nn.ModuleList:
    """``n`` groups of one Transformer2D per condition position, flat as the checkpoint numbers them."""
    return nn.ModuleList(
        [Transformer2DModel(channels, heads, d, num_layers, groups) for _ in range(n) for d in context_dims]
    )


class Block(nn.Module):
    """What the down, mid and up blocks share: running their resnets and transformers, each checkpointed
    (its activations recomputed in the backward) while ``gradient_checkpointing`` is on and autograd records."""

    gradient_checkpointing = False

    def run(self, module: nn.Module, *args: Tensor | None) -> Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)


class DownBlock(Block):
    """diffusers' ``CrossAttnDownBlock2D`` (``context_dims`` non-empty) or ``DownBlock2D`` (empty)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        cfg: UNetConfig,
        context_dims: tuple[int | None, ...],
        transformer_layers: int,
        heads: int,
        num_resnets: int,
        add_downsample: bool,
    ):
        super().__init__()
        g, eps, temb, n = cfg.norm_num_groups, cfg.norm_eps, cfg.time_embed_dim, num_resnets
        self.per_resnet = len(context_dims)  # transformers after each resnet
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb, g, eps) for i in range(n)]
        )
        self.attentions = _transformers(out_ch, context_dims, transformer_layers, heads, g, n)
        self.downsamplers = (
            nn.ModuleList([Downsample2D(out_ch, cfg.downsample_padding)]) if add_downsample else None
        )

    def forward(self, x: Tensor, temb: Tensor, contexts: Contexts) -> tuple[Tensor, list[Tensor]]:
        """Returns the output and the skips: each resnet(+transformers) output, then the downsampled one."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = self.run(resnet, x, temb)
            for j, (context, bias) in enumerate(contexts[: self.per_resnet]):
                x = self.run(self.attentions[i * self.per_resnet + j], x, context, bias)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(Block):
    """diffusers' ``UNetMidBlock2DCrossAttn``: resnet, one transformer per condition position, resnet."""

    def __init__(self, ch: int, cfg: UNetConfig):
        super().__init__()
        g, eps, temb, s = cfg.norm_num_groups, cfg.norm_eps, cfg.time_embed_dim, cfg.mid_block_scale_factor
        dims = cfg.cross_attention_dims[-1]
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, temb, g, eps, s) for _ in range(2)])
        self.attentions = _transformers(ch, dims, cfg.transformer_layers[-1], cfg.num_heads[-1], g, 1)

    def forward(self, x: Tensor, temb: Tensor, contexts: Contexts) -> Tensor:
        x = self.run(self.resnets[0], x, temb)
        for attention, (context, bias) in zip(self.attentions, contexts, strict=True):
            x = self.run(attention, x, context, bias)
        return self.run(self.resnets[1], x, temb)


class UpBlock(Block):
    """diffusers' ``CrossAttnUpBlock2D`` / ``UpBlock2D``: each resnet first concatenates one skip."""

    def __init__(
        self,
        prev_ch: int,
        out_ch: int,
        skip_ch: int,
        cfg: UNetConfig,
        context_dims: tuple[int | None, ...],
        transformer_layers: int,
        heads: int,
        num_resnets: int,
        add_upsample: bool,
    ):
        super().__init__()
        g, eps, temb, n = cfg.norm_num_groups, cfg.norm_eps, cfg.time_embed_dim, num_resnets
        # Resnet i takes (previous output ++ skip); the last skip comes from the coarser level (skip_ch).
        ins = [(prev_ch if i == 0 else out_ch) + (skip_ch if i == n - 1 else out_ch) for i in range(n)]
        self.per_resnet = len(context_dims)
        self.resnets = nn.ModuleList([ResnetBlock2D(c, out_ch, temb, g, eps) for c in ins])
        self.attentions = _transformers(out_ch, context_dims, transformer_layers, heads, g, n)
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if add_upsample else None

    def forward(
        self, x: Tensor, skips: list[Tensor], temb: Tensor, contexts: Contexts, size: torch.Size | None
    ) -> Tensor:
        """``skips`` in down order (this block uses them last-first); ``size``: where to upsample to."""
        for i, (resnet, skip) in enumerate(zip(self.resnets, reversed(skips), strict=True)):
            x = self.run(resnet, torch.cat([x, skip], dim=1), temb)  # (B, C_x + C_skip, H, W)
            for j, (context, bias) in enumerate(contexts[: self.per_resnet]):
                x = self.run(self.attentions[i * self.per_resnet + j], x, context, bias)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)
        return x


class AudioLDM2UNet(nn.Module):
    """The UNet, built from :class:`UNetConfig`; parameter names are the checkpoint's."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch, n = cfg.block_out_channels, len(cfg.block_out_channels)
        # The same list in every block with transformers (checked by config.py); the mid block has them.
        self.context_dims = cfg.cross_attention_dims[-1]
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], cfg.time_embed_dim)
        self.down_blocks = nn.ModuleList(
            [
                DownBlock(
                    ch[max(i - 1, 0)],
                    ch[i],
                    cfg,
                    cfg.cross_attention_dims[i] if cfg.down_attn[i] else (),
                    cfg.transformer_layers[i],
                    cfg.num_heads[i],
                    cfg.layers_per_block[i],
                    add_downsample=i < n - 1,
                )
                for i in range(n)
            ]
        )
        self.mid_block = MidBlock(ch[-1], cfg)
        # Up block i works at the level of down block n-1-i and reads that block's per-block settings.
        rev = ch[::-1]
        self.up_blocks = nn.ModuleList(
            [
                UpBlock(
                    rev[max(i - 1, 0)],
                    rev[i],
                    rev[min(i + 1, n - 1)],
                    cfg,
                    cfg.cross_attention_dims[n - 1 - i] if cfg.up_attn[i] else (),
                    cfg.transformer_layers[n - 1 - i],
                    cfg.num_heads[n - 1 - i],
                    cfg.layers_per_block[n - 1 - i]
                    + 1,  # one more resnet: it also eats the downsampler's skip
                    add_upsample=i < n - 1,
                )
                for i in range(n)
            ]
        )
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Checkpoint every resnet and transformer of the blocks while training (diffusers' method of the name):
        activations recomputed in the backward instead of kept; the same gradients."""
        for block in (*self.down_blocks, self.mid_block, *self.up_blocks):
            block.gradient_checkpointing = enabled

    def disable_gradient_checkpointing(self) -> None:
        self.enable_gradient_checkpointing(False)

    def contexts(
        self,
        encoder_hidden_states: Tensor,
        encoder_hidden_states_1: Tensor | None,
        mask_1: Tensor | None,
        dtype: torch.dtype,
    ) -> Contexts:
        """What the transformer at each position attends to, with its additive padding bias."""
        bias_1 = None
        if mask_1 is not None:
            bias_1 = (1 - mask_1.to(dtype)) * -10000.0  # (B, L2): 0 keep, -10000 pad
            bias_1 = bias_1[:, None, None, :]  # (B, 1, 1, L2): broadcast over heads and queries
        out: Contexts = []
        for position, dim in enumerate(self.context_dims):
            if dim is None:
                out.append((None, None))  # second self-attention
            elif position <= 1:
                out.append((encoder_hidden_states, None))  # GPT-2 stream, unmasked
            elif encoder_hidden_states_1 is None:
                raise UsageError(f"transformer position {position} attends encoder_hidden_states_1: pass it")
            else:
                out.append((encoder_hidden_states_1, bias_1))
        return out

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor | float | int,
        encoder_hidden_states: Tensor,
        encoder_hidden_states_1: Tensor | None = None,
        encoder_attention_mask_1: Tensor | None = None,
    ) -> Tensor:
        """Predict the noise of ``sample`` (B, C, T, F); see the module docstring for the conditions.

        ``timestep``: a scalar or (B,). Returns (B, C, T, F).
        """
        cfg = self.cfg
        B = sample.shape[0]
        if encoder_hidden_states.shape[0] != B:
            raise UsageError(
                f"sample batch {B} differs from encoder_hidden_states batch {encoder_hidden_states.shape[0]}"
            )
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1)
        if t.numel() not in (1, B):
            raise UsageError(
                f"timestep must be a scalar or ({B},) for a sample of batch {B}: {tuple(t.shape)}"
            )
        t_emb = timestep_embedding(
            t.expand(B), cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift
        )
        temb = self.time_embedding(t_emb.to(sample.dtype))  # (B, temb_dim)
        contexts = self.contexts(
            encoder_hidden_states, encoder_hidden_states_1, encoder_attention_mask_1, sample.dtype
        )

        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, contexts)
            skips += block_skips
        x = self.mid_block(x, temb, contexts)
        for block in self.up_blocks:
            k = len(block.resnets)
            block_skips, skips = skips[-k:], skips[:-k]
            # Upsample to the size of the next skip: 2x, or 1 less where a stride-2 conv rounded up.
            x = block(x, block_skips, temb, contexts, skips[-1].shape[-2:] if skips else None)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


def load_unet(
    ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> AudioLDM2UNet:
    """Build the UNet from ``unet/config.json`` and fill it strictly from ``unet/`` weights."""
    cfg = unet_config(ckpt.config("unet"))
    with empty_init():  # meta device, no random init: the file fills every tensor
        model = AudioLDM2UNet(cfg)
    load_strict(model, ckpt.read_weights("unet"), f"{ckpt.root}/unet", dtype=dtype, device=device)
    return model.eval()
