"""``audioldm2_core.ops`` against the plain computations: the oneDNN linear and the upsamplers' nearest-2x +
3x3-conv shortcut."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from audioldm2_core.ops import Linear, linear, nearest2x_conv3x3, phase_weights
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
    conv = _conv(3, 3)
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    nearest2x_conv3x3(x, conv).square().sum().backward()
    assert conv.weight.grad is not None and x.grad is not None
    g_w, g_x = conv.weight.grad.clone(), x.grad.clone()
    conv.weight.grad = x.grad = None
    _plain(x, conv).square().sum().backward()
    torch.testing.assert_close(conv.weight.grad, g_w)
    torch.testing.assert_close(x.grad, g_x)


def test_weights_made_in_inference_mode():
    """The low-memory pipeline loads components inside inference mode: their weights have no version."""
    with torch.inference_mode():
        conv = _conv(3, 3)
        x = torch.randn(1, 3, 4, 4)
        got = nearest2x_conv3x3(x, conv)
        assert rel_err(got, _plain(x, conv)) < 1e-6


# ---- linear -------------------------------------------------------------------------------------------------


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
        got = linear(x, w, b, gelu=gelu)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    if expected.numel():
        assert rel_err(got, expected) < 1e-6


def test_linear_reads_strided_inputs():
    """Transposed activations and a row slice of a weight (as GEGLU passes) give the same sums."""
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 24, 37).transpose(1, 2), torch.randn(80, 24), torch.randn(80)
    with torch.inference_mode():
        got = linear(x, w[40:], b[40:])
    assert rel_err(got, F.linear(x, w[40:], b[40:])) < 1e-6


def test_linear_float64_is_f_linear_and_bfloat16_rounds_once():
    """float64 runs ``F.linear`` (oneDNN has no float64 matmul): bit for bit. In bfloat16 the matmul is the one
    ``F.linear`` runs (bit for bit); the fused GELU acts before the rounding to bfloat16, so it is at least as
    close to the float64 value as the reference's GELU of the rounded product."""
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 7, 24), torch.randn(40, 24), torch.randn(40)
    with torch.no_grad():
        x64, w64, b64 = x.double(), w.double(), b.double()
        assert torch.equal(linear(x64, w64, b64), F.linear(x64, w64, b64))
        assert torch.equal(linear(x64, w64, b64, gelu=True), F.gelu(F.linear(x64, w64, b64)))
        xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
        assert torch.equal(linear(xb, wb, bb), F.linear(xb, wb, bb))
        exact = F.gelu(F.linear(xb.double(), wb.double(), bb.double()))
        got, ref = linear(xb, wb, bb, gelu=True), F.gelu(F.linear(xb, wb, bb))
        assert got.dtype == torch.bfloat16
        assert rel_err(got, exact) <= rel_err(ref, exact) * 1.05 + 1e-6


def test_linear_under_autograd_is_differentiable():
    """oneDNN's op has no backward: with a gradient to record, ``F.linear`` runs, and gradients flow."""
    torch.manual_seed(0)
    layer = Linear(24, 40)
    x = torch.randn(3, 24, requires_grad=True)
    y = linear(x, layer.weight, layer.bias, gelu=True)
    y.sum().backward()
    ref_x = x.detach().requires_grad_()
    ref_layer = nn.Linear(24, 40)
    ref_layer.load_state_dict(layer.state_dict())
    F.gelu(ref_layer(ref_x)).sum().backward()
    assert torch.allclose(x.grad, ref_x.grad) and torch.allclose(layer.weight.grad, ref_layer.weight.grad)


def test_linear_module_keeps_nn_linear_keys():
    layer, ref = Linear(24, 40, bias=False), nn.Linear(24, 40, bias=False)
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
    with torch.no_grad():
        assert torch.equal(linear(x, w, b), F.linear(x, w, b))
        assert torch.equal(linear(x, w, b, gelu=True), F.gelu(F.linear(x, w, b)))


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
