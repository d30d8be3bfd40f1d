"""VAE parity with diffusers' AutoencoderKL (decoder, encoder posterior and its draws), and strict loading of
each half of the file: text-to-audio reads only the decoder's tensors, audio input only the encoder's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from audioldm2_core import fast
from audioldm2_core.errors import CheckpointError
from audioldm2_core.loading import open_checkpoint
from audioldm2_core.vae import load_vae, load_vae_encoder
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


@pytest.mark.parametrize("load", [load_vae, load_vae_encoder], ids=["decoder", "encoder"])
@pytest.mark.parametrize("other", ["encoder", "decoder"])
def test_missing_half_is_an_error(tiny, tmp_path, load, other):
    """Either half loads only from a file that holds the whole autoencoder (a file without the half being
    loaded is load_strict's missing keys)."""
    prefixes = {"encoder": ("encoder.", "quant_conv."), "decoder": ("decoder.", "post_quant_conv.")}[other]

    def drop(s):
        for k in [k for k in s if k.startswith(prefixes)]:
            del s[k]

    root = edit_weights(tiny[1], tmp_path / "c", "vae", drop)
    with pytest.raises(CheckpointError, match=other):
        load(open_checkpoint(root))


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


def test_the_two_halves_read_every_key_once(tiny, monkeypatch):
    from audioldm2_core import loading

    real_read, read, listed = loading._read_safetensors, {}, []

    def spy(path, select):
        listed[:] = loading.safetensors_keys(path)
        state = real_read(path, select)
        read[len(read)] = sorted(state)
        return state

    monkeypatch.setattr(loading, "_read_safetensors", spy)
    decoder = load_vae(open_checkpoint(tiny[1]))
    encoder = load_vae_encoder(open_checkpoint(tiny[1]))
    assert read[0] == sorted(decoder.state_dict()) and read[1] == sorted(encoder.state_dict())
    assert sorted(read[0] + read[1]) == sorted(listed)  # every tensor of the file, each read by one half


@pytest.mark.parametrize("load", [load_vae, load_vae_encoder], ids=["decoder", "encoder"])
def test_dtype_and_meta_free(tiny, load):
    vae = load(open_checkpoint(tiny[1]), dtype=torch.float64)
    tensors = [*vae.parameters(), *vae.buffers()]
    assert all(t.dtype == torch.float64 and not t.is_meta for t in tensors)


# ------------------------------------------------------------------------------------------ the encoder


def mel_batch(batch: int, frames: int, seed: int) -> torch.Tensor:
    """A log-mel-like input: values around the log range of real mels (-11.5 floor up to ~2)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, frames, 64, generator=g) * 2.0 - 5.0


# 102 frames: not a multiple of 4 (diffusers' asymmetric padding decides the size)
@pytest.mark.parametrize("batch, frames", [(1, 16), (2, 102)])
def test_posterior_matches_reference(tiny, batch: int, frames: int):
    ref, root = tiny
    encoder = load_vae_encoder(open_checkpoint(root))
    mel = mel_batch(batch, frames, seed=frames + batch)
    with torch.no_grad():
        want = ref.encode(mel).latent_dist
        got = encoder.posterior(mel)
        latents = encoder.encode(mel)
    assert got.mean.shape == want.mean.shape == (batch, 8, frames // 4, 16)
    assert rel_err(got.mean, want.mean) <= 1e-5
    assert rel_err(got.std, want.std) <= 1e-5
    assert rel_err(got.logvar, want.logvar) <= 1e-5
    assert torch.equal(latents, ref.config.scaling_factor * got.mean)  # the UNet's scale, the mean by default


def test_sample_draws_as_the_reference(tiny):
    """sample=True: mean + std * noise, the noise drawn as diffusers' latent_dist.sample(generator)."""
    ref, root = tiny
    encoder = load_vae_encoder(open_checkpoint(root))
    mel = mel_batch(2, 32, seed=7)
    s = ref.config.scaling_factor
    with torch.no_grad():
        dist = ref.encode(mel).latent_dist
        for make in (
            lambda: torch.Generator().manual_seed(5),
            lambda: [torch.Generator().manual_seed(i) for i in (5, 6)],
        ):
            want = s * dist.sample(generator=make())
            got = encoder.encode(mel, sample=True, generator=make())
            assert rel_err(got, want) <= 1e-5
        assert (
            rel_err(encoder.encode(mel, sample=True, generator=make()), s * dist.mean) > 1e-3
        )  # it did draw


def test_encoder_strict_errors_name_the_key(tiny, tmp_path):
    root = edit_weights(
        tiny[1], tmp_path / "a", "vae", lambda s: s.pop("encoder.down_blocks.1.downsamplers.0.conv.bias")
    )
    with pytest.raises(
        CheckpointError, match=r"missing keys: encoder\.down_blocks\.1\.downsamplers\.0\.conv\.bias"
    ):
        load_vae_encoder(open_checkpoint(root))

    def add(s):
        s["encoder.down_blocks.2.downsamplers.0.conv.weight"] = torch.zeros(
            64, 64, 3, 3
        )  # the last block has none

    root = edit_weights(tiny[1], tmp_path / "b", "vae", add)
    with pytest.raises(CheckpointError, match=r"unexpected keys: encoder\.down_blocks\.2\.downsamplers"):
        load_vae_encoder(open_checkpoint(root))


def test_encoder_under_the_speed_layer(tiny):
    """fast.optimize (as the pipeline applies it to every component) keeps the encoder exact."""
    ref, root = tiny
    encoder = load_vae_encoder(open_checkpoint(root))
    decisions = fast.optimize(encoder, select="supported")
    mel = mel_batch(1, 64, seed=3)
    with torch.no_grad():
        want = ref.encode(mel).latent_dist.mean
        assert rel_err(encoder.posterior(mel).mean, want) <= 1e-5
    assert "vae-channels-last" not in decisions  # the decoder's rewrite; the encoder is not the decoder
    fast.restore(encoder)


def test_tiny_checkpoint_fixture(tiny_base):
    """On the full tiny checkpoint written by the reference pipeline's save_pretrained."""
    root = tiny_base
    from diffusers import AutoencoderKL

    ref = AutoencoderKL.from_pretrained(Path(root) / "vae").eval()
    vae = load_vae(open_checkpoint(root))
    latents = torch.randn(2, ref.config.latent_channels, 25, 16, generator=torch.Generator().manual_seed(0))
    encoder = load_vae_encoder(open_checkpoint(root))
    mel = mel_batch(2, 100, seed=1)
    with torch.no_grad():
        assert rel_err(vae.decode(latents), reference_decode(ref, latents)) <= 1e-5
        want = ref.encode(mel).latent_dist
        got = encoder.posterior(mel)
        assert rel_err(got.mean, want.mean) <= 1e-5 and rel_err(got.std, want.std) <= 1e-5


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
    encoder = load_vae_encoder(open_checkpoint(tmp_path))
    mel = mel_batch(1, 1024, seed=0)
    with torch.no_grad():
        want_dist, got_dist = ref.encode(mel).latent_dist, encoder.posterior(mel)
    errs = rel_err(got_dist.mean, want_dist.mean), rel_err(got_dist.std, want_dist.std)
    print(f"vae encoder real size: rel err mean {errs[0]:.3e}, std {errs[1]:.3e}")
    assert max(errs) <= 1e-5
