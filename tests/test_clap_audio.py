"""CLAP audio encoder (HTSAT) parity with ``ClapModel.get_audio_features``, and its strict, separate loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from audioldm2_core.clap_audio import is_audio_key, load_clap_audio, relative_position_index
from audioldm2_core.config import clap_config
from audioldm2_core.errors import UnsupportedConfigError, WeightsError
from audioldm2_core.loading import Checkpoint, open_checkpoint
from tests.checkpoints import edit_weights, write_component
from tests.helpers import rel_err

HUB_TEXT_ENCODER = "weights_tools/hub_configs/cvssp__audioldm2/text_encoder/config.json"
# Tiny widths, but the real spec_size 256 / 64 mel bins (the mel->image fold needs them) and window 8.
# Depths (1, 2, 2, 2): shifted-window blocks in stages 1 and 2; stage 3 (8x8) is one unshifted window.
TINY_CLAP = dict(
    projection_dim=16,
    text_config=dict(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
    ),
    audio_config=dict(
        depths=[1, 2, 2, 2], num_attention_heads=[1, 2, 2, 4], patch_embeds_hidden_size=8, hidden_size=64
    ),
)


def build_reference_clap(config: dict = TINY_CLAP, seed: int = 0):
    """A random ``ClapModel`` with every tensor moved off its init: the bias tables (zeros at init) and the
    BatchNorm statistics too, so a mis-wired bias or normalisation cannot pass."""
    from transformers import ClapConfig, ClapModel

    torch.manual_seed(seed)
    ref = ClapModel(ClapConfig(**config)).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.add_((0.1 if p.ndim <= 1 or "bias_table" in name else 0.0) * torch.randn(p.shape, generator=g))
        bn = ref.audio_model.audio_encoder.batch_norm
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g))
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.5)
    return ref


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ref = build_reference_clap()
    root = write_component(tmp_path_factory.mktemp("clap_audio"), "text_encoder", ref)
    return ref, root


def random_features(batch: int, frames: int, seed: int) -> torch.Tensor:
    """Log-mel-like values (dB around -40) of shape (B, 1, frames, 64)."""
    g = torch.Generator().manual_seed(seed)
    return 10 * torch.randn(batch, 1, frames, 64, generator=g) - 40


@pytest.mark.parametrize("frames", [1001, 1024, 640])  # 10 s; the exact fold width; a shorter clip
def test_embeddings_match_reference(tiny, frames: int):
    ref, root = tiny
    model = load_clap_audio(open_checkpoint(root))
    x = random_features(2, frames, seed=frames)
    with torch.no_grad():
        want = ref.get_audio_features(input_features=x).pooler_output
        got = model(x)
        want_pooled = ref.audio_model(input_features=x).pooler_output
        got_pooled = model.audio_model.audio_encoder(x)
    assert got.shape == want.shape == (2, 16)
    assert rel_err(got_pooled, want_pooled) <= 1e-5
    assert rel_err(got, want) <= 1e-5
    assert torch.allclose(got.norm(dim=-1), torch.ones(2))


def test_logit_scale_is_the_text_one(tiny):
    ref, root = tiny
    model = load_clap_audio(open_checkpoint(root))
    assert model.logit_scale_t.item() == ref.logit_scale_t.item() != ref.logit_scale_a.item()


def test_too_many_frames_is_an_error(tiny):
    _, root = tiny
    model = load_clap_audio(open_checkpoint(root))
    with pytest.raises(ValueError, match="exceed"):
        model(random_features(1, 1025, seed=0))


def _accepted_keys(monkeypatch, root: Path, loader) -> list[str]:
    """Keys a loader asks ``read_weights`` for (its ``select`` accepts), recorded by wrapping ``select``."""
    accepted: list[str] = []
    original = Checkpoint.read_weights

    def spy(self, component, select=None):
        def recording(key: str) -> bool:
            ok = select is None or select(key)
            if ok:
                accepted.append(key)
            return ok

        return original(self, component, recording)

    monkeypatch.setattr(Checkpoint, "read_weights", spy)
    loader(open_checkpoint(root))
    return accepted


def test_reads_only_the_audio_keys_and_text_loading_reads_none_of_them(tiny, monkeypatch):
    from audioldm2_core.clap_text import load_clap_text

    _, root = tiny
    audio = _accepted_keys(monkeypatch, root, load_clap_audio)
    assert audio and all(
        k.startswith(("audio_model.", "audio_projection.")) or k == "logit_scale_t" for k in audio
    )
    assert "logit_scale_t" in audio and "logit_scale_a" not in audio
    text = _accepted_keys(monkeypatch, root, load_clap_text)
    assert text and not any(is_audio_key(k) for k in text)


def test_file_without_derived_tables_still_loads(tiny, tmp_path):
    """relative_position_index and num_batches_tracked are not weights: a file may or may not have them."""
    ref, root = tiny

    def drop(state):
        for k in [k for k in state if k.endswith((".relative_position_index", ".num_batches_tracked"))]:
            del state[k]

    model = load_clap_audio(open_checkpoint(edit_weights(root, tmp_path / "c", "text_encoder", drop)))
    x = random_features(1, 1001, seed=3)
    with torch.no_grad():
        assert rel_err(model(x), ref.get_audio_features(input_features=x).pooler_output) <= 1e-5


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda s: s.pop("audio_model.audio_encoder.layers.1.blocks.1.attention.self.query.weight"),
            "missing",
        ),
        (lambda s: s.pop("audio_model.audio_encoder.batch_norm.running_var"), "missing"),
        (lambda s: s.pop("logit_scale_t"), "missing"),
        (lambda s: s.__setitem__("audio_model.audio_encoder.extra.weight", torch.zeros(1)), "unexpected"),
        (lambda s: s.__setitem__("audio_projection.linear2.bias", torch.zeros(5)), "mis-shaped"),
        (
            lambda s: s.__setitem__(
                "audio_model.audio_encoder.layers.0.blocks.0.attention.self.relative_position_index",
                relative_position_index(8).flip(0),
            ),
            "table of a 8-wide window",
        ),
    ],
)
def test_strict_loading(tiny, tmp_path, edit, message):
    _, root = tiny
    bad = edit_weights(root, tmp_path / "c", "text_encoder", edit)
    with pytest.raises(WeightsError, match=message):
        load_clap_audio(open_checkpoint(bad))


def test_config_rejections():
    d = dict(TINY_CLAP, model_type="clap")
    with pytest.raises(UnsupportedConfigError, match="enable_fusion"):
        clap_config({**d, "audio_config": {**d["audio_config"], "enable_fusion": True}})
    from audioldm2_core.clap_audio import ClapAudio

    for audio, match in [
        ({"spec_size": 192}, "window_size"),  # 48x48 grid: stage 1 is 24x24, stage 3 6x6 < window 8
        ({"hidden_size": 32}, "hidden_size"),
    ]:
        cfg = clap_config({**d, "audio_config": {**d["audio_config"], **audio}}).audio
        with torch.device("meta"), pytest.raises(UnsupportedConfigError, match=match):
            ClapAudio(cfg)


def test_tiny_pipeline_checkpoint(tiny_base):
    """The lead's full tiny checkpoint: load_clap_audio against ClapModel.from_pretrained of text_encoder/."""
    from transformers import ClapModel

    root = tiny_base
    ref = ClapModel.from_pretrained(root / "text_encoder", torch_dtype=torch.float32).eval()
    model = load_clap_audio(open_checkpoint(root))
    x = random_features(2, 1001, seed=7)
    with torch.no_grad():
        assert rel_err(model(x), ref.get_audio_features(input_features=x).pooler_output) <= 1e-5


@pytest.mark.slow
def test_real_size_audio_branch(tmp_path):
    """The hub's HTSAT (width 128, depths 2-2-12-2, 1024 -> 512) with random weights; a tiny text branch."""
    import json

    hub = json.loads((Path(__file__).parents[1] / HUB_TEXT_ENCODER).read_text())
    config = dict(TINY_CLAP, projection_dim=hub["projection_dim"], audio_config=hub["audio_config"])
    ref = build_reference_clap(config, seed=11)
    model = load_clap_audio(open_checkpoint(write_component(tmp_path, "text_encoder", ref)))
    x = random_features(2, 1001, seed=12)
    with torch.no_grad():
        assert rel_err(model(x), ref.get_audio_features(input_features=x).pooler_output) <= 1e-5
