"""The speed layer (``audioldm2_core.fast``) against the plain model: each exact operation, each fast module,
whole models with every rewrite on, and the guarantees (hooks, replaced modules, changed weights, gradients,
CPUs without an instruction set)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import time
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from audioldm2_core import fast
from audioldm2_core.fast import (
    convs,
    decisions,
    linears,
    probes,
    unet_rewrites,
    vae_rewrites,
    vocoder_rewrites,
)
from audioldm2_core.fast.convs import (
    FastConv2d,
    gemm_conv3x3,
    nearest2x_conv3x3,
    phase_weights,
    winograd_conv3x3,
)
from audioldm2_core.fast.linears import FastLinear, linear
from audioldm2_core.fast.plan import PLAN, Plan, probe_rows, switch
from tests.helpers import rel_err


def _conv(cin: int, cout: int, dtype=torch.float32, bias: bool = True) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(cin, cout, 3, padding=1, bias=bias).to(dtype)


def _plain(x, conv):
    return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 6, 5, 3), (1, 4, 1, 7), (1, 3, 8, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_plain(layout, shape, bias):
    conv = _conv(shape[1], 5, bias=bias)
    x = torch.randn(*shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got, expected = nearest2x_conv3x3(x, conv), _plain(x, conv)
    assert got.shape == expected.shape
    assert rel_err(got, expected) < 1e-6
    if layout == "channels_last" and shape[2] > 1 and shape[3] > 1:
        assert got.is_contiguous(memory_format=torch.channels_last)  # the next conv keeps its layout


def test_exact_in_float64():
    """The decomposition itself is exact: only the rounding of the summed weights differs."""
    conv = _conv(4, 3, torch.float64)
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(nearest2x_conv3x3(x, conv), _plain(x, conv)) < 1e-14


def test_phase_weights_sum_to_kernel():
    w = torch.randn(3, 2, 3, 3)
    p = phase_weights(w)
    assert p.shape == (2, 2, 3, 2, 2, 2)
    for a in range(2):
        for b in range(2):  # every phase uses all nine taps exactly once
            torch.testing.assert_close(p[a, b].sum((-1, -2)), w.sum((-1, -2)))


def test_bfloat16_rounds_the_sums_once():
    conv = _conv(8, 8, torch.bfloat16)
    x = torch.randn(1, 8, 6, 6).to(torch.bfloat16)
    conv64 = _conv(8, 8, torch.bfloat16).double()  # the same bf16 weights, computed exactly
    with torch.no_grad():
        exact = _plain(x.double(), conv64)
        got = nearest2x_conv3x3(x, conv)
    assert got.dtype == torch.bfloat16
    assert rel_err(got.double(), exact) < 1e-2


def test_cache_follows_weight_changes():
    conv = _conv(3, 3)
    x = torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        first = nearest2x_conv3x3(x, conv)
        conv.weight.mul_(2)  # in place: the version changes
        assert rel_err(nearest2x_conv3x3(x, conv), _plain(x, conv)) < 1e-6
        conv.weight = nn.Parameter(torch.randn_like(conv.weight))  # replaced: the storage changes
        assert rel_err(nearest2x_conv3x3(x, conv), _plain(x, conv)) < 1e-6
    assert not torch.equal(first, nearest2x_conv3x3(x, conv).detach())


def test_inference_mode_cache_is_usable_outside():
    conv = _conv(3, 3)
    x = torch.randn(1, 3, 4, 4)
    with torch.inference_mode():
        nearest2x_conv3x3(x, conv)  # fills the cache inside inference mode
    with torch.no_grad():
        assert rel_err(nearest2x_conv3x3(x, conv), _plain(x, conv)) < 1e-6


def test_gradients_take_the_plain_path():
    """The fast upsampler under autograd: the plain interpolate + conv runs, gradients reach the conv."""
    from audioldm2_core.unet import Upsample2D

    torch.manual_seed(0)
    up = Upsample2D(3)
    quick = _fast_copy(up, select={"phase-upsampling"})
    assert type(quick) is unet_rewrites.FastUNetUpsample
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    quick(x).square().sum().backward()
    g_w, g_x = quick.conv.weight.grad.clone(), x.grad.clone()
    x.grad = None
    up(x).square().sum().backward()
    torch.testing.assert_close(up.conv.weight.grad, g_w)
    torch.testing.assert_close(x.grad, g_x)


def test_weights_made_in_inference_mode():
    """Weights made in inference mode have no version counter: the sums are then made per call."""
    with torch.inference_mode():
        conv = _conv(3, 3)
        x = torch.randn(1, 3, 4, 4)
        got = nearest2x_conv3x3(x, conv)
        assert rel_err(got, _plain(x, conv)) < 1e-6


# ---- linear -------------------------------------------------------------------------------------------------


def _plan(dtype: torch.dtype, *names: str) -> Plan:
    """A model's plan with ``names`` on, and oneDNN's linear for float32 and bfloat16 where this CPU supports it
    (the decision ``optimize`` takes)."""
    onednn = (
        dtype in (torch.float32, torch.bfloat16)
        and fast.decide("onednn-linear", dtype, timed=False).supported
    )
    return Plan(dtype, frozenset(names) | ({"onednn-linear"} if onednn else set()))


def _replan(model: nn.Module, **changes) -> Plan:
    """The plan of every switched module of ``model`` changed (``dataclasses.replace``); the new plan."""
    (old,) = {id(m.__dict__[PLAN]): m.__dict__[PLAN] for m in model.modules() if PLAN in m.__dict__}.values()
    plan = dataclasses.replace(old, **changes)
    for m in model.modules():
        if PLAN in m.__dict__:
            m.__dict__[PLAN] = plan
    return plan


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(2, 37, 24), (5, 24), (1, 1, 24), (0, 24), (24,), (2, 3, 4, 24)])
def test_linear_matches_f_linear(shape, bias, gelu):
    torch.manual_seed(0)
    x, w = torch.randn(*shape), torch.randn(40, 24)
    b = torch.randn(40) if bias else None
    expected = F.linear(x, w, b)
    expected = F.gelu(expected) if gelu else expected  # exact (erf) GELU
    with torch.no_grad():
        got = linear(x, w, b, gelu=gelu, plan=_plan(torch.float32))
    assert got.shape == expected.shape and got.dtype == expected.dtype
    if expected.numel():
        assert rel_err(got, expected) < 1e-6


def test_linear_reads_strided_inputs():
    """Transposed activations and a row slice of a weight (as GEGLU passes) give the same sums."""
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 24, 37).transpose(1, 2), torch.randn(80, 24), torch.randn(80)
    with torch.inference_mode():
        got = linear(x, w[40:], b[40:], plan=_plan(torch.float32))
    assert rel_err(got, F.linear(x, w[40:], b[40:])) < 1e-6


def test_linear_float64_is_f_linear_and_bfloat16_rounds_once():
    if not fast.decide("onednn-linear", torch.bfloat16, timed=False).supported:
        pytest.skip(
            "oneDNN has no bfloat16 matmul on this CPU (the fallback: test_bfloat16_without_cpu_support)"
        )
    """float64 runs ``F.linear`` (oneDNN has no float64 matmul): bit for bit. In bfloat16 the matmul is the one
    ``F.linear`` runs (bit for bit); the fused GELU acts before the rounding to bfloat16, so it is at least as
    close to the float64 value as the reference's GELU of the rounded product."""
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 7, 24), torch.randn(40, 24), torch.randn(40)
    plan, plan16 = _plan(torch.float32), _plan(torch.bfloat16)
    with torch.no_grad():
        x64, w64, b64 = x.double(), w.double(), b.double()
        assert torch.equal(linear(x64, w64, b64, plan=plan), F.linear(x64, w64, b64))
        assert torch.equal(linear(x64, w64, b64, gelu=True, plan=plan), F.gelu(F.linear(x64, w64, b64)))
        xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
        assert torch.equal(linear(xb, wb, bb, plan=plan16), F.linear(xb, wb, bb))
        exact = F.gelu(F.linear(xb.double(), wb.double(), bb.double()))
        got, ref = linear(xb, wb, bb, gelu=True, plan=plan16), F.gelu(F.linear(xb, wb, bb))
        assert got.dtype == torch.bfloat16
        assert rel_err(got, exact) <= rel_err(ref, exact) * 1.05 + 1e-6


def test_linear_under_autograd_is_differentiable():
    """oneDNN's op has no backward: with a gradient to record, ``F.linear`` runs, and gradients flow."""
    torch.manual_seed(0)
    layer = FastLinear(24, 40)
    x = torch.randn(3, 24, requires_grad=True)
    y = linear(x, layer.weight, layer.bias, gelu=True, plan=_plan(torch.float32))
    y.sum().backward()
    ref_x = x.detach().requires_grad_()
    ref_layer = nn.Linear(24, 40)
    ref_layer.load_state_dict(layer.state_dict())
    F.gelu(ref_layer(ref_x)).sum().backward()
    assert torch.allclose(x.grad, ref_x.grad) and torch.allclose(layer.weight.grad, ref_layer.weight.grad)


def test_linear_module_keeps_nn_linear_keys():
    layer, ref = FastLinear(24, 40, bias=False), nn.Linear(24, 40, bias=False)
    layer.fast_plan = _plan(torch.float32)
    assert layer.state_dict().keys() == ref.state_dict().keys() == {"weight"}
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(4, 24)
    with torch.no_grad():
        assert rel_err(layer(x), ref(x)) < 1e-6


def test_linear_respects_mkldnn_switched_off(monkeypatch):
    """``torch.backends.mkldnn.enabled = False`` (a user's way to rule oneDNN out) gives ``F.linear``."""
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 7, 24), torch.randn(40, 24), torch.randn(40)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # restored after the test
    plan = _plan(torch.float32)
    with torch.no_grad():
        assert torch.equal(linear(x, w, b, plan=plan), F.linear(x, w, b))
        assert torch.equal(linear(x, w, b, gelu=True, plan=plan), F.gelu(F.linear(x, w, b)))


def test_a_build_without_onednn_keeps_the_plain_linears(monkeypatch, tiny_base):
    """A PyTorch built without oneDNN registers no ``mkldnn`` ops: the rewrites that need its matmul are
    unsupported there (not a crash at load), ``linear`` is ``F.linear`` even where a kept decision says on,
    and a generation gives the plain model's audio."""
    from audioldm2_core import AudioLDM2

    def generate(**kwargs):
        pipe = AudioLDM2.from_pretrained(tiny_base, **kwargs)
        g = torch.Generator().manual_seed(0)
        return pipe("rain", num_inference_steps=2, audio_length_in_s=1.0, generator=g).audios

    want = generate(fast=False)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    linears.has_onednn_matmul.cache_clear()
    try:
        torch.manual_seed(0)
        x, w, b = torch.randn(3, 7, 24), torch.randn(40, 24), torch.randn(40)
        with torch.no_grad():
            assert torch.equal(
                linear(x, w, b, plan=Plan(torch.float32, frozenset({"onednn-linear"}))), F.linear(x, w, b)
            )
        for name, dtype in [("onednn-linear", torch.float32), ("packed-linear", torch.bfloat16)]:
            decision = decisions._probe(name, dtype, timed=True)
            assert not decision.supported and "no oneDNN matmul" in decision.reason
        assert rel_err(torch.as_tensor(generate()), torch.as_tensor(want)) < 1e-5
    finally:
        monkeypatch.undo()
        linears.has_onednn_matmul.cache_clear()
    assert linears.has_onednn_matmul()


def test_uncached_leaves_nothing_behind():
    conv = _conv(4, 5)
    x = torch.randn(1, 4, 3, 5)
    with torch.no_grad():
        got = nearest2x_conv3x3(x, conv, cache=False)
        assert torch.equal(got, nearest2x_conv3x3(x, conv))  # the same sums either way
    assert "_phase_weights" in conv.__dict__  # the cached call above
    conv.__dict__.pop("_phase_weights")
    with torch.no_grad():
        nearest2x_conv3x3(x, conv, cache=False)
    assert "_phase_weights" not in conv.__dict__


# ---- packed-linear --------------------------------------------------------------------------------------


def _mm(x, w, b=None):
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "none")


# oneDNN's sums on a packed weight are the plain call's bit for bit from torch 2.13 (the pinned one) on; older
# oneDNN (torch 2.6) runs another kernel on the blocked layout: the same to rounding
PACKED_BIT_EXACT = torch.__version__ >= "2.13"


def _same_sums(got, want, rounding):
    return torch.equal(got, want) if PACKED_BIT_EXACT else rel_err(got, want) < rounding


def test_packed_weight_is_the_same_numbers_kept_per_version():
    """oneDNN's blocked copy holds the same numbers and gives oneDNN's sums (float32 here, where the op
    exists on every x86 CPU; the rewrite itself is decided for 16-bit), is made once per parameter version and
    view (a GEGLU's row halves separately), is remade after an in-place change, and goes with its parameter.
    The sums are bit for bit with torch 2.13's oneDNN; torch 2.6's runs another float32 kernel on the blocked
    layout, 7e-8 apart (its bfloat16 sums, the rewrite's, are bit for bit)."""
    import gc

    def same(packed, weight):
        return torch.equal(packed.to_dense(), weight) and _same_sums(_mm(x, packed), _mm(x, weight), 1e-6)

    torch.manual_seed(0)
    layer = nn.Linear(24, 40)
    x = torch.randn(3, 7, 24)
    kept = Plan().packed  # a plan's
    with torch.no_grad():
        top, bottom = layer.weight[:20], layer.weight[20:]
        p_top, p_bottom = linears.packed_weight(top, kept), linears.packed_weight(bottom, kept)
        assert same(p_top, top) and same(p_bottom, bottom)
        assert linears.packed_weight(layer.weight[:20], kept) is p_top  # a new view of the same rows: kept
        assert len(kept[layer.weight]) == 2
        layer.weight.mul_(2)  # a user's change: the version counter moves, the copy is remade
        again = linears.packed_weight(layer.weight[:20], kept)
        assert again is not p_top and same(again, layer.weight[:20])
    with torch.inference_mode():
        made_here = torch.randn(40, 24)  # an inference tensor has no version counter: used as it is
        assert linears.packed_weight(made_here, kept) is made_here
    assert layer.weight in kept
    del layer, top, bottom
    gc.collect()
    assert len(kept) == 0


def test_packed_linear_is_decided_for_16_bit_only():
    """float32 weights are the checkpoint's memory maps (a packed copy would double them): not offered. In
    bfloat16 it is the plain matmul's numbers where oneDNN has the op (bit for bit with torch 2.13's oneDNN;
    with torch 2.6's, 0.02% of the outputs one bfloat16 step apart, 3e-5 in all: another kernel's rounding),
    and unsupported (the probe raises) where the CPU lacks bfloat16 (test_bfloat16_without_cpu_support runs
    that CPU)."""
    assert not fast.decide("packed-linear", torch.float32, timed=False).supported
    decision = fast.decide("packed-linear", torch.bfloat16, timed=False)
    if decision.supported:
        with torch.inference_mode():
            plain, packed = fast.REWRITES["packed-linear"].probe(
                Plan(torch.bfloat16, frozenset({"packed-linear"}))
            )
            assert _same_sums(packed(), plain(), 1e-4)
    else:
        assert decision.reason.startswith("unsupported here"), decision


def test_packed_linears_only_inside_a_unet_call(unets):
    """The UNet's linears read packed weights during its call (the same sums; oneDNN may block a packed
    float32 weight's reduction differently: float32 rounding apart); a linear called outside one (a text
    encoder's) packs nothing."""
    plain, quick = unets
    x, ehs, ehs_1, mask = _unet_inputs(plain)
    packing = copy.deepcopy(quick)
    # the function is dtype-blind; the decision is not
    plan = _replan(packing, rewrites=packing.fast_plan.rewrites | {"packed-linear"})
    layer = FastLinear(24, 40)
    layer.fast_plan = plan
    with torch.inference_mode():
        want = quick(x, 981, ehs, ehs_1, mask)
        got = packing(x, 981, ehs, ehs_1, mask)
        layer(torch.randn(2, 24))
    assert rel_err(got, want) <= 1e-6
    packed = set(map(id, plan.packed))
    unet_params = {id(p) for p in packing.parameters()}
    if fast.decide("onednn-linear", torch.float32, timed=False).supported:
        assert packed and packed <= unet_params
    assert id(layer.weight) not in packed


def _conv_and_map(shape, layout, bias) -> tuple[nn.Conv2d, torch.Tensor]:
    """A seeded 3x3 conv C -> O and a (B, C, H, W) map in ``layout`` ("nchw" or "channels_last")."""
    B, C, H, W, O = shape
    conv = _seeded(nn.Conv2d(C, O, 3, padding=1, bias=bias))
    x = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(1))
    return conv, x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize(
    "shape", [(1, 1, 2, 2, 1), (2, 5, 6, 4, 3), (1, 64, 32, 8, 32), (2, 384, 16, 4, 384)]
)
@pytest.mark.parametrize("bias", [True, False])
def test_winograd_matches_conv(layout, shape, bias):
    """Winograd F(2x2, 3x3) is the 3x3 convolution: to float64 rounding in float64 (the algebra), within
    float32 rounding of the exact result in float32 (<= 1e-6 relative at up to 384 channels), whole or in
    bands of tile rows, in the input's memory format."""
    conv, x = _conv_and_map(shape, layout, bias)
    plan = _plan(torch.float32)  # its GEMMs as a model's: oneDNN's where supported
    with torch.no_grad():
        got, want = winograd_conv3x3(x, conv.weight, conv.bias, plan=plan), conv(x)
        conv64 = copy.deepcopy(conv).double()
        truth = conv64(x.double())
        assert rel_err(winograd_conv3x3(x.double(), conv64.weight, conv64.bias, plan=plan), truth) <= 1e-14
    assert rel_err(got, truth) <= 1e-6
    with torch.no_grad():  # one band per row of tiles (long maps are done in bands of bounded memory)
        assert rel_err(winograd_conv3x3(x, conv.weight, conv.bias, band_bytes=1, plan=plan), truth) <= 1e-6
    assert got.shape == want.shape
    for fmt in (torch.contiguous_format, torch.channels_last):
        assert got.is_contiguous(memory_format=fmt) == want.is_contiguous(memory_format=fmt)


def test_winograd_conv_stands_aside_where_it_does_not_apply(monkeypatch):
    """Only 3x3, stride 1, padding 1, undilated, ungrouped convs on float32 maps of even size with no gradient
    to record take the Winograd route; every other call is the plain one, bit for bit."""
    taken = []
    real = convs.winograd_conv3x3
    monkeypatch.setattr(convs, "winograd_conv3x3", lambda *a, **k: taken.append(1) or real(*a, **k))

    def both(conv, x):
        quick = copy.deepcopy(conv)
        # Winograd alone (not gemm-conv, which takes what Winograd leaves), untimed: wherever it applies
        switch(quick, {nn.Conv2d: FastConv2d}, _plan(x.dtype, "winograd-conv"))
        with torch.no_grad():
            return quick(x), conv(x)

    x = torch.randn(1, 4, 6, 8)
    got, want = both(_seeded(nn.Conv2d(4, 5, 3, padding=1)), x)
    assert len(taken) == 1 and rel_err(got, want) <= 1e-6
    for conv, xi in [
        (nn.Conv2d(4, 5, 3, padding=1), torch.randn(1, 4, 5, 8)),  # odd height
        (nn.Conv2d(4, 5, 3, padding=1, stride=2), x),
        (nn.Conv2d(4, 5, 3, padding=0), x),
        (nn.Conv2d(4, 5, 3, padding=2, dilation=2), x),
        (nn.Conv2d(4, 4, 3, padding=1, groups=2), x),
        (nn.Conv2d(4, 5, 3, padding=1, padding_mode="reflect"), x),
        (nn.Conv2d(4, 5, 1), x),
        (nn.Conv2d(4, 5, 3, padding=1).to(torch.bfloat16), x.bfloat16()),
        (nn.Conv2d(4, 5, 3, padding=1).double(), x.double()),
    ]:
        got, want = both(_seeded(conv), xi)
        assert torch.equal(got, want)
    conv = _seeded(nn.Conv2d(4, 5, 3, padding=1))
    quick = copy.deepcopy(conv)
    switch(quick, {nn.Conv2d: FastConv2d}, _plan(torch.float32, "winograd-conv"))
    assert torch.equal(quick(x), conv(x))  # gradients recorded: the plain op, which has a backward
    assert len(taken) == 1


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (2, 5, 7, 3, 4), (2, 640, 32, 2, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_gemm_conv_matches_conv(layout, shape, bias):
    """The 3x3 convolution as one GEMM over an im2col copy: to float64 rounding in float64, within float32
    rounding of the exact result in float32, within bfloat16 rounding in bfloat16; any map size; the input's
    memory format kept."""
    conv, x = _conv_and_map(shape, layout, bias)
    plan, plan16 = (
        _plan(torch.float32),
        _plan(torch.bfloat16),
    )  # the GEMM as a model's: oneDNN's where supported
    with torch.no_grad():
        conv64 = copy.deepcopy(conv).double()
        truth = conv64(x.double())
        assert rel_err(gemm_conv3x3(x.double(), conv64.weight, conv64.bias, plan=plan), truth) <= 1e-14
        got, want = gemm_conv3x3(x, conv.weight, conv.bias, plan=plan), conv(x)
        assert rel_err(got, truth) <= 1e-6
        w16, b16 = conv.weight.bfloat16(), None if conv.bias is None else conv.bias.bfloat16()
        got16 = gemm_conv3x3(x.bfloat16(), w16, b16, plan=plan16)
        assert got16.dtype == torch.bfloat16 and rel_err(got16, truth) <= 1e-2
    assert got.shape == want.shape
    for fmt in (torch.contiguous_format, torch.channels_last):
        assert got.is_contiguous(memory_format=fmt) == want.is_contiguous(memory_format=fmt)


def test_conv_routes_winograd_first_then_gemm_on_small_maps(monkeypatch):
    """With both on (and untimed, as select="supported"): float32 maps of even size take Winograd; the others
    (bfloat16, float64, odd sizes) take the GEMM, unless its im2col copy would pass its bound; a conv that is
    not 3x3 / stride 1 / padding 1, or that records gradients, is the plain one, bit for bit."""
    taken = []
    for name in ("winograd_conv3x3", "gemm_conv3x3"):
        real = getattr(convs, name)
        monkeypatch.setattr(convs, name, lambda *a, _n=name, _f=real, **k: taken.append(_n) or _f(*a, **k))

    def route(conv, x):
        quick = copy.deepcopy(conv)
        switch(quick, {nn.Conv2d: FastConv2d}, _plan(x.dtype, "winograd-conv", "gemm-conv"))  # untimed
        taken.clear()
        with torch.no_grad():
            got, want = quick(x), conv(x)
        assert rel_err(got, want) <= (1e-2 if x.dtype == torch.bfloat16 else 1e-6)
        return taken[0] if taken else torch.equal(got, want)

    conv, x = _seeded(nn.Conv2d(4, 5, 3, padding=1)), torch.randn(1, 4, 6, 8)
    assert route(conv, x) == "winograd_conv3x3"
    assert route(conv, torch.randn(1, 4, 5, 8)) == "gemm_conv3x3"  # odd height
    assert route(conv.to(torch.bfloat16), x.bfloat16()) == "gemm_conv3x3"
    assert route(_seeded(nn.Conv2d(4, 5, 3, padding=1)).double(), x.double()) == "gemm_conv3x3"
    monkeypatch.setattr(convs, "GEMM_CONV_BYTES", 4 * 5 * 8 * 9 * 4 - 1)  # the copy of a 1 x 4 x 5 x 8 map
    assert route(_seeded(nn.Conv2d(4, 5, 3, padding=1)), torch.randn(1, 4, 5, 8)) is True  # plain
    assert route(_seeded(nn.Conv2d(4, 5, 3, padding=1, stride=2)), x) is True
    assert route(_seeded(nn.Conv2d(4, 5, 1)), x) is True
    conv = _seeded(nn.Conv2d(4, 5, 3, padding=1))
    quick = copy.deepcopy(conv)
    switch(quick, {nn.Conv2d: FastConv2d}, _plan(torch.float32, "winograd-conv", "gemm-conv"))
    taken.clear()
    x = torch.randn(1, 4, 5, 8)
    assert torch.equal(quick(x), conv(x)) and taken == []  # gradients recorded: the plain op


def test_winograd_is_decided_per_shape_and_kept(tmp_path, monkeypatch):
    """Under select="auto" each input shape is timed once on this CPU, and the decision is kept on disk with
    the others; select="supported" applies it wherever it can without timing."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(decisions, "_busy", lambda: False)
    fast.decide.cache_clear()
    try:
        model = _seeded(nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1)))
        assert fast.optimize(model)["winograd-conv"].supported
        assert type(model[0]) is FastConv2d and "winograd-conv" in model[0].fast_plan.per_shape
        with torch.no_grad():
            model(torch.randn(2, 16, 8, 4))
            model(torch.randn(2, 16, 8, 4))  # the same shapes: decided already
        (path,) = (tmp_path / "audioldm2_core").glob("fast-decisions-*.json")
        stored = json.loads(path.read_text())
        assert {k for k in stored if k.startswith("winograd-conv|float32|")} == {
            "winograd-conv|float32|2,16,8,4,16,0,1",
            "winograd-conv|float32|2,16,8,4,8,0,1",
        }
        assert all(isinstance(stored[k]["pays"], bool) for k in stored if k.count("|") == 2)
        fast.decide.cache_clear()
        probe = decisions._probe
        monkeypatch.setattr(decisions, "_probe", lambda *a: pytest.fail("probed again"))
        with torch.no_grad():
            model(torch.randn(2, 16, 8, 4))
        monkeypatch.setattr(decisions, "_probe", probe)
        fast.optimize(fast.restore(model), select="supported")
        assert "winograd-conv" in model[0].fast_plan.rewrites and not model[0].fast_plan.per_shape
    finally:
        fast.decide.cache_clear()


def test_cpu_attention_is_decided_per_shape(tmp_path, monkeypatch, cpu_attention_on):
    """With the kernel chosen and select="auto", each self-attention shape it takes is timed once against
    PyTorch's kernel (the AVX2 build loses at some of the UNet's), long ones at a capped token count; the kernel
    runs only where its decision says it pays, and the output is the plain attention's either way."""
    from audioldm2_core import unet

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(decisions, "_busy", lambda: False)
    fast.decide.cache_clear()
    try:
        attn = _seeded(unet.Attention(64, 64, heads=4, head_dim=16))
        plain = copy.deepcopy(attn)
        assert fast.optimize(attn, cpu_attention=True)["cpu-attention"].supported
        assert type(attn) is unet_rewrites.FastAttention and "cpu-attention" in attn.fast_plan.per_shape
        calls = []
        kernel = cpu_attention_on.attention
        monkeypatch.setattr(cpu_attention_on, "attention", lambda *a: calls.append(1) or kernel(*a))
        x = torch.randn(1, 160, 64)
        with torch.no_grad():
            assert rel_err(attn(x), plain(x)) < 1e-6
            attn(torch.randn(1, 2100, 64))
        (path,) = (tmp_path / "audioldm2_core").glob("fast-decisions-*.json")
        stored = json.loads(path.read_text())
        stored = {k: v for k, v in stored.items() if k.startswith("cpu-attention|") and k.count("|") == 2}
        assert set(stored) == {"cpu-attention|float32|1,4,160,16", "cpu-attention|float32|1,4,2048,16"}
        paid = [stored[k]["pays"] for k in sorted(stored, key=lambda k: int(k.split(",")[2]))]
        assert all(isinstance(p, bool) for p in paid)
        # the probes call the kernel themselves; the model's two calls took it only where it paid
        for pays in (True, False):
            _replan(attn, decide=lambda *a, pays=pays, **k: fast.Decision(True, pays, "as told"))
            calls.clear()
            with torch.no_grad():
                assert rel_err(attn(x), plain(x)) < 1e-6
            assert len(calls) == pays
    finally:
        fast.decide.cache_clear()


def _clocked(monkeypatch, durations: dict[str, list[float]]):
    """(fast, plain) calls that each advance a fake clock by their next duration; the counts of calls made."""
    clock, calls = [0.0], {"fast": 0, "plain": 0}
    monkeypatch.setattr(decisions, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def call(name):
        def f():
            clock[0] += durations[name][calls[name] % len(durations[name])]
            calls[name] += 1

        return f

    return call("fast"), call("plain"), calls


def test_time_decides_by_the_median_paired_ratio(monkeypatch):
    """Each round's plain / fast ratio, median over rounds: an outlier of either call moves it no more than one
    round. The minimum times would say 0.6 / 0.5 = 1.2x here."""
    f, plain, calls = _clocked(
        monkeypatch, {"fast": [1.0, 1.0, 0.5, 1.0, 1.0], "plain": [1.1, 1.1, 1.1, 0.6, 1.1]}
    )
    t_fast, t_plain, ratio = decisions._time(f, plain, rounds=5, seconds=100.0, max_rounds=5)
    assert calls == {"fast": 5, "plain": 5}
    assert (t_fast, t_plain) == (1.0, 1.1) and ratio == pytest.approx(1.1)


def test_time_runs_rounds_and_seconds_and_stops_early(monkeypatch):
    f, plain, calls = _clocked(monkeypatch, {"fast": [0.01], "plain": [0.011]})
    decisions._time(f, plain, rounds=3, seconds=1.0, max_rounds=200)  # 3 rounds take 0.063 s: on to 1 s
    assert calls["fast"] == 48
    f, plain, calls = _clocked(monkeypatch, {"fast": [2.0], "plain": [1.0]})
    assert decisions._time(f, plain, rounds=15, seconds=0.5, max_rounds=200)[2] == 0.5
    assert calls["fast"] == 2  # a clear loss: two rounds
    f, plain, calls = _clocked(monkeypatch, {"fast": [1.0], "plain": [1.05]})
    decisions._time(f, plain, rounds=15, seconds=0.5, max_rounds=200)
    assert calls["fast"] == 3  # slow calls: three rounds once 5 x 0.5 s have passed


def test_time_stops_once_every_round_gives_the_same_plain_answer(monkeypatch):
    """With ``clear`` = (n, m): n rounds whose every ratio is beyond 1 + m (or below 1 - m) settle it; a ratio
    near 1, or rounds that disagree, take the full count."""
    for durations, n in [
        ({"fast": [0.010], "plain": [0.0115]}, 5),  # 1.15x every round: a plain gain
        ({"fast": [0.010], "plain": [0.0090]}, 5),  # 0.90x every round: a plain loss
        ({"fast": [0.010], "plain": [0.0102]}, 25),  # 1.02x: on to 0.5 s (25 rounds of 20.2 ms)
        ({"fast": [0.010], "plain": [0.0120, 0.0100]}, 24),  # 1.2x and 1.0x in turn: not unanimous
    ]:
        f, plain, calls = _clocked(monkeypatch, durations)
        decisions._time(f, plain, rounds=15, seconds=0.5, max_rounds=200, clear=(5, 0.05))
        assert calls["fast"] == n, durations
    f, plain, calls = _clocked(monkeypatch, {"fast": [0.010], "plain": [0.0120]})
    assert decisions._time(f, plain, rounds=3, seconds=0.1, max_rounds=15, clear=(2, 0.15))[
        2
    ] == pytest.approx(1.2)
    assert calls["fast"] == 2  # a per-shape probe's 20% gain: two rounds


def test_a_per_shape_probe_of_long_calls_stops_after_one_clear_round(monkeypatch):
    """Per-shape probes: one round settles it when the calls take 50 ms or more and differ by 30% or more (the
    VAE's full-size maps); shorter calls take two rounds beyond 15%."""
    rewrite = fast.REWRITES["winograd-conv"]
    for durations, calls_fast in [
        ({"fast": [0.060], "plain": [0.100]}, 2),  # the check and warm-up, then one round
        ({"fast": [0.006], "plain": [0.010]}, 3),  # short calls: two rounds
        ({"fast": [0.090], "plain": [0.100]}, 4),  # long, but 1.11x: the rounds asked (3)
    ]:
        f, plain, calls = _clocked(monkeypatch, durations)

        def probe(plan, shape, f=f, plain=plain):
            return (lambda: plain() or torch.ones(4)), (lambda: f() or torch.ones(4))

        # (building on nothing: no other decision is taken, and timed, on the fake clock)
        spy = dataclasses.replace(rewrite, shape_probe=probe, builds_on=())
        monkeypatch.setitem(fast.REWRITES, "winograd-conv", spy)
        assert decisions._probe("winograd-conv", torch.float32, True, shape=(1, 2, 3)).pays
        assert calls["fast"] == calls_fast, durations


def test_probes_draw_from_one_pool_round_and_round():
    """Probes' values are the pool's, from a position on, wrapping around; a seeded module is filled strictly
    (nothing left on the meta device), its tensors each from where the last one ended."""
    pool, P = probes._pool(), probes._POOL_SIZE
    long = probes._draw((2 * P + 7,), P - 3)
    assert (
        torch.equal(long[:3], pool[-3:])
        and torch.equal(long[3 : P + 3], pool)
        and torch.equal(long[-4:], pool[:4])
    )
    conv = probes._seeded(lambda: nn.Conv2d(3, 4, 3), torch.float64)
    assert conv.weight.dtype == torch.float64 and not conv.training
    assert torch.equal(conv.weight.float().flatten(), pool[:108] * 3**-0.5)
    assert torch.equal(conv.bias.float(), pool[108:112] * 4**-0.5)


def test_probe_rows_caps_long_maps_at_a_multiple_of_64():
    row = 64 * 256 * 4  # a VAE row at the top level: 64 mel bins, 256 channels, float32
    assert probe_rows(256, row) == 256  # within the budget: the shape itself
    assert probe_rows(1024, row) == probe_rows(3000, row) == 512  # 32 MB
    assert probe_rows(1000, row, budget=row * 100) == 64  # at least 64 rows
    assert probe_rows(40, row, budget=row) == 40  # never more than the map


def test_long_maps_share_one_decision_timed_at_a_capped_height(tmp_path, monkeypatch):
    """Longer audio meets no new probe: heights beyond the probe's budget are timed (once) at the capped
    height, on tensors of that size, and every longer map reads that decision."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(decisions, "_busy", lambda: False)
    # rows of 8 x 16 float32 (512 bytes): a budget of 128 rows
    monkeypatch.setattr(convs, "probe_rows", functools.partial(probe_rows, budget=128 * 512))
    probed = []
    rewrite = fast.REWRITES["winograd-conv"]
    spy = dataclasses.replace(
        rewrite, shape_probe=lambda plan, shape: probed.append(shape) or rewrite.shape_probe(plan, shape)
    )
    monkeypatch.setitem(fast.REWRITES, "winograd-conv", spy)
    fast.decide.cache_clear()
    try:
        model = _seeded(nn.Conv2d(16, 16, 3, padding=1))
        fast.optimize(model)
        with torch.no_grad():
            for H in (64, 256, 512, 1024, 256):
                x = torch.randn(1, 16, H, 8)
                torch.testing.assert_close(model(x), F.conv2d(x, model.weight, model.bias, padding=1))
        assert [s[2] for s in probed] == [64, 128]  # 64 rows: its own shape; 256-1024: one probe, at 128
    finally:
        fast.decide.cache_clear()


# ---- fast modules against plain ones ------------------------------------------------------------------------


def _seeded(module: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return module.eval()


def _fast_copy(plain: nn.Module, select="supported") -> nn.Module:
    model = copy.deepcopy(plain)
    fast.optimize(model, select=select)
    return model


@pytest.mark.parametrize("name", [n for n in fast.REWRITES if n not in ("cpu-attention", "packed-linear")])
def test_each_rewrite_is_supported_and_exact_on_its_probe(name):
    """float32: every rewrite runs on this CPU, matches the plain computation to float32 rounding, and is no
    further from the float64 computation (the plain call on the probe's weights and inputs in float64) than
    the plain computation is. Winograd's rounding differs from the direct convolution's: at the UNet's widths
    it is ~4e-7 against ~2e-7 to 1e-6 for the direct sum, depending on the kernel (AVX-512, AVX2, layout)."""
    with torch.inference_mode():
        plain, quick = fast.REWRITES[name].probe(_plan(torch.float32, name))
        truth = fast.REWRITES[name].probe(Plan(torch.float64))[0]()
        got, want = quick(), plain()
    assert rel_err(got, want) <= 2e-6
    assert rel_err(got, truth) <= max(1.2 * rel_err(want, truth), 1e-6)
    assert fast.decide(name, torch.float32, timed=False).supported


@pytest.fixture(scope="module")
def unets(tiny_base):
    """(plain UNet, the same weights with every supported rewrite) from the tiny checkpoint."""
    from audioldm2_core.loading import open_checkpoint
    from audioldm2_core.unet import load_unet

    plain = load_unet(open_checkpoint(tiny_base))
    return plain, _fast_copy(plain)


def _unet_inputs(unet, batch=1, frames=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    lm, t5 = unet.cfg.cross_attention_dims[0][1:3]
    x = torch.randn(batch, 8, frames, 16, generator=g)
    ehs, ehs_1 = torch.randn(2 * batch, 8, lm, generator=g), torch.randn(2 * batch, 7, t5, generator=g)
    mask = torch.ones(2 * batch, 7, dtype=torch.long)
    mask[0, 5:] = 0
    return torch.cat([x, x]), ehs, ehs_1, mask


def assert_exact(got, plain_out, exact, *inputs):
    """The fast model's output against the plain model's: ~100 layers of float32 rounding apart (<= 1e-5,
    ~1e-6 here), and no further from the float64 computation than the plain model is (each rewrite alone is
    <= 1e-6 from the plain op: test_each_rewrite_is_supported_and_exact_on_its_probe)."""
    truth = exact(*(i.double() if torch.is_tensor(i) and i.is_floating_point() else i for i in inputs))
    assert rel_err(got, plain_out) <= 1e-5
    assert rel_err(got, truth) <= 1.2 * rel_err(plain_out, truth) + 1e-7


class Spy:
    """Counts which fast routes ran, by wrapping the fast layer's functions."""

    def __init__(self, monkeypatch):
        self.routes: list[str] = []
        spy = self

        def wrap(owner, attr, route, when=lambda *a, **k: True, taken=lambda out: True):
            real = getattr(owner, attr)

            def wrapped(*args, **kwargs):
                out = real(*args, **kwargs)
                if when(*args, **kwargs) and taken(out):
                    spy.routes.append(route)
                return out

            monkeypatch.setattr(owner, attr, wrapped)

        # each function where the fast modules look it up
        wrap(linears, "onednn", "onednn-linear", taken=bool)
        wrap(unet_rewrites, "linear", "fused-geglu", lambda *a, gelu=False, **k: gelu)
        wrap(
            unet_rewrites,
            "linear",
            "token-projections",
            lambda x, w, *a, **k: w.shape[0] == w.shape[1] and not isinstance(w, nn.Parameter),
        )
        wrap(unet_rewrites.FastAttention, "_folded", "folded-attention")
        wrap(unet_rewrites, "nearest2x_conv3x3", "phase-upsampling")
        wrap(vae_rewrites, "nearest2x_conv3x3", "phase-upsampling")
        wrap(unet_rewrites.FastUNet, "_shared_forward", "shared-guidance")
        wrap(convs, "winograd_conv3x3", "winograd-conv")
        wrap(convs, "gemm_conv3x3", "gemm-conv")


def test_fast_unet_equals_plain_with_every_rewrite(unets, monkeypatch):
    plain, quick = unets
    spy = Spy(monkeypatch)
    x, ehs, ehs_1, mask = _unet_inputs(plain)
    exact = copy.deepcopy(plain).double()
    with torch.inference_mode():
        x2 = torch.randn_like(x)  # halves that differ (no guidance) take the plain route of the UNet itself
        for t, xt in ((981, x), (torch.tensor([500, 500]), x), (10, x2)):
            assert_exact(
                quick(xt, t, ehs, ehs_1, mask), plain(xt, t, ehs, ehs_1, mask), exact, xt, t, ehs, ehs_1, mask
            )
    expected = {
        "onednn-linear",
        "fused-geglu",
        "token-projections",
        "folded-attention",
        "phase-upsampling",
        "shared-guidance",
        "winograd-conv",
    }
    if not fast.decide("onednn-linear", torch.float32, timed=False).supported:
        expected.discard("onednn-linear")
    assert expected <= set(spy.routes)
    assert spy.routes.count("shared-guidance") == 2


def test_fast_unet_in_float64_takes_the_gemm_convolutions(unets, monkeypatch):
    """Where Winograd does not apply (float64 here, bfloat16 on a real run) the 3x3 convs go through the GEMM
    route, and the model is the plain one to float64 rounding."""
    plain = copy.deepcopy(unets[0]).double()
    quick = _fast_copy(plain)
    spy = Spy(monkeypatch)
    x, ehs, ehs_1, mask = (t.double() if t.is_floating_point() else t for t in _unet_inputs(plain))
    with torch.inference_mode():
        got, want = quick(x, 981, ehs, ehs_1, mask), plain(x, 981, ehs, ehs_1, mask)
    assert rel_err(got, want) <= 1e-12
    assert "gemm-conv" in spy.routes and "winograd-conv" not in spy.routes


def test_restore_gives_the_plain_classes(unets):
    plain, quick = unets
    again = fast.restore(copy.deepcopy(quick))
    assert [type(m) for m in again.modules()] == [type(m) for m in plain.modules()]
    assert any(type(m).__module__.startswith("audioldm2_core.fast.") for m in quick.modules())


def test_two_models_compute_and_route_as_each_was_told(unets, monkeypatch):
    """What ``optimize`` turns on belongs to the model: in one process, a UNet optimized with fused-geglu alone
    takes that route only (no folded attention, no oneDNN linears), one optimized with every supported rewrite
    takes them all, whichever was optimized last; each computes what the plain model does."""
    plain, _ = unets
    x, ehs, ehs_1, mask = _unet_inputs(plain)
    everything, geglu_only = copy.deepcopy(plain), copy.deepcopy(plain)
    fast.optimize(everything, select="supported")
    fast.optimize(geglu_only, select={"fused-geglu"})
    exact = copy.deepcopy(plain).double()
    spy = Spy(monkeypatch)
    routes = {}
    with torch.inference_mode():
        want = plain(x, 981, ehs, ehs_1, mask)
        for name, model in [("geglu", geglu_only), ("every", everything), ("geglu again", geglu_only)]:
            spy.routes.clear()
            assert_exact(model(x, 981, ehs, ehs_1, mask), want, exact, x, 981, ehs, ehs_1, mask)
            routes[name] = set(spy.routes)
    assert routes["geglu"] == routes["geglu again"] == {"fused-geglu"}
    assert {"fused-geglu", "folded-attention", "token-projections", "shared-guidance"} <= routes["every"]


def test_cpu_attention_is_a_models_choice(cpu_attention_on, monkeypatch):
    """Two attentions in one process: the one optimized with ``cpu_attention=True`` calls the kernel, the one
    optimized with False (or left to an unset environment variable) does not."""
    from audioldm2_core import unet

    monkeypatch.delenv("AUDIOLDM2_CPU_ATTENTION", raising=False)
    calls = []
    kernel = cpu_attention_on.attention
    monkeypatch.setattr(cpu_attention_on, "attention", lambda *a: calls.append(1) or kernel(*a))
    plain = _seeded(unet.Attention(64, 64, heads=4, head_dim=16))
    chosen, declined, unset = (copy.deepcopy(plain) for _ in range(3))
    fast.optimize(chosen, select={"cpu-attention"}, cpu_attention=True)
    fast.optimize(declined, select={"cpu-attention"}, cpu_attention=False)
    fast.optimize(unset, select={"cpu-attention"})
    x = torch.randn(1, 160, 64)
    with torch.no_grad():
        for model, n in [(chosen, 1), (declined, 0), (unset, 0), (chosen, 1)]:
            calls.clear()
            assert rel_err(model(x), plain(x)) < 1e-6
            assert len(calls) == n
    assert type(declined) is unet.Attention and type(chosen) is unet_rewrites.FastAttention


def test_restore_leaves_no_trace(unets):
    """After ``restore`` every module's attributes are those it had before ``optimize`` (no plan, no summed
    phase kernels), and the plan with its packed weights is gone."""
    import gc
    import weakref

    plain, _ = unets
    model = copy.deepcopy(plain)
    before = {name: sorted(m.__dict__) for name, m in model.named_modules()}
    fast.optimize(model, select="supported")
    plan = weakref.ref(_replan(model, rewrites=model.fast_plan.rewrites | {"packed-linear"}))  # packs float32
    x, ehs, ehs_1, mask = _unet_inputs(plain)
    with torch.inference_mode():
        model(x, 981, ehs, ehs_1, mask)
    derived = [name for name, m in model.named_modules() if convs.PHASE_CACHE in m.__dict__]
    assert derived and (plan().packed or not linears.has_onednn_matmul())
    fast.restore(model)
    gc.collect()
    assert {name: sorted(m.__dict__) for name, m in model.named_modules()} == before
    assert plan() is None


def test_state_dict_and_parameters_are_untouched(unets):
    plain, quick = unets
    assert quick.state_dict().keys() == plain.state_dict().keys()
    assert all(isinstance(p, nn.Parameter) for p in quick.parameters())


# ---- a user's modifications are never bypassed ---------------------------------------------------------------


class LoRA(nn.Module):
    """A low-rank adapter around a linear that keeps ``.weight`` / ``.bias`` readable, as PEFT's do."""

    def __init__(self, base: nn.Linear, seed: int, rank: int = 2, scale: float = 0.5):
        super().__init__()
        self.base, self.scale = base, scale
        g = torch.Generator().manual_seed(seed)
        self.down = nn.Parameter(torch.randn(rank, base.in_features, generator=g) * 0.3)
        self.up = nn.Parameter(torch.randn(base.out_features, rank, generator=g) * 0.3)

    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x):
        return self.base(x) + self.scale * F.linear(F.linear(x, self.down), self.up)


LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


def add_lora(model: nn.Module) -> int:
    """Wrap every attention projection and feed-forward linear of a UNet (ours or diffusers': the same
    names), the adapter's weights seeded by the module's name so both get the same ones."""
    import zlib

    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(LORA_TARGETS)]
    for name in targets:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        base = owner[int(child)] if child.isdigit() else getattr(owner, child)
        wrapped = LoRA(base, seed=zlib.crc32(name.encode()))
        if child.isdigit():
            owner[int(child)] = wrapped
        else:
            setattr(owner, child, wrapped)
    return len(targets)


def test_lora_on_every_projection_equals_diffusers(tiny_base):
    """The same adapters on our UNet (plain, and fast with every rewrite) and on diffusers': equal audio."""
    from audioldm2_core import AudioLDM2
    from weights_tools.reference import reference_pipeline

    ref = reference_pipeline.__wrapped__(str(tiny_base))  # a fresh one: the cached oracle stays clean
    n = add_lora(ref.unet)
    kw = dict(num_inference_steps=3, audio_length_in_s=1.0, negative_prompt="noise", output_type="pt")
    with torch.no_grad():
        want = ref("a dog barks", generator=torch.Generator().manual_seed(0), **kw).audios
    for is_fast in (False, True):
        pipe = AudioLDM2.from_pretrained(tiny_base, fast=is_fast)
        if is_fast:
            fast.optimize(pipe.unet, select="supported")
        assert add_lora(pipe.unet) == n > 0
        got = pipe("a dog barks", generator=torch.Generator().manual_seed(0), **kw).audios
        assert rel_err(got, want) <= 1e-4, is_fast
    plain = AudioLDM2.from_pretrained(tiny_base, fast=False)
    unchanged = plain("a dog barks", generator=torch.Generator().manual_seed(0), **kw).audios
    assert rel_err(unchanged, want) > 1e-3  # the adapters do change the audio


@pytest.mark.parametrize("select", ["auto", "supported"])
def test_forward_hooks_on_every_linear_fire(tiny_base, select):
    from audioldm2_core import AudioLDM2

    pipe = AudioLDM2.from_pretrained(tiny_base)
    fast.optimize(pipe.unet, select=select)
    linears = {name: m for name, m in pipe.unet.named_modules() if isinstance(m, nn.Linear)}
    fired: set[str] = set()
    for name, m in linears.items():
        m.register_forward_hook(lambda mod, inp, out, name=name: fired.add(name))
    pipe("rain", num_inference_steps=2, audio_length_in_s=1.0, generator=torch.Generator().manual_seed(0))
    assert fired == set(linears)


def test_hooked_or_replaced_submodules_make_rewrites_stand_aside(unets):
    """A hook that changes a projection's output, and a changed weight, are seen by the fast UNet."""
    plain, quick = unets
    x, ehs, ehs_1, mask = _unet_inputs(plain)
    attn = "down_blocks.1.attentions.1.transformer_blocks.0.attn2"  # a folded cross-attention
    plain_attn, quick_attn = plain.get_submodule(attn), quick.get_submodule(attn)
    with torch.inference_mode():
        before = quick(x, 981, ehs, ehs_1, mask)
        hooks = [m.to_q.register_forward_hook(lambda m, i, o: o * 1.5) for m in (plain_attn, quick_attn)]
        hooked = quick(x, 981, ehs, ehs_1, mask)
        assert rel_err(hooked, plain(x, 981, ehs, ehs_1, mask)) <= 1e-5
        assert rel_err(hooked, before) > 1e-4
        for h in hooks:
            h.remove()
        changed = quick(x, 981, ehs, ehs_1, mask)
        for m in (plain, quick):  # a changed weight: the GEGLU's and an upsampler's
            m.get_submodule("up_blocks.1.upsamplers.0.conv").weight.mul_(0.5)
            m.get_submodule("down_blocks.2.attentions.0.transformer_blocks.0.ff.net.0.proj").weight.add_(0.1)
        got = quick(x, 981, ehs, ehs_1, mask)
        assert_exact(
            got, plain(x, 981, ehs, ehs_1, mask), copy.deepcopy(plain).double(), x, 981, ehs, ehs_1, mask
        )
        assert rel_err(got, changed) > 1e-3


def test_global_hooks_make_every_rewrite_stand_aside(unets):
    plain, quick = unets
    x, ehs, ehs_1, mask = _unet_inputs(plain)
    calls = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    try:
        with torch.inference_mode():
            quick(x, 981, ehs, ehs_1, mask)
    finally:
        handle.remove()
    plain_calls = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, i, o: plain_calls.append(type(m).__name__)
    )
    try:
        with torch.inference_mode():
            plain(x, 981, ehs, ehs_1, mask)
    finally:
        handle.remove()
    assert len(calls) == len(plain_calls)


def test_gradients_through_the_fast_unet_equal_plain(unets):
    plain, quick = unets
    x, ehs, ehs_1, mask = _unet_inputs(plain)
    grads = []
    for model in (plain, quick):
        model.zero_grad()
        xi = x.clone().requires_grad_(True)
        model(xi, 500, ehs, ehs_1, mask).square().mean().backward()
        grads.append((xi.grad, torch.cat([p.grad.flatten() for p in model.parameters()])))
        model.zero_grad()
    assert rel_err(grads[1][0], grads[0][0]) <= 1e-5 and rel_err(grads[1][1], grads[0][1]) <= 1e-5


# ---- every CPU ------------------------------------------------------------------------------------------------


AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def test_bfloat16_without_cpu_support(tiny_base):
    """On a CPU without AVX-512 (here: oneDNN and ATen held to AVX2, as on an AMD Zen 3), oneDNN's bfloat16 matmul
    does not exist: the speed layer finds that out by its probe and keeps the plain op, and bfloat16 and float32
    both generate."""
    import json
    import os
    import subprocess
    import sys

    code = f"""
import json, torch
from audioldm2_core import AudioLDM2, fast
out = {{"capability": torch.backends.cpu.get_cpu_capability()}}
for dtype in ("bfloat16", "float32"):
    pipe = AudioLDM2.from_pretrained({str(tiny_base)!r}, dtype=dtype)
    audio = pipe("rain", num_inference_steps=2, audio_length_in_s=1.0, generator=torch.Generator().manual_seed(0)).audios
    out[dtype] = {{"finite": bool(torch.isfinite(torch.as_tensor(audio)).all()),
                  "onednn": fast.decide("onednn-linear", getattr(torch, dtype)).reason}}
print(json.dumps(out))
"""
    env = {**os.environ, **AVX2_ONLY}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["capability"] == "AVX2"
    assert out["bfloat16"]["finite"] and out["float32"]["finite"]
    assert out["bfloat16"]["onednn"].startswith("unsupported here"), out
    assert "no native bfloat16" in run.stderr  # the user is told it is slow there


def test_unsupported_rewrite_is_never_applied(monkeypatch):
    """A probe that raises (as oneDNN does for a dtype the CPU lacks) leaves the plain modules in place."""
    monkeypatch.setitem(
        fast.REWRITES,
        "onednn-linear",
        fast.Rewrite("onednn-linear", fast.REWRITES["onednn-linear"].swaps, lambda dtype: (_raise, _raise)),
    )
    fast.decide.cache_clear()
    try:
        model = nn.Sequential(nn.Linear(4, 4)).to(torch.float16)
        decisions = fast.optimize(model, select={"onednn-linear"})
        assert not decisions["onednn-linear"].supported and type(model[0]) is nn.Linear
    finally:
        fast.decide.cache_clear()


def _raise():
    raise RuntimeError(
        "could not create a primitive descriptor for the inner product forward propagation primitive"
    )


def test_optimize_errors():
    with pytest.raises(ValueError, match="unknown rewrites"):
        fast.optimize(nn.Linear(2, 2), select={"warp-drive"})
    with pytest.raises(ValueError, match="select must be"):
        fast.optimize(nn.Linear(2, 2), select="fastest")


def test_fast_decoders_equal_plain(tiny_base, monkeypatch):
    """VAE decoder (channels-last, phase upsampling) and vocoder (channels-last 1-D convs), every rewrite on:
    within 1e-5 of the plain decoders after ~30 layers, and as close to the float64 computation as they are."""
    from audioldm2_core import AudioLDM2

    plain = AudioLDM2.from_pretrained(tiny_base, fast=False)
    quick = AudioLDM2.from_pretrained(tiny_base, fast=False)
    exact = AudioLDM2.from_pretrained(tiny_base, fast=False)
    for name in ("vae", "vocoder"):
        fast.optimize(getattr(quick, name), select="supported")
        getattr(exact, name).double()
    layouts = []
    quick.vocoder.conv_post.register_forward_pre_hook(
        lambda m, args: layouts.append((type(m), vocoder_rewrites._nlc(args[0])))
    )
    quick.vae.decoder.conv_in.register_forward_pre_hook(
        lambda m, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    spy = Spy(monkeypatch)
    latents = torch.randn(2, 8, 25, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        # the batch through both modules at once (the pipeline's decode splits it on the CPU: test_pipeline)
        got, want, truth = (p.vocoder(p.vae.decode(z).squeeze(1)) for p, z in ((quick, latents), (plain, latents),
                                                                            (exact, latents.double())))  # fmt: skip
    assert rel_err(got, want) <= 1e-5
    assert rel_err(got, truth) <= 1.1 * rel_err(want, truth)
    assert layouts == [True, (vocoder_rewrites.FastConv1d, True)]
    assert {"phase-upsampling", "winograd-conv"} <= set(spy.routes)


def test_decisions_outlive_edits_of_prose_only():
    """The decisions' key reads the speed layer's code, every file the decisions depend on (the rewrites, the
    probes, the decisions, the C++ kernel), in a fixed order: a docstring or a comment edited keeps it, a code
    edit does not."""
    files = decisions._code_files()
    assert files == decisions._code_files()
    names = [p.name for p in files]
    assert names[:-1] == sorted(names[:-1]) and names[-1] == "attention.cpp"
    assert {"convs.py", "decisions.py", "linears.py", "probes.py", "rewrites.py", "unet_rewrites.py"} <= set(
        names
    )
    code_key = decisions._this_code()
    for path in files:
        text = path.read_text()
        assert f"{path.name}\0{decisions._code_key(text) if path.suffix == '.py' else text}" in code_key
    source = Path(decisions.__file__).read_text()
    prose = source.replace('"""Which rewrites', '"""Which rewrites (edited)', 1).replace("# ", "# edited ", 1)
    assert prose != source and decisions._code_key(prose) == decisions._code_key(source)
    code = source.replace("clear=(5, 0.05)", "clear=(5, 0.06)", 1)
    assert code != source and decisions._code_key(code) != decisions._code_key(source)


def test_busy_counts_other_processes_cpu_time_not_ours(monkeypatch):
    """Competition is other processes' CPU time since the last look, beyond what this process's threads leave
    free: our own threads running flat out are not "busy" (the load average counted them)."""
    monkeypatch.setattr(decisions.os, "cpu_count", lambda: torch.get_num_threads())  # no CPU left free
    tick = torch.get_num_threads() * decisions._TICK  # the slack _busy allows for tick rounding
    clocks = iter(
        [
            (1.0, 102.0, 12.0),  # 1 s: all CPU time was ours
            (2.0, 104.0, 13.0),  # 1 s: others used a whole CPU
            (2.1, 110.0, 13.0),  # 0.1 s: too short to tell: the last answer, the window goes on
            (3.0, 105.0 + tick, 14.0),  # since 2.0: ours only again
        ]
    )
    monkeypatch.setattr(decisions, "_clocks", lambda: next(clocks))
    monkeypatch.setattr(decisions, "_LOOK", {"clocks": (0.0, 100.0, 10.0), "busy": False})
    assert [decisions._busy() for _ in range(4)] == [False, True, True, False]
    monkeypatch.setattr(decisions, "_clocks", lambda: None)  # no /proc/stat: the load average, as before
    monkeypatch.setattr(decisions.os, "getloadavg", lambda: (torch.get_num_threads() + 1.0, 0.0, 0.0))
    assert decisions._busy()
    monkeypatch.delattr(decisions.os, "getloadavg")  # Windows: neither, so never busy
    assert not decisions._busy()


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux's /proc/stat")
def test_clocks_see_this_process_work():
    """The clocks _busy reads: all CPUs' busy time grows at least by this process's CPU time (a tick per CPU
    aside), and our CPU time by the work done (0.2 s of this thread's CPU time, however long other processes
    make that take)."""
    t0, busy0, own0 = decisions._clocks()
    start, deadline = time.thread_time(), time.monotonic() + 60
    while time.thread_time() - start < 0.2 and time.monotonic() < deadline:
        pass
    t1, busy1, own1 = decisions._clocks()
    assert t1 > t0 and own1 - own0 >= 0.2
    assert busy1 - busy0 >= own1 - own0 - (os.cpu_count() or 1) * 2 * decisions._TICK


def test_a_decision_is_stored_busy_by_the_probe_own_window(tmp_path, monkeypatch):
    """Whether a probe competed is judged over the probe itself, not over what came before it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    looks = []
    monkeypatch.setattr(decisions, "_busy", lambda: looks.append(len(looks)) or len(looks) > 1)  # busy after
    monkeypatch.setattr(decisions, "_probe", lambda *a: fast.Decision(True, True, "probed"))
    fast.decide.cache_clear()
    try:
        assert fast.decide("vae-channels-last", torch.float32).reason == "probed"
        (path,) = (tmp_path / "audioldm2_core").glob("fast-decisions-*.json")
        assert json.loads(path.read_text())["vae-channels-last|float32"]["busy"] is True
        assert looks == [0, 1]  # the probe's window opened before it, read after it
    finally:
        fast.decide.cache_clear()


def test_timed_decisions_are_kept_per_machine(tmp_path, monkeypatch):
    """A timed decision is written once and read back by later processes (here: the in-process cache
    cleared); one taken on a busy machine is timed again once the machine is quiet; another thread count is
    another machine key."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(decisions, "_busy", lambda: False)
    fast.decide.cache_clear()
    try:
        first = fast.decide("phase-upsampling", torch.float32)
        (path,) = (tmp_path / "audioldm2_core").glob("fast-decisions-*.json")
        fast.decide.cache_clear()
        monkeypatch.setattr(decisions, "_probe", lambda *a: pytest.fail("probed again"))
        assert fast.decide("phase-upsampling", torch.float32) == first
        monkeypatch.setattr(
            decisions, "_busy", lambda: True
        )  # timed on a busy machine: used while it stays busy,
        monkeypatch.setattr(
            decisions, "_probe", lambda *a: fast.Decision(True, False, "busy")
        )  # timed again once quiet
        assert fast.decide("vae-channels-last", torch.float32).reason == "busy"
        fast.decide.cache_clear()
        monkeypatch.setattr(decisions, "_probe", lambda *a: pytest.fail("probed again while busy"))
        assert fast.decide("vae-channels-last", torch.float32).reason == "busy"
        fast.decide.cache_clear()
        monkeypatch.setattr(decisions, "_busy", lambda: False)
        monkeypatch.setattr(decisions, "_probe", lambda *a: fast.Decision(True, True, "quiet"))
        assert fast.decide("vae-channels-last", torch.float32).reason == "quiet"
        fast.decide.cache_clear()
        monkeypatch.setattr(decisions, "_probe", lambda *a: pytest.fail("probed again"))
        assert fast.decide("vae-channels-last", torch.float32).reason == "quiet"
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert decisions._decisions_file() != path
        finally:
            torch.set_num_threads(threads)
    finally:
        fast.decide.cache_clear()
