"""The upsamplers' nearest-2x + 3x3-conv shortcut (``audioldm2_core.ops``) against the plain computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from audioldm2_core.ops import nearest2x_conv3x3, phase_weights
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
