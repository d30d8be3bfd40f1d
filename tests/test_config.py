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


# ------------------------------------------------------------------------ the forms the reference accepts


def _clap_audio(**audio) -> dict:
    d = load("cvssp__audioldm2", "text_encoder")
    return {**d, "audio_config": {**d["audio_config"], **audio}}


@pytest.mark.parametrize(
    "component, change, read",
    [
        # transformers' Swin/CLAP: an int is (v, v)
        ("text_encoder", _clap_audio(patch_stride=2), lambda c: c.audio.patch_stride == (2, 2)),
        ("text_encoder", _clap_audio(patch_stride=[4, 2]), lambda c: c.audio.patch_stride == (4, 2)),
        ("text_encoder", _clap_audio(patch_size=[4, 4]), lambda c: c.audio.patch_size == (4, 4)),
        # ClapConfig writes its projection_hidden_act over the branches'
        ("text_encoder", {"text_config": {"projection_hidden_act": "gelu"}}, lambda c: c.text.hidden_size == 768),
        # attribute_map aliases: the alias wins, as in transformers
        ("text_encoder_2", {"hidden_size": 64, "num_attention_heads": 4}, lambda c: (c.d_model, c.num_heads) == (64, 4)),
        ("text_encoder_2", {"num_hidden_layers": 3, "head_dim": 16}, lambda c: (c.num_layers, c.d_kv) == (3, 16)),
        ("text_encoder_2", {"feed_forward_proj": "gated-gelu_new"}, lambda c: c.gated),
        ("language_model", {"hidden_size": 96, "num_hidden_layers": 3}, lambda c: (c.n_embd, c.n_layer, c.n_inner) == (96, 3, 384)),
        ("language_model", {"max_position_embeddings": 99, "num_attention_heads": 4}, lambda c: (c.n_positions, c.n_head) == (99, 4)),
        # diffusers' UNet: one value or one per block; "UNetRes" block names; cross_attention_dim forms
        ("unet", {"layers_per_block": [2, 1, 2, 1]}, lambda c: c.layers_per_block == (2, 1, 2, 1)),
        ("unet", {"attention_head_dim": [2, 4, 8, 8]}, lambda c: c.num_heads == (2, 4, 8, 8)),
        ("unet", {"transformer_layers_per_block": [1, 2, 2, 2]}, lambda c: c.transformer_layers == (1, 2, 2, 2)),
        ("unet", {"cross_attention_dim": 768}, lambda c: c.cross_attention_dims == ((768,),) * 4),
        ("unet", {"cross_attention_dim": [8, 768, 768, 768]}, lambda c: c.cross_attention_dims[0] == (8,)),
        ("unet", {"only_cross_attention": [False] * 4}, lambda c: c.down_attn == (False, True, True, True)),
        ("unet", {"down_block_types": ["UNetResDownBlock2D"] + ["CrossAttnDownBlock2D"] * 3}, lambda c: not c.down_attn[0]),
        ("vae", {"up_block_types": ["UNetResUpDecoderBlock2D"] * 3}, lambda c: c.scale_factor == 4),
        # SpeechT5HifiGan pairs its lists with zip: extra entries are not used
        ("vocoder", {"upsample_kernel_sizes": [16, 16, 8, 4, 4, 4]}, lambda c: len(c.upsample_kernel_sizes) == 5),
        ("vocoder", {"resblock_dilation_sizes": [[1, 3, 5]] * 4}, lambda c: len(c.resblock_dilation_sizes) == 3),
    ],
)  # fmt: skip
def test_every_form_the_reference_accepts(component, change, read):
    assert read(TRANSLATORS[component]({**load("cvssp__audioldm2", component), **change}))


def test_aliases_read_as_transformers_reads_them():
    from transformers import GPT2Config, T5Config

    t5 = {
        **load("cvssp__audioldm2", "text_encoder_2"),
        "hidden_size": 64,
        "d_model": 32,
        "num_attention_heads": 4,
    }
    ref = T5Config.from_dict(t5)
    assert (C.t5_config(t5).d_model, C.t5_config(t5).num_heads) == (ref.d_model, ref.num_heads) == (64, 4)
    gpt = {**load("cvssp__audioldm2", "language_model"), "hidden_size": 96, "n_embd": 48, "n_inner": None}
    ref = GPT2Config.from_dict(gpt)
    assert C.gpt2_config(gpt).n_embd == ref.n_embd == 96


@pytest.mark.parametrize(
    "component, change, error, message",
    [
        ("unet", {"only_cross_attention": [True, False, False, False]}, C.UnsupportedConfigError, r"only_cross_attention=\[True"),
        ("unet", {"layers_per_block": [2, 2]}, C.ConfigError, r"layers_per_block=\[2, 2\] is neither an integer nor a list of 4"),
        ("unet", {"cross_attention_dim": [[None, 768, 1024, None, 768]] * 4}, C.ConfigError, r"up to 4"),
        ("unet", {"sample_size": [256, 16]}, C.UnsupportedConfigError, r"sample_size=\[256, 16\]"),
        ("text_encoder", _clap_audio(patch_stride=[4, 4, 4]), C.ConfigError, r"patch_stride=\[4, 4, 4\] is neither"),
        ("text_encoder", _clap_audio(window_size=[8, 8]), C.ConfigError, r"window_size=\[8, 8\] is not an integer"),
        ("language_model", {"reorder_and_upcast_attn": True}, C.UnsupportedConfigError, r"reorder_and_upcast_attn=True"),
        ("vocoder", {"upsample_kernel_sizes": [16, 16]}, C.ConfigError, r"fewer entries than upsample_rates"),
        ("vae", {"layers_per_block": [2, 2, 2]}, C.ConfigError, r"layers_per_block=\[2, 2, 2\] is not an integer"),
    ],
)  # fmt: skip
def test_forms_the_reference_refuses_or_we_do_not_run(component, change, error, message):
    with pytest.raises(error, match=message):
        TRANSLATORS[component]({**load("cvssp__audioldm2", component), **change})


def _folder_with(tmp_path: Path, component: str, change: dict) -> Path:
    """A pipeline folder of the real configs and no weight file at all, one config changed."""
    import shutil

    from audioldm2_core.loading import COMPONENTS

    index = {
        "_class_name": "AudioLDM2Pipeline",
        **{c: ["x", classes[0]] for c, classes in COMPONENTS.items()},
    }
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    for c in COMPONENTS:
        shutil.copytree(HUB / "cvssp__audioldm2" / c, tmp_path / c)
    path = next(p for p in (tmp_path / component).iterdir() if p.suffix == ".json" and "token" not in p.name)
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    return path


@pytest.mark.parametrize(
    "component, change, named",
    [
        ("unet", {"upcast_attention": True}, "upcast_attention=True"),
        ("vae", {"act_fn": "gelu"}, "act_fn='gelu'"),
        ("vocoder", {"model_type": "hifigan-v2"}, "model_type='hifigan-v2'"),
        ("scheduler", {"prediction_type": "sample"}, "prediction_type='sample'"),
    ],
)
def test_loading_refuses_in_one_line_naming_field_value_and_file(tmp_path, component, change, named):
    """Refused by the config function: the folder has no weights to read."""
    from audioldm2_core import AudioLDM2

    path = _folder_with(tmp_path, component, change)
    with pytest.raises(C.UnsupportedConfigError) as e:
        AudioLDM2.from_pretrained(tmp_path)
    line = str(e.value)
    assert "\n" not in line and named in line and str(path) in line, line
