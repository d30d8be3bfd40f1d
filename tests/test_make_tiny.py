"""The tiny checkpoint maker: official layout from the reference's save_pretrained, deterministic for a seed."""

from __future__ import annotations

import json

import pytest
import torch

from weights_tools.make_tiny import build_models, tiny_configs


def test_layout_is_the_official_one(tiny_base):
    index = json.loads((tiny_base / "model_index.json").read_text())
    assert index["_class_name"] == "AudioLDM2Pipeline"
    assert index["language_model"] == ["transformers", "GPT2Model"]  # as on the hub, not GPT2LMHeadModel
    assert index["text_encoder"] == ["transformers", "ClapModel"]
    assert index["unet"] == ["audioldm2", "AudioLDM2UNet2DConditionModel"]
    names = {p.relative_to(tiny_base).as_posix() for p in tiny_base.rglob("*") if p.is_file()}
    for expected in [
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "projection_model/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
        "language_model/model.safetensors",
        "vocoder/model.safetensors",
        "scheduler/scheduler_config.json",
        "feature_extractor/preprocessor_config.json",
        "tokenizer/tokenizer.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer_2/tokenizer.json",
        "tokenizer_2/spiece.model",
    ]:
        assert expected in names
    lm = json.loads((tiny_base / "language_model" / "config.json").read_text())
    assert lm["max_new_tokens"] == 8 and lm["architectures"] == ["GPT2Model"]
    unet = json.loads((tiny_base / "unet" / "config.json").read_text())
    assert unet["cross_attention_dim"] == [[None, 32, 48]] * 4


def test_large_variant_shape(tiny_large):
    unet = json.loads((tiny_large / "unet" / "config.json").read_text())
    assert unet["cross_attention_dim"] == [[None, 32, 48, None]] * 4
    assert unet["transformer_layers_per_block"] == 2


def test_models_are_deterministic_for_a_seed():
    configs = tiny_configs("base", {"tokenizer": 1001, "tokenizer_2": 600})
    a, b = build_models(configs, seed=7, tiny=True), build_models(configs, seed=7, tiny=True)
    c = build_models(configs, seed=8, tiny=True)
    for name in a:
        sa, sb, sc = a[name].state_dict(), b[name].state_dict(), c[name].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert not all(torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point()), name


@pytest.mark.parametrize("variant", ["gigaspeech", "ljspeech"])
def test_speech_variants(request, variant):
    """The anhnct/* layout: VitsModel + VitsTokenizer, learned positions, 512 GPT-2 states, UNet [[None, lm]]."""
    path = request.getfixturevalue(f"tiny_{variant}")
    index = json.loads((path / "model_index.json").read_text())
    assert index["text_encoder_2"] == ["transformers", "VitsModel"]
    assert index["tokenizer_2"] == ["transformers", "VitsTokenizer"]
    projection = json.loads((path / "projection_model" / "config.json").read_text())
    assert projection["use_learned_position_embedding"] and projection["max_seq_length"] == 310
    assert json.loads((path / "language_model" / "config.json").read_text())["max_new_tokens"] == 512
    unet = json.loads((path / "unet" / "config.json").read_text())
    assert all(len(x) == 2 and x[0] is None for x in unet["cross_attention_dim"])
    tok = json.loads((path / "tokenizer_2" / "tokenizer_config.json").read_text())
    assert (
        tok["model_max_length"] == 310 and tok["phonemize"] and tok["add_blank"] == (variant == "gigaspeech")
    )
