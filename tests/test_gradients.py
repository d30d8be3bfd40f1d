"""Gradients: the components are differentiable modules, and the stages work under autograd, as diffusers'.

Researchers fine-tune and probe the model; ``inference_mode`` is only inside ``AudioLDM2.__call__``.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

from audioldm2_core import AudioLDM2
from tests.helpers import rel_err
from weights_tools.reference import reference_pipeline


@pytest.fixture(scope="module")
def pipes(tiny_base):
    """(ours with the speed layer, ours plain, diffusers' pipeline: a fresh one, whose parameters we grad)."""
    return (
        AudioLDM2.from_pretrained(tiny_base),
        AudioLDM2.from_pretrained(tiny_base, fast=False),
        reference_pipeline.__wrapped__(str(tiny_base)),
    )


def _unet_grads(unet, x, t, loa, t5, mask, target, reference: bool):
    unet.zero_grad()
    x = x.clone().requires_grad_(True)
    kw = dict(encoder_hidden_states=loa, encoder_hidden_states_1=t5, encoder_attention_mask_1=mask)
    out = unet(x, t, return_dict=False, **kw)[0] if reference else unet(x, t, **kw)
    (out * target).sum().backward()
    params = {name: p.grad.clone() for name, p in unet.named_parameters()}
    unet.zero_grad()
    return x.grad, params


def test_unet_gradients_equal_diffusers(pipes):
    """With respect to the latents and to every UNet parameter (matched by checkpoint key)."""
    ours, plain, ref = pipes
    g = torch.Generator().manual_seed(0)
    lm, t5_dim = plain.unet.cfg.cross_attention_dims[0][1:3]
    x = torch.randn(2, 8, 32, 16, generator=g)
    loa, t5 = torch.randn(2, 8, lm, generator=g), torch.randn(2, 7, t5_dim, generator=g)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    target = torch.randn(2, 8, 32, 16, generator=g)
    want_x, want_p = _unet_grads(ref.unet, x, torch.tensor(700), loa, t5, mask, target, reference=True)
    f64 = [t.double() for t in (x, loa, t5, target)]
    _, exact_p = _unet_grads(
        copy.deepcopy(ref.unet).double(),
        f64[0],
        torch.tensor(700),
        f64[1],
        f64[2],
        mask,
        f64[3],
        reference=True,
    )
    for pipe in (plain, ours):
        got_x, got_p = _unet_grads(pipe.unet, x, torch.tensor(700), loa, t5, mask, target, reference=False)
        assert got_p.keys() == want_p.keys()
        assert rel_err(got_x, want_x) <= 1e-4
        assert (
            rel_err(
                torch.cat([got_p[k].flatten() for k in want_p]),
                torch.cat([v.flatten() for v in want_p.values()]),
            )
            <= 1e-4
        )
        # Per tensor, against the float64 gradients: ours no further from them than diffusers' float32 ones
        # (x2). A relative bound per tensor would not do: a few gradients are sums that cancel to ~1e-6 of the
        # others (biases right before a GroupNorm), where float32 rounding is all that is left on either side.
        for k, v in exact_p.items():
            assert (got_p[k] - v).norm() <= 2 * (want_p[k] - v).norm() + 1e-4 * v.norm() + 1e-12, k


def test_gradient_checkpointing_gives_the_same_gradients(pipes):
    """``enable_gradient_checkpointing`` (diffusers' method): the blocks' resnets and transformers run again in
    the backward (seen by a pre-hook: the recomputation stops once it has what the backward needs, before the
    module's forward hooks), and every gradient is the one without it."""
    _, plain, _ = pipes
    unet = copy.deepcopy(plain.unet)
    g = torch.Generator().manual_seed(4)
    lm, t5_dim = unet.cfg.cross_attention_dims[0][1:3]
    x, target = torch.randn(2, 8, 16, 16, generator=g), torch.randn(2, 8, 16, 16, generator=g)
    loa, t5 = torch.randn(2, 8, lm, generator=g), torch.randn(2, 5, t5_dim, generator=g)
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2])
    calls = []
    unet.mid_block.resnets[0].register_forward_pre_hook(lambda *_: calls.append(1))
    want_x, want_p = _unet_grads(unet, x, torch.tensor([3, 600]), loa, t5, mask, target, reference=False)
    assert len(calls) == 1
    unet.enable_gradient_checkpointing()
    got_x, got_p = _unet_grads(unet, x, torch.tensor([3, 600]), loa, t5, mask, target, reference=False)
    assert len(calls) == 3  # its forward, and again in the backward
    assert rel_err(got_x, want_x) <= 1e-6
    for name, grad in want_p.items():
        assert rel_err(got_p[name], grad) <= 1e-6, name
    unet.disable_gradient_checkpointing()
    with torch.no_grad():  # and no recomputation, nor any change, without autograd
        assert torch.equal(unet(x, 3, loa, t5, mask), plain.unet(x, 3, loa, t5, mask))


def test_waveform_loss_reaches_the_latents(pipes):
    """Backprop from a loss on the waveform through the vocoder and the VAE decoder to the latents: in float64
    the same gradient as diffusers' (ours plain and with the speed layer); in float32 finite and non-zero. (In
    float32 the leaky-ReLU kinks make this gradient ill-conditioned: rounding flips a few slopes, 1e-6 to 1e-3
    relative depending on the CPU's kernels, for diffusers' stack as for ours.)"""
    ours, plain, ref = pipes
    latents = torch.randn(1, 8, 16, 16, generator=torch.Generator().manual_seed(1))

    def grad(decode, dtype):
        z = latents.to(dtype).clone().requires_grad_(True)
        decode(z).square().mean().backward()
        return z.grad

    got32 = grad(ours.decode, torch.float32)
    assert torch.isfinite(got32).all() and got32.abs().sum() > 0
    vae, vocoder = copy.deepcopy(ref.vae).double(), copy.deepcopy(ref.vocoder).double()
    want = grad(lambda z: vocoder(vae.decode(z / vae.config.scaling_factor).sample.squeeze(1)), torch.float64)
    for pipe in (plain, ours):
        vae64, vocoder64 = copy.deepcopy(pipe.vae).double(), copy.deepcopy(pipe.vocoder).double()
        decode = lambda z, vae=vae64, vocoder=vocoder64: vocoder(vae.decode(z).squeeze(1))  # noqa: E731
        assert rel_err(grad(decode, torch.float64), want) <= 1e-10


def test_encode_prompt_under_autograd(pipes):
    """The text stages record a graph: gradients reach the projection, GPT-2 and T5 parameters, and the
    conditions are the same numbers as without autograd."""
    ours, _, _ = pipes
    with torch.no_grad():
        expected = ours.encode_prompt("a dog barking", negative_prompt="noise")
    t5, mask, loa = ours.encode_prompt("a dog barking", negative_prompt="noise")
    assert t5.requires_grad and loa.requires_grad
    for got, want in zip((t5, mask, loa), expected, strict=True):
        assert rel_err(got.detach().float(), want.float()) <= 1e-6
    (t5.square().sum() + loa.square().sum()).backward()
    for component in ("projection_model", "language_model", "text_encoder_2", "text_encoder"):
        module = getattr(ours, component)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), component
        module.zero_grad()


def test_gpt2_cache_free_forward_equals_transformers(pipes):
    """Teacher forcing: one causal forward over a whole sequence, no cache, as transformers' GPT2Model."""
    ours, _, ref = pipes
    g = torch.Generator().manual_seed(2)
    lm = ours.language_model
    x = torch.randn(2, 11, lm.cfg.n_embd, generator=g, requires_grad=True)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 3:6] = 0
    got = lm(x, mask)
    want = ref.language_model.transformer(inputs_embeds=x, attention_mask=mask).last_hidden_state
    keep = mask.bool()  # padded positions' outputs are not used by anyone
    assert rel_err(got[keep], want[keep]) <= 1e-5
    (got[keep].sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def _readme_snippet() -> str:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Modify and fine-tune", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_fine_tuning_lowers_the_loss(tiny_base):
    """The README's LoRA fine-tuning example, run on the tiny checkpoint: the denoising loss goes down."""
    from audioldm2_core.samplers import alphas_cumprod

    # the tiny checkpoint, a short clip, and a learning rate for a model of its width
    code = _readme_snippet().replace('"cvssp/audioldm2"', repr(str(tiny_base)))
    code = code.replace("torch.randn(1, 8, 256, 16)", "torch.randn(1, 8, 32, 16)").replace(
        "lr=1e-3", "lr=3e-2"
    )
    assert "(1, 8, 32, 16)" in code and "lr=3e-2" in code
    torch.manual_seed(0)
    scope: dict = {}

    def loss_of(unet, z0, t5, mask, loa) -> float:
        g = torch.Generator().manual_seed(3)
        alphas = alphas_cumprod(AudioLDM2.from_pretrained(tiny_base, low_memory=True).scheduler_config)
        total = 0.0
        with torch.no_grad():
            for t in range(25, 1000, 50):
                noise = torch.randn(z0.shape, generator=g)
                zt = alphas[t].sqrt() * z0 + (1 - alphas[t]).sqrt() * noise
                total += torch.nn.functional.mse_loss(
                    unet(zt, torch.tensor([t]), loa, t5, mask), noise
                ).item()
        return total

    exec(
        compile(
            code.replace("for step in range(100):", "before = 0\nfor step in range(0):"), "README", "exec"
        ),
        scope,
    )
    before = loss_of(scope["unet"], scope["z0"], scope["t5"], scope["mask"], scope["loa"])
    torch.manual_seed(0)
    scope = {}
    exec(compile(code, "README", "exec"), scope)
    after = loss_of(scope["unet"], scope["z0"], scope["t5"], scope["mask"], scope["loa"])
    assert after < 0.97 * before, (before, after)
    trainable = [n for n, p in scope["unet"].named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".down.weight", ".up.weight")) for n in trainable)
