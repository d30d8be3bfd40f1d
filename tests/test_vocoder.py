"""HiFi-GAN vocoder parity with transformers' SpeechT5HifiGan, output length, and strict loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from audioldm2_core.config import vocoder_config
from audioldm2_core.errors import CheckpointError
from audioldm2_core.loading import open_checkpoint
from audioldm2_core.vocoder import load_vocoder, num_samples
from tests.checkpoints import edit_weights, write_component
from tests.helpers import rel_err
from weights_tools.make_tiny import TINY_VOCODER, unit_gain_vocoder

HUB_VOCODER = Path(__file__).parents[1] / "weights_tools/hub_configs/cvssp__audioldm2/vocoder/config.json"
TINY = TINY_VOCODER  # the hub's rates and kernels (the real output-length arithmetic), 32 channels
WEIGHTS = "model.safetensors"


def write_vocoder_checkpoint(root: Path, config: dict, seed: int = 0, gain: float = 1.2):
    """A pipeline folder holding only a vocoder/ saved by transformers (model_index lists every component).

    ``gain`` scales the conv weights relative to unit variance; the output level grows with the width, so
    the real size needs a smaller one (0.9) than the tiny (1.2) to keep the tanh out of saturation.
    """
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    torch.manual_seed(seed)
    ref = SpeechT5HifiGan(SpeechT5HifiGanConfig(**config)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    unit_gain_vocoder(ref, config["upsample_rates"], g, gain)  # std-0.01 convs would leave only a bias
    with torch.no_grad():
        # random statistics, so that normalize_before=True is tested
        ref.mean.copy_(torch.randn(ref.mean.shape, generator=g))
        ref.scale.copy_(torch.rand(ref.scale.shape, generator=g) + 0.5)
    write_component(root, "vocoder", ref)
    return ref


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "normalize_before"])
def tiny(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("vocoder_ckpt")
    ref = write_vocoder_checkpoint(root, {**TINY, "normalize_before": request.param})
    return ref, root


@pytest.mark.parametrize("frames", [37, 100, 128])
@pytest.mark.parametrize("batch", [1, 2])
def test_matches_reference(tiny, batch: int, frames: int):
    ref, root = tiny
    voc = load_vocoder(open_checkpoint(root))
    assert voc.cfg.normalize_before == ref.config.normalize_before
    mel = torch.randn(batch, frames, 64, generator=torch.Generator().manual_seed(frames + batch)) - 5.0
    with torch.no_grad():
        want, got = ref(mel), voc(mel)
    # exactly the reference's length: 160 * frames + 32 for the hub's rates and kernels, not 160 * frames
    assert got.shape == want.shape == (batch, 160 * frames + 32) == (batch, num_samples(voc.cfg, frames))
    # neither vanishing nor stuck at the tanh's +-1: a meaningful comparison
    assert want.std() > 0.05 and (want.abs() > 0.99).float().mean() < 0.1
    assert rel_err(got, want) <= 1e-5


def test_unbatched(tiny):
    ref, root = tiny
    voc = load_vocoder(open_checkpoint(root))
    mel = torch.randn(50, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ref(mel), voc(mel)
    assert got.shape == want.shape == (num_samples(voc.cfg, 50),)
    assert rel_err(got, want) <= 1e-5


def test_file_holds_plain_weights(tiny):
    """save_pretrained writes plain conv weights (no weight norm) and the mean/scale buffers; we mirror it."""
    ref, root = tiny
    keys = set(load_file(root / "vocoder" / WEIGHTS))
    assert {"mean", "scale", "conv_pre.weight", "upsampler.0.weight"} <= keys
    assert not any("weight_g" in k or "parametrizations" in k for k in keys)
    assert keys == set(load_vocoder(open_checkpoint(root)).state_dict())


def test_missing_key_is_named(tiny, tmp_path):
    root = edit_weights(tiny[1], tmp_path / "c", "vocoder", lambda s: s.pop("resblocks.7.convs2.1.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys: resblocks\.7\.convs2\.1\.weight"):
        load_vocoder(open_checkpoint(root))


def test_missing_buffer_is_named(tiny, tmp_path):
    root = edit_weights(tiny[1], tmp_path / "c", "vocoder", lambda s: s.pop("scale"))
    with pytest.raises(CheckpointError, match=r"missing keys: scale"):
        load_vocoder(open_checkpoint(root))


def test_unexpected_key_is_named(tiny, tmp_path):
    def add(s):  # as a file saved with weight-norm parametrizations still applied would have
        s["conv_pre.parametrizations.weight.original0"] = torch.ones(32, 1, 1)

    root = edit_weights(tiny[1], tmp_path / "c", "vocoder", add)
    with pytest.raises(
        CheckpointError, match=r"unexpected keys: conv_pre\.parametrizations\.weight\.original0"
    ):
        load_vocoder(open_checkpoint(root))


def test_tiny_checkpoint_fixture(tiny_base):
    """On the full tiny checkpoint written by the reference pipeline's save_pretrained."""
    root = tiny_base
    from transformers import SpeechT5HifiGan

    ref = SpeechT5HifiGan.from_pretrained(Path(root) / "vocoder").eval()
    voc = load_vocoder(open_checkpoint(root))
    mel = torch.randn(2, 40, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ref(mel), voc(mel)
    assert got.shape == want.shape
    assert rel_err(got, want) <= 1e-5


@pytest.mark.slow
def test_real_size_random_weights(tmp_path):
    config = {k: v for k, v in json.loads(HUB_VOCODER.read_text()).items() if k not in ("architectures",)}
    assert vocoder_config(config).hop_length == 160
    ref = write_vocoder_checkpoint(tmp_path, config, gain=0.9)
    voc = load_vocoder(open_checkpoint(tmp_path))
    mel = torch.randn(1, 256, 64, generator=torch.Generator().manual_seed(0)) - 5.0  # 2.56 s
    with torch.no_grad():
        want, got = ref(mel), voc(mel)
    assert got.shape == want.shape == (1, 160 * 256 + 32)
    err = rel_err(got, want)
    saturated = (want.abs() > 0.99).float().mean().item()
    print(f"vocoder real size: rel err {err:.3e}, output std {want.std():.3f}, saturated {saturated:.1%}")
    assert want.std() > 0.05 and saturated < 0.1
    assert err <= 1e-5
