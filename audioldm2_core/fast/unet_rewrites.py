"""The UNet's rewrites: its feed-forward's GEGLU, its attention, its transformers' projections, its upsamplers
and the call itself.

    fused-geglu        GEGLU: one GEMM, chunk, GELU, product      two GEMMs on the weight's row halves, GELU
                                                                  fused into the gate's, the product in place
    folded-attention   cross-attention to a short context         to_q folded into the keys, to_out into the
                                                                  values: 2NC(HL) instead of 2NC(C+L) MACs
    cpu-attention      SDPA of the self-attentions                the C++ kernel (``cpu_attention``), for a
                                                                  model optimized with ``cpu_attention=True``
    token-projections  Transformer2D's 1x1 proj_in / proj_out     linears in the token layout (no NCHW copy)
    phase-upsampling   nearest 2x + 3x3 conv                      four 2x2 convs of the input (``convs``)
    shared-guidance    the UNet on [x, x] under guidance          the layers before the first conditioned
                                                                  transformer once on x, then repeated
    packed-linear      its 16-bit linears, reordered every call   weights packed once (``linears``)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import unet
from . import cpu_attention
from .convs import nearest2x_conv3x3, upsample_pays
from .guards import global_hooks, hooked, no_grad, twin, untouched
from .linears import linear, unet_call
from .plan import Plan

# cpu-attention's per-shape decisions time at most this many tokens, and that decision serves every longer
# length (no full-size probe for a minute of audio): both kernels' cost grows with the keys alike (the kernel
# against PyTorch's at 2048 and 4096 tokens: 2.06x and 2.20x on AVX-512, 0.95x and 1.02x held to AVX2)
ATTENTION_PROBE_TOKENS = 2048


@twin
class FastGEGLU(unet.GEGLU):
    """GEGLU as two GEMMs on the weight's row halves (no copy), GELU fused into the gate's GEMM and the product
    in place: no chunked intermediates, and the next linear reads a contiguous input (rewrite ``fused-geglu``)."""

    def forward(self, x: Tensor) -> Tensor:
        proj = self.proj
        if not (untouched(proj) and no_grad(x, proj.weight, proj.bias)):
            return super().forward(x)
        n, plan = proj.weight.shape[0] // 2, self.fast_plan
        h = linear(x, proj.weight[:n], proj.bias[:n], plan=plan)
        return h.mul_(linear(x, proj.weight[n:], proj.bias[n:], gelu=True, plan=plan))


@twin
class FastAttention(unet.Attention):
    """Folded cross-attention (``folded-attention``) and the C++ self-attention kernel (``cpu-attention``)."""

    def forward(self, x: Tensor, context: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        plan = self.fast_plan
        if context is None and bias is None and plan.on("cpu-attention", x.dtype):
            B, N, _ = x.shape
            q, k, v = (
                p(x).view(B, N, self.heads, -1).transpose(1, 2) for p in (self.to_q, self.to_k, self.to_v)
            )
            if cpu_attention.applies(q, k, v) and plan.pays_for_shape(
                "cpu-attention", x.dtype, (B, self.heads, min(N, ATTENTION_PROBE_TOKENS), q.shape[-1])
            ):
                out = cpu_attention.attention(q, k, v)  # (B, N, heads * d)
            else:
                out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1)
            return self.to_out[0](out)
        if context is not None and self._fold_pays(x, context, plan):
            return self._folded(x, context, bias)
        return super().forward(x, context, bias)

    def _fold_pays(self, x: Tensor, context: Tensor, plan: Plan) -> bool:
        """Fewer multiply-adds (H L < C + L), full precision (in 16-bit formats the folded scores would be
        rounded before the softmax), to_q and to_out untouched, and no gradient to record."""
        to_out = self.to_out[0]
        return (
            x.dtype in (torch.float32, torch.float64)
            and plan.on("folded-attention", x.dtype)
            and self.heads * context.shape[1] < x.shape[-1] + context.shape[1]
            and untouched(self.to_q, to_out)
            and no_grad(x, context, self.to_q.weight, to_out.weight, to_out.bias)
        )

    def _folded(self, x: Tensor, context: Tensor, bias: Tensor | None) -> Tensor:
        """Per head h: scores = (x Wq_h^T)(k_h^T) / sqrt(d) = x (Wq_h^T k_h^T / sqrt(d)), and
        out = sum_h P_h v_h Wo_h^T + b = [P_1 .. P_H] [v_1 Wo_1^T; ..; v_H Wo_H^T] + b. The context is short
        (8 GPT-2 states, a dozen T5 tokens), so both products have H L columns / rows instead of the C-wide
        query and output projections of every one of the N tokens."""
        B, N, C = x.shape
        H, L = self.heads, context.shape[1]
        k = self.to_k(context).view(B, L, H, -1)  # (B, L, H, d)
        v = self.to_v(context).view(B, L, H, -1)
        d = k.shape[-1]
        to_out = self.to_out[0]
        keys = torch.einsum("hdc,blhd->bchl", self.to_q.weight.view(H, d, C), k) * d**-0.5  # (B, C, H, L)
        values = torch.einsum("blhd,chd->bhlc", v, to_out.weight.view(-1, H, d))  # (B, H, L, C_out)
        scores = torch.bmm(x, keys.reshape(B, C, H * L)).view(B, N, H, L)
        if bias is not None:
            scores = scores + bias.reshape(bias.shape[0], 1, 1, L)  # (B, 1, 1, L): every query, every head
        probs = scores.softmax(-1).view(B, N, H * L)
        return torch.baddbmm(to_out.bias, probs, values.reshape(B, H * L, -1))  # (B, N, C_out)


@twin
class FastTransformer2D(unet.Transformer2DModel):
    """The 1x1 ``proj_in`` / ``proj_out`` as linears on the tokens: the same sums in the layout the blocks use,
    so no NCHW copy sits between them (rewrite ``token-projections``)."""

    def forward(self, x: Tensor, context: Tensor | None, bias: Tensor | None) -> Tensor:
        if not untouched(self.proj_in, self.proj_out):
            return super().forward(x, context, bias)
        B, C, H, W = x.shape
        plan = self.fast_plan
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, H*W, C)
        h = linear(h, self.proj_in.weight.flatten(1), self.proj_in.bias, plan=plan)  # (B, H*W, inner)
        for block in self.transformer_blocks:
            h = block(h, context, bias)
        h = linear(h, self.proj_out.weight.flatten(1), self.proj_out.bias, plan=plan)  # (B, H*W, C)
        return torch.add(x, h.view(B, H, W, C).permute(0, 3, 1, 2))  # x first: the result is NCHW like x


@twin
class FastUNetUpsample(unet.Upsample2D):
    """Nearest 2x + 3x3 conv as four 2x2 convs (rewrite ``phase-upsampling``); other sizes stay plain."""

    def forward(self, x: Tensor, size: torch.Size | None = None) -> Tensor:
        if upsample_pays(x, self.conv, size, self.fast_plan):
            return nearest2x_conv3x3(x, self.conv)
        return super().forward(x, size)


@twin
class FastUNet(unet.AudioLDM2UNet):
    """Two rewrites of a UNet call.

    ``shared-guidance``: under classifier-free guidance the two halves of the batch are the same latents
    (``torch.cat([x] * 2)``) at the same step: the layers before the first transformer that reads a condition
    (``conv_in``, the first down block, the next block's first resnet and its self-attention-only transformer:
    ~6% of a call) give the same rows for both halves, so they run once on the first half and their outputs
    are repeated. Checked per call: the halves equal, no hooks in those layers (which would see half the
    batch), and no gradient recorded.

    ``packed-linear`` (16-bit): the linears inside the call read their weights in oneDNN's blocked layout,
    reordered once (``packed_weight``) instead of on every call: the UNet's run 20-200 times a generation."""

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor | float | int,
        encoder_hidden_states: Tensor,
        encoder_hidden_states_1: Tensor | None = None,
        encoder_attention_mask_1: Tensor | None = None,
    ) -> Tensor:
        args = (sample, timestep, encoder_hidden_states, encoder_hidden_states_1, encoder_attention_mask_1)
        # (under torch.compile the linears are the compiler's: nothing to pack)
        if not self.fast_plan.on("packed-linear", sample.dtype) or torch.compiler.is_compiling():
            return self._guided_forward(*args)
        with unet_call():
            return self._guided_forward(*args)

    def _guided_forward(self, sample, timestep, encoder_hidden_states, *rest) -> Tensor:
        args = (sample, timestep, encoder_hidden_states, *rest)
        B = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1)
        if not (
            self.fast_plan.on("shared-guidance", sample.dtype)
            and B % 2 == 0
            and encoder_hidden_states.shape[0] == B
            and t.numel() in (1, B)
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and not global_hooks()
            and not any(hooked(m) for m in self._prefix_modules())
            and (t.numel() == 1 or t[: B // 2].equal(t[B // 2 :]))
            and sample[: B // 2].equal(sample[B // 2 :])
        ):
            return super().forward(*args)
        return self._shared_forward(sample[: B // 2], t.expand(B), *args[2:])

    def _prefix_modules(self) -> Iterable[nn.Module]:
        """The modules that may run on half the batch (conservatively: the first two down blocks whole)."""
        yield from self.conv_in.modules()
        yield from self.down_blocks[0].modules()
        yield from self.down_blocks[1].modules()

    def _shared_forward(self, x, t, ehs, ehs_1, mask_1) -> Tensor:
        """The plain forward with ``x`` holding half the batch until a layer reads a condition."""
        cfg, B = self.cfg, ehs.shape[0]
        t_emb = unet.timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = self.time_embedding(t_emb.to(x.dtype))  # (B, temb_dim): rows equal across the halves
        contexts = self.contexts(ehs, ehs_1, mask_1, x.dtype)

        def widen(h: Tensor) -> Tensor:
            return h if h.shape[0] == B else torch.cat([h, h])

        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:  # DownBlock.forward, widening before the first conditioned transformer
            if x.shape[0] == B:
                x, block_skips = block(x, temb, contexts)
                skips += block_skips
                continue
            for i, resnet in enumerate(block.resnets):
                x = resnet(x, temb[: x.shape[0]])
                for j, (context, bias) in enumerate(contexts[: block.per_resnet]):
                    x = block.attentions[i * block.per_resnet + j](
                        x if context is None else widen(x), context, bias
                    )
                skips.append(x)
            if block.downsamplers is not None:
                x = block.downsamplers[0](x)
                skips.append(x)
        x = self.mid_block(widen(x), temb, contexts)
        skips = [widen(s) for s in skips]
        for block in self.up_blocks:
            k = len(block.resnets)
            block_skips, skips = skips[-k:], skips[:-k]
            x = block(x, block_skips, temb, contexts, skips[-1].shape[-2:] if skips else None)
        return self.conv_out(F.silu(self.conv_norm_out(x)))
