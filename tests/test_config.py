"""Config translation on every config file of the five real checkpoints (shipped in weights_tools/hub_configs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from audioldm2_core import config as C

HUB = Path(__file__).resolve().parents[1] / "weights_tools" / "hub_configs"
REPOS = sorted(p.name for p in HUB.iterdir() if p.is_dir())
TRANSLATORS = {
    "text_encoder": C.clap_config,
    "text_encoder_2": C.t5_config,
    "language_model": C.gpt2_config,
    "projection_model": C.projection_config,
    "unet": C.unet_config,
    "vae": C.vae_config,
    "vocoder": C.vocoder_config,
    "scheduler": C.scheduler_config,
    "feature_extractor": C.feature_extractor_config,
}


def load(repo: str, component: str) -> dict:
    folder = HUB / repo / component
    (path,) = [p for p in folder.iterdir() if p.suffix == ".json" and "tokenizer" not in p.name]
    return json.loads(path.read_text())


def test_five_checkpoints_are_shipped():
    assert REPOS == [
        "anhnct__audioldm2_gigaspeech",
        "anhnct__audioldm2_ljspeech",
        "cvssp__audioldm2",
        "cvssp__audioldm2-large",
        "cvssp__audioldm2-music",
    ]


@pytest.mark.parametrize("repo", REPOS)
@pytest.mark.parametrize("component", sorted(TRANSLATORS))
def test_every_hub_config_translates_or_is_rejected(repo, component):
    d = load(repo, component)
    if repo.startswith("anhnct") and component == "text_encoder_2":
        # The TTS checkpoints' second text encoder is VITS's phoneme encoder: T5's translation refuses it
        with pytest.raises(C.UnsupportedConfigError, match=r"text_encoder_2 .*model_type='vits'"):
            TRANSLATORS[component](d)
        assert C.vits_config(d).hidden_size == 192
        return
    cfg = TRANSLATORS[component](d)
    assert cfg is not None


def test_base_values_and_misnomers():
    unet = C.unet_config(load("cvssp__audioldm2", "unet"))
    assert unet.num_heads == (8, 8, 8, 8)  # hub "attention_head_dim": a head count
    assert unet.cross_attention_dims == ((None, 768, 1024),) * 4
    assert unet.transformer_layers == (1, 1, 1, 1)
    assert unet.down_attn == (False, True, True, True) and unet.up_attn == (True, True, True, False)
    assert unet.time_embed_dim == 512
    proj = C.projection_config(load("cvssp__audioldm2", "projection_model"))
    assert (proj.text_encoder_dim, proj.text_encoder_1_dim, proj.language_model_dim) == (512, 1024, 768)
    clap = C.clap_config(load("cvssp__audioldm2", "text_encoder"))
    # Top-level hidden_size 768 / num_hidden_layers 16 describe nothing; RoBERTa-base defaults apply.
    assert (clap.text.hidden_size, clap.text.num_layers, clap.text.vocab_size) == (768, 12, 50265)
    assert clap.audio.depths == (2, 2, 12, 2) and clap.audio.hidden_size == 1024
    assert clap.audio.num_heads == (4, 8, 16, 32)
    t5 = C.t5_config(load("cvssp__audioldm2", "text_encoder_2"))
    assert (t5.d_model, t5.num_layers, t5.num_heads, t5.d_ff, t5.gated) == (1024, 24, 16, 2816, True)
    gpt = C.gpt2_config(load("cvssp__audioldm2", "language_model"))
    assert (gpt.n_embd, gpt.n_layer, gpt.n_inner, gpt.max_new_tokens) == (768, 12, 3072, 8)
    vae = C.vae_config(load("cvssp__audioldm2", "vae"))
    assert vae.scale_factor == 4 and vae.latent_channels == 8 and vae.in_channels == 1
    voc = C.vocoder_config(load("cvssp__audioldm2", "vocoder"))
    assert voc.hop_length == 160 and voc.normalize_before is False
    sch = C.scheduler_config(load("cvssp__audioldm2", "scheduler"))
    assert (sch.timestep_spacing, sch.steps_offset, sch.set_alpha_to_one) == ("leading", 1, False)


def test_large_and_speech_unet_shapes():
    large = C.unet_config(load("cvssp__audioldm2-large", "unet"))
    assert large.cross_attention_dims == ((None, 768, 1024, None),) * 4
    assert large.transformer_layers == (2, 2, 2, 2)
    speech = C.unet_config(load("anhnct__audioldm2_ljspeech", "unet"))
    assert speech.cross_attention_dims == ((None, 768),) * 4
    proj = C.projection_config(load("anhnct__audioldm2_ljspeech", "projection_model"))
    assert proj.use_learned_position_embedding and proj.max_seq_length == 310


@pytest.mark.parametrize(
    "component, change, message",
    [
        ("unet", {"use_linear_projection": True}, r"use_linear_projection=True is not supported"),
        ("unet", {"act_fn": "gelu"}, r"act_fn='gelu' is not supported"),
        (
            "unet",
            {"down_block_types": ["DownBlock2D", "SimpleCrossAttnDownBlock2D"] * 2},
            r"down_block_types=",
        ),
        ("unet", {"class_embed_type": "timestep"}, r"class_embed_type='timestep'"),
        ("unet", {"cross_attention_dim": [[None, 768]] * 3 + [[None, 1024]]}, r"differs between blocks"),
        ("vae", {"up_block_types": ["UpDecoderBlock2D"]}, r"up_block_types="),
        ("vae", {"shift_factor": 0.5}, r"shift_factor=0.5"),
        ("vae", {"down_block_types": ["DownEncoderBlock2D"] * 2}, r"down_block_types="),
        ("vae", {"use_quant_conv": False}, r"use_quant_conv=False"),
        ("scheduler", {"thresholding": True}, r"thresholding=True"),
        ("scheduler", {"timestep_spacing": "karras"}, r"timestep_spacing='karras'"),
        ("scheduler", {"prediction_type": "sample"}, r"prediction_type='sample'"),
        ("language_model", {"activation_function": "relu"}, r"activation_function='relu'"),
        ("text_encoder_2", {"feed_forward_proj": "gated-silu"}, r"feed_forward_proj='gated-silu'"),
        ("text_encoder", {"audio_config": {"enable_fusion": True}}, r"enable_fusion=True"),
        ("feature_extractor", {"truncation": "fusion"}, r"truncation='fusion'"),
    ],
)
def test_unsupported_settings_are_named(component, change, message):
    d = {**load("cvssp__audioldm2", component), **change}
    with pytest.raises(C.UnsupportedConfigError, match=message):
        TRANSLATORS[component](d)


def test_missing_required_field():
    d = load("cvssp__audioldm2", "projection_model")
    del d["langauge_model_dim"]
    with pytest.raises(C.ConfigError, match="langauge_model_dim"):
        C.projection_config(d)
