"""diffusers' own AudioLDM 2 test fixture as a pipeline folder: the components of ``get_dummy_components`` in
diffusers' ``tests/pipelines/audioldm2/test_audioldm2.py``, built with its configs and seeds and saved with
``save_pretrained`` in the hub layout.

Two versions of that function:
- ``"main"``: diffusers' main branch, as since v0.30 (diffusers PR 7846 shrank it): UNet (8, 16) with
  ``cross_attention_dim=(8, 16)``, one int per block; a CLAP whose audio branch (spec 8, patch_stride 2) the
  reference itself cannot run (its stage 2 is smaller than the window), so those tests never re-rank.
- ``"v0.29"``: before that, the folder issue 35 describes: UNet (32, 64) with ``cross_attention_dim=([None,
  16, 32], [None, 16, 32])``, CLAP spec 64 with ``patch_stride=2``, which the reference re-ranks with.

What differs from diffusers' test, and why:
- the tokenizers are ours (``weights_tools.tiny_tokenizers``; theirs are hub repos), with their
  ``model_max_length=77``; our RoBERTa BPE has 1000 tokens as their text config's vocabulary;
- the feature extractor is transformers' ``ClapFeatureExtractor`` defaults with their ``hop_length=7900``
  (theirs is a hub repo's config with that hop length): ``truncation="fusion"``, which our re-ranking
  refuses, and which the reference needs for the four-channel CLAP audio branch of these configs;
- the language model is saved as the hub's ``GPT2Model``: main builds a ``GPT2LMHeadModel`` (transformers 5
  needs one to generate), whose ``transformer`` is saved; the oracle loads it back as one. The folder as
  their pipeline saves it, with the ``GPT2LMHeadModel``, is ``hub_layout=False``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

VERSIONS = ("main", "v0.29")
MAX_LENGTH = 77  # their tokenizers' model_max_length


def _unet_vae(version: str) -> tuple[Any, Any, Any]:
    from diffusers import AudioLDM2UNet2DConditionModel, AutoencoderKL, DDIMScheduler

    main = version == "main"
    torch.manual_seed(0)
    unet = AudioLDM2UNet2DConditionModel(
        block_out_channels=(8, 16) if main else (32, 64),
        layers_per_block=1 if main else 2,
        **(dict(norm_num_groups=8) if main else {}),
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=(8, 16) if main else ([None, 16, 32], [None, 16, 32]),
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[8, 16] if main else [32, 64],
        in_channels=1,
        out_channels=1,
        **(dict(norm_num_groups=8) if main else {}),
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
    )
    return unet, scheduler, vae


def _clap(version: str) -> Any:
    from transformers import ClapConfig, ClapModel

    main = version == "main"
    small = 1 if main else 2
    text = dict(
        bos_token_id=0,
        eos_token_id=2,
        hidden_size=8 if main else 16,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=small,
        num_hidden_layers=small,
        pad_token_id=1,
        vocab_size=1000,
        projection_dim=8 if main else 16,
    )
    audio = dict(
        spec_size=8 if main else 64,
        window_size=4,
        num_mel_bins=8 if main else 64,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        depths=[small, small],
        num_attention_heads=[small, small],
        num_hidden_layers=small,
        hidden_size=192,
        projection_dim=8 if main else 16,
        patch_size=2,
        patch_stride=2,
        patch_embed_input_channels=4,
    )
    torch.manual_seed(0)
    return ClapModel(ClapConfig(text_config=text, audio_config=audio, projection_dim=16))


def _text_models(version: str) -> tuple[Any, Any, Any]:
    from diffusers import AudioLDM2ProjectionModel
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model, T5Config, T5EncoderModel

    main = version == "main"
    small = 1 if main else 2
    torch.manual_seed(0)
    t5 = T5EncoderModel(
        T5Config(vocab_size=32100, d_model=32, d_ff=37, d_kv=8, num_heads=small, num_layers=small)
    )
    torch.manual_seed(0)
    gpt2 = dict(n_embd=16, n_head=small, n_layer=small, vocab_size=1000, n_ctx=99, n_positions=99)
    language_model = (GPT2LMHeadModel if main else GPT2Model)(GPT2Config(**gpt2))
    language_model.config.max_new_tokens = 8
    torch.manual_seed(0)
    projection = AudioLDM2ProjectionModel(text_encoder_dim=16, text_encoder_1_dim=32, langauge_model_dim=16)
    return t5, language_model, projection


def vocoder_config(model_in_dim: int = 8) -> Any:
    from transformers import SpeechT5HifiGanConfig

    return SpeechT5HifiGanConfig(
        model_in_dim=model_in_dim,
        sampling_rate=16000,
        upsample_initial_channel=16,
        upsample_rates=[2, 2],
        upsample_kernel_sizes=[4, 4],
        resblock_kernel_sizes=[3, 7],
        resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]],
        normalize_before=False,
    )


def dummy_components(version: str, tokenizer_root: Path) -> dict[str, Any]:
    """``get_dummy_components`` of that diffusers version, in its order of seeds; our tokenizers (see above)."""
    from transformers import ClapFeatureExtractor, RobertaTokenizer, SpeechT5HifiGan, T5Tokenizer

    if version not in VERSIONS:
        raise ValueError(f"unknown version {version!r} ({', '.join(VERSIONS)})")
    unet, scheduler, vae = _unet_vae(version)
    text_encoder = _clap(version)
    t5, language_model, projection = _text_models(version)
    return {
        "unet": unet,
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": t5,
        "tokenizer": RobertaTokenizer.from_pretrained(
            tokenizer_root / "tokenizer", model_max_length=MAX_LENGTH
        ),
        "tokenizer_2": T5Tokenizer.from_pretrained(
            tokenizer_root / "tokenizer_2", model_max_length=MAX_LENGTH
        ),
        "feature_extractor": ClapFeatureExtractor(hop_length=7900),
        "language_model": language_model,
        "projection_model": projection,
        "vocoder": SpeechT5HifiGan(vocoder_config()),  # not re-seeded: it follows the projection's draws
    }


def save_fixture(out: Path, version: str, hub_layout: bool = True) -> Path:
    """Build ``dummy_components(version)`` and save them as a pipeline folder: in the hub layout, or (main,
    ``hub_layout=False``) as their pipeline saves it, the language model a ``GPT2LMHeadModel``."""
    from diffusers import AudioLDM2Pipeline

    from weights_tools.tiny_tokenizers import train_tokenizers

    out = Path(out)
    train_tokenizers(out / "_tokenizers", seed=0)
    components = dummy_components(version, out / "_tokenizers")
    lm = components["language_model"]
    if hub_layout:
        components["language_model"] = getattr(lm, "transformer", lm)  # the hub's GPT2Model
    AudioLDM2Pipeline(**components).save_pretrained(out, safe_serialization=True)
    shutil.rmtree(out / "_tokenizers")
    return out


def with_patch_stride_pair(src: Path, dst: Path) -> Path:
    """The folder with ``patch_stride`` written as a pair: the edit issue 35 found that loading needed."""
    shutil.copytree(src, dst)
    path = dst / "text_encoder" / "config.json"
    config = json.loads(path.read_text())
    assert config["audio_config"]["patch_stride"] == 2
    config["audio_config"]["patch_stride"] = [2, 2]
    path.write_text(json.dumps(config, indent=2))
    return dst


def with_wider_vocoder(src: Path, dst: Path) -> Path:
    """``test_audioldm2_vocoder_model_in_dim``: the vocoder rebuilt with ``model_in_dim * 2`` (seed 0 here;
    theirs draws from wherever the generator is after a pipeline call)."""
    from transformers import SpeechT5HifiGan

    shutil.copytree(src, dst)
    shutil.rmtree(dst / "vocoder")
    torch.manual_seed(0)
    SpeechT5HifiGan(vocoder_config(16)).save_pretrained(dst / "vocoder", safe_serialization=True)
    return dst
