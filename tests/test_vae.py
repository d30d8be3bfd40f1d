"""VAE decoder parity with diffusers' AutoencoderKL, and strict loading of the decoder half of the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from audioldm2_core.loading import CheckpointError, open_checkpoint
from audioldm2_core.vae import load_vae
from tests.checkpoints import edit_weights, perturb, write_component
from tests.helpers import rel_err
from weights_tools.make_tiny import TINY_VAE

HUB_VAE = Path(__file__).parents[1] / "weights_tools/hub_configs/cvssp__audioldm2/vae/config.json"
TINY = TINY_VAE  # the tiny checkpoint's VAE: the real architecture at small width


def write_vae_checkpoint(root: Path, config: dict, seed: int = 0):
    """A pipeline folder holding only a vae/ saved by diffusers; returns the reference model."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    ref = perturb(AutoencoderKL(**config), seed + 1)
    write_component(root, "vae", ref)
    return ref


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae_ckpt")
    ref = write_vae_checkpoint(root, TINY)
    return ref, root


def reference_decode(ref, latents: torch.Tensor) -> torch.Tensor:
    # exactly AudioLDM2Pipeline.__call__: latents = 1 / scaling_factor * latents; vae.decode(latents).sample
    return ref.decode(1 / ref.config.scaling_factor * latents).sample


@pytest.mark.parametrize("frames", [25, 32, 64])
@pytest.mark.parametrize("batch", [1, 2])
def test_decode_matches_reference(tiny, batch: int, frames: int):
    ref, root = tiny
    vae = load_vae(open_checkpoint(root))
    latents = torch.randn(batch, 8, frames, 16, generator=torch.Generator().manual_seed(frames + batch))
    with torch.no_grad():
        want = reference_decode(ref, latents)
        got = vae.decode(latents)
    assert got.shape == want.shape == (batch, 1, 4 * frames, 64)
    assert rel_err(got, want) <= 1e-5


def test_missing_decoder_key_is_named(tiny, tmp_path):
    root = edit_weights(
        tiny[1], tmp_path / "c", "vae", lambda s: s.pop("decoder.up_blocks.1.resnets.2.conv2.bias")
    )
    with pytest.raises(
        CheckpointError, match=r"missing keys: decoder\.up_blocks\.1\.resnets\.2\.conv2\.bias"
    ):
        load_vae(open_checkpoint(root))


def test_unexpected_decoder_key_is_named(tiny, tmp_path):
    def add(s):
        s["decoder.mid_block.attentions.0.to_out.1.weight"] = torch.zeros(64, 64)

    root = edit_weights(tiny[1], tmp_path / "c", "vae", add)
    with pytest.raises(
        CheckpointError, match=r"unexpected keys: decoder\.mid_block\.attentions\.0\.to_out\.1"
    ):
        load_vae(open_checkpoint(root))


def test_key_of_neither_half_is_an_error(tiny, tmp_path):
    def add(s):
        s["discriminator.conv.weight"] = torch.zeros(3)

    root = edit_weights(tiny[1], tmp_path / "c", "vae", add)
    with pytest.raises(CheckpointError, match=r"discriminator\.conv\.weight"):
        load_vae(open_checkpoint(root))


def test_missing_encoder_is_an_error(tiny, tmp_path):
    def drop(s):
        for k in [k for k in s if k.startswith(("encoder.", "quant_conv."))]:
            del s[k]

    root = edit_weights(tiny[1], tmp_path / "c", "vae", drop)
    with pytest.raises(CheckpointError, match="encoder"):
        load_vae(open_checkpoint(root))


def test_encoder_tensors_are_not_read(tiny, monkeypatch):
    from audioldm2_core import loading

    real_read, read, listed = loading._read_safetensors, [], []

    def spy(path, select):  # the loader's safetensors reader, recording what it lists and hands back
        listed.extend(loading.safetensors_keys(path))
        state = real_read(path, select)
        read.extend(state)
        return state

    monkeypatch.setattr(loading, "_read_safetensors", spy)
    vae = load_vae(open_checkpoint(tiny[1]))
    assert any(k.startswith("encoder.") for k in listed) and "quant_conv.weight" in listed
    assert sorted(read) == sorted(vae.state_dict())  # the decoder's keys, each read once, nothing else


def test_dtype_and_meta_free(tiny):
    vae = load_vae(open_checkpoint(tiny[1]), dtype=torch.float64)
    tensors = [*vae.parameters(), *vae.buffers()]
    assert all(t.dtype == torch.float64 and not t.is_meta for t in tensors)


def test_tiny_checkpoint_fixture(tiny_base):
    """On the full tiny checkpoint written by the reference pipeline's save_pretrained."""
    root = tiny_base
    from diffusers import AutoencoderKL

    ref = AutoencoderKL.from_pretrained(Path(root) / "vae").eval()
    vae = load_vae(open_checkpoint(root))
    latents = torch.randn(2, ref.config.latent_channels, 25, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(vae.decode(latents), reference_decode(ref, latents)) <= 1e-5


@pytest.mark.slow
def test_real_size_random_weights(tmp_path):
    config = {k: v for k, v in json.loads(HUB_VAE.read_text()).items() if not k.startswith("_")}
    ref = write_vae_checkpoint(tmp_path, config)
    vae = load_vae(open_checkpoint(tmp_path))
    latents = torch.randn(1, 8, 256, 16, generator=torch.Generator().manual_seed(0))  # 10.24 s of audio
    with torch.no_grad():
        want = reference_decode(ref, latents)
        got = vae.decode(latents)
    assert got.shape == (1, 1, 1024, 64)
    err = rel_err(got, want)
    print(f"vae real size: rel err {err:.3e}")
    assert err <= 1e-5
