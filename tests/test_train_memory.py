"""What a training step keeps for its backward (``train/memory.py``): the lean modules give the plain modules'
outputs and gradients, keep less, stand aside where they would change anything, and come off again."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from audioldm2_core import AudioLDM2, lora
from audioldm2_core.train import memory
from audioldm2_core.unet import GEGLU, ResnetBlock2D


@pytest.fixture(scope="module")
def plain_unet(tiny_base):
    return AudioLDM2.from_pretrained(tiny_base, fast=False, low_memory=True).unet


def inputs(unet, seed=0, frames=32):
    g = torch.Generator().manual_seed(seed)
    lm, t5_dim = unet.cfg.cross_attention_dims[0][1:3]
    x, target = torch.randn(2, 8, frames, 16, generator=g), torch.randn(2, 8, frames, 16, generator=g)
    loa, t5 = torch.randn(2, 8, lm, generator=g), torch.randn(2, 5, t5_dim, generator=g)
    return x, torch.tensor([3, 600]), loa, t5, torch.tensor([[1] * 5, [1] * 3 + [0] * 2]), target


def trained(unet, mode):
    """A copy of the UNet training what ``mode`` says: a LoRA on the attention (the default), a LoRA that also
    trains the resnets' convs, or every weight."""
    unet = copy.deepcopy(unet)
    if mode != "full":
        targets = lora.DEFAULT_TARGETS + (("conv1", "conv2") if mode == "lora+convs" else ())
        lora.inject(unet, 4, 4.0, targets, seed=0)
        with torch.no_grad():  # B starts at zero, which would leave A without a gradient
            for name, p in unet.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    for name, p in unet.named_parameters():
        p.requires_grad_(mode == "full" or "lora_" in name)
    return unet


def step(unet, x, t, loa, t5, mask, target, autocast=None):
    """The loss's gradients: the latents' and each trained parameter's; and the output."""
    unet.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = unet(x, t, loa, t5, mask)
    (out.float() * target).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["lora", "lora+convs", "full"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "checkpointed"])
def test_lean_modules_give_the_plain_gradients(plain_unet, mode, checkpointing):
    """The same kernels on the same tensors: the output and every gradient bit for bit as the plain modules'."""
    plain = trained(plain_unet, mode)
    lean = copy.deepcopy(plain)
    swapped = memory.keep_less(lean)
    assert swapped == sum(type(m) in memory.LEAN for m in plain.modules()) > 0
    if checkpointing:
        plain.enable_gradient_checkpointing(), lean.enable_gradient_checkpointing()
    want_out, want_x, want = step(plain, *inputs(plain))
    got_out, got_x, got = step(lean, *inputs(plain))
    assert torch.equal(got_out, want_out)
    assert got.keys() == want.keys() and len(got) > 0
    assert torch.equal(got_x, want_x)
    for name, grad in want.items():
        assert torch.equal(got[name], grad), name


def test_lean_modules_under_autocast(plain_unet):
    """bfloat16 autocast (``--mixed-precision bf16``): the lean GEGLU and convs follow autocast's casts; the
    norm stands aside (its dtype is autocast's to choose)."""
    plain = trained(plain_unet, "lora")
    lean = copy.deepcopy(plain)
    memory.keep_less(lean)
    want_out, want_x, want = step(plain, *inputs(plain, 1), autocast=torch.bfloat16)
    got_out, got_x, got = step(lean, *inputs(plain, 1), autocast=torch.bfloat16)
    assert got_out.dtype == want_out.dtype and torch.equal(got_out, want_out)
    assert torch.equal(got_x, want_x)
    for name, grad in want.items():
        assert torch.equal(got[name], grad), name


def kept_bytes(unet, *args) -> int:
    """Bytes a forward keeps for its backward (each storage once, parameters not counted)."""
    params = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    x, t, loa, t5, mask, _ = args
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(x, t, loa, t5, mask)
    return sum(seen.values())


def test_lean_modules_keep_less(plain_unet):
    """What each lean module leaves out: a LoRA run's forward keeps under 3/4 of the plain one's (full size,
    batch 2 x 10.24 s: 1.04 GB instead of 1.48, benchmarks/train_ab.py --saved)."""
    plain = trained(plain_unet, "lora")
    args = inputs(plain, 2, frames=64)
    before = kept_bytes(plain, *args)
    lean = copy.deepcopy(plain)
    memory.keep_less(lean)
    after = kept_bytes(lean, *args)
    assert after < 0.75 * before
    for kind in (GEGLU, nn.Conv2d, ResnetBlock2D):  # each one alone keeps less
        one = copy.deepcopy(plain)
        for m in one.modules():
            if type(m) is kind:
                m.__class__ = memory.LEAN[kind]
        assert kept_bytes(one, *args) < before, kind


def test_lean_resnets_stand_aside_for_hooks(plain_unet):
    """A resnet reads its norms' weights; a hook on a norm, or a global one, keeps it on the plain path (the
    hook runs) with the same numbers."""
    plain = trained(plain_unet, "lora")
    lean = copy.deepcopy(plain)
    memory.keep_less(lean)
    resnet = lean.up_blocks[-1].resnets[0]
    assert isinstance(resnet, memory.LeanResnetBlock2D)
    calls = []
    handle = resnet.norm1.register_forward_hook(lambda *_: calls.append(1))
    want_out, _, want = step(plain, *inputs(plain, 3))
    got_out, _, got = step(lean, *inputs(plain, 3))
    assert len(calls) == 1 and torch.equal(got_out, want_out)
    handle.remove()
    seen = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, *_: seen.append(m) if isinstance(m, nn.GroupNorm) else None
    )
    try:
        got_out, _, _ = step(lean, *inputs(plain, 3))
    finally:
        handle.remove()
    assert resnet.norm1 in seen and torch.equal(got_out, want_out)
    for name, grad in want.items():
        assert torch.equal(got[name], grad), name


def test_keep_all_restores_the_plain_classes(plain_unet):
    unet = copy.deepcopy(plain_unet)
    keys = list(unet.state_dict())
    memory.keep_less(unet)
    assert all(
        isinstance(m, (GEGLU, nn.Conv2d, ResnetBlock2D))
        for m in unet.modules()
        if type(m) in memory.LEAN.values()
    )
    assert list(unet.state_dict()) == keys
    memory.keep_all(unet)
    assert not any(type(m) in memory.LEAN.values() for m in unet.modules())
    assert [type(m) for m in unet.modules()] == [type(m) for m in plain_unet.modules()]


def test_prepare_hands_the_heap_back_only_while_checkpointing(plain_unet):
    cpu = torch.device("cpu")
    unet = copy.deepcopy(plain_unet)
    memory.prepare(unet, False, cpu)
    assert not hasattr(unet, "heap_hooks") and not unet.mid_block.gradient_checkpointing
    unet = copy.deepcopy(plain_unet)
    memory.prepare(unet, True, cpu)
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    assert all(b.gradient_checkpointing for b in blocks) and len(unet.heap_hooks) == len(blocks)
    assert all(len(b._forward_pre_hooks) == 1 for b in blocks)
    for h in unet.heap_hooks:
        h.remove()
    assert not any(b._forward_pre_hooks for b in blocks)


def test_a_weight_changed_in_place_before_the_backward_is_refused_as_autograd_refuses_it():
    """What the lean modules keep is checked as autograd checks what it keeps: a frozen weight changed in
    place between the forward and the backward raises, as it does for the plain modules."""
    torch.manual_seed(0)
    plain = ResnetBlock2D(32, 64, 16, 8, 1e-5).requires_grad_(False)
    for lean in (False, True):
        block = copy.deepcopy(plain)
        if lean:
            assert memory.keep_less(block) == 4  # the block and its conv1, conv2, conv_shortcut
        for change in (block.conv1.weight, block.norm2.weight):
            x = torch.randn(2, 32, 8, 8, requires_grad=True)
            out = block(x, torch.randn(2, 16))
            with torch.no_grad():
                change.mul_(2)
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                out.sum().backward()
