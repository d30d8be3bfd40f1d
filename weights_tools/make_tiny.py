"""Write a small random AudioLDM 2 checkpoint in the exact official layout, with the reference stack's own
``save_pretrained``: key names, configs and file names come from diffusers and transformers, not from us.

    python -m weights_tools.make_tiny OUT_DIR [--variant base|large|gigaspeech|ljspeech] [--seed 0]

Variants: ``base`` has the ``cvssp/audioldm2`` UNet shape (``[[None, lm, t5]]`` per block, one transformer
layer); ``large`` the ``cvssp/audioldm2-large`` shape (``[[None, lm, t5, None]]``, two layers). The speech
variants have the shape of ``anhnct/audioldm2_gigaspeech`` / ``_ljspeech`` (text-to-speech): ``text_encoder_2``
a transformers ``VitsModel`` and ``tokenizer_2`` a ``VitsTokenizer`` (the VITS symbol table, phonemising
with espeak-ng, ``model_max_length`` 310), the projection's learned position table, GPT-2 generating 512 states,
the UNet ``[[None, lm]]``. The real tokenizers' ``add_blank`` is not known here, so the two differ in it:
``gigaspeech`` blanks (the pipeline's end token then lands on the first blank), ``ljspeech`` does not (it
lands on the first pad). Every other component is the real architecture at a tiny width. Random weights are deterministic for a seed; 1-D
parameters (norm scales, biases) are perturbed away from their 0/1 initialisation so that a swapped scale
and shift cannot pass a parity test. The ``real`` sizes (benchmarks) come from the hub configs shipped in
``weights_tools/hub_configs``.

Needs the test extra (diffusers, transformers, sentencepiece, protobuf).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch

HUB_CONFIGS = Path(__file__).parent / "hub_configs"

# Tiny widths: distinct numbers per stream so a swapped condition cannot go unnoticed.
CLAP_DIM, T5_DIM, LM_DIM = 16, 48, 32


def hub_config(repo: str, component: str) -> dict[str, Any]:
    """A config file of a real checkpoint, from the shipped copies (``cvssp/audioldm2`` -> cvssp__audioldm2)."""
    folder = HUB_CONFIGS / repo.replace("/", "__") / component
    for name in ("config.json", "scheduler_config.json", "preprocessor_config.json"):
        if (folder / name).is_file():
            return json.loads((folder / name).read_text())
    raise FileNotFoundError(f"no config for {repo} {component} in {HUB_CONFIGS}")


# The tiny VAE and vocoder: the real architectures (three UpDecoderBlock2D, 8 latent channels; the hub's
# upsample rates and kernels, so the real output-length arithmetic) at small width. Tests use them too.
TINY_VAE = dict(
    in_channels=1,
    out_channels=1,
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    latent_channels=8,
    norm_num_groups=32,
    sample_size=256,
    scaling_factor=0.4110932946205139,
)
TINY_VOCODER = dict(
    model_in_dim=64,
    sampling_rate=16000,
    upsample_initial_channel=32,
    upsample_rates=[5, 4, 2, 2, 2],
    upsample_kernel_sizes=[16, 16, 8, 4, 4],
    resblock_kernel_sizes=[3, 7, 11],
    resblock_dilation_sizes=[[1, 3, 5]] * 3,
    normalize_before=False,
)


# The tiny VITS: its text encoder at small width (183 symbols, as the hub's: the pipeline writes id 182 as the
# end token), the parts AudioLDM 2 never runs (flow, HiFi-GAN, duration predictor, posterior encoder) as small
# as transformers allows; they are in the file, as in the real one, and are checked to be there and unread.
VITS_DIM = 24
TINY_VITS = dict(
    vocab_size=183,
    hidden_size=VITS_DIM,
    num_hidden_layers=2,
    num_attention_heads=2,
    ffn_dim=40,
    ffn_kernel_size=3,
    window_size=4,
    flow_size=8,
    spectrogram_bins=9,
    upsample_initial_channel=8,
    upsample_rates=[2, 2],
    upsample_kernel_sizes=[4, 4],
    resblock_kernel_sizes=[3],
    resblock_dilation_sizes=[[1]],
    depth_separable_channels=2,
    duration_predictor_filter_channels=8,
    posterior_encoder_num_wavenet_layers=1,
    prior_encoder_num_wavenet_layers=1,
    prior_encoder_num_flows=1,
    duration_predictor_num_flows=1,
)


VARIANTS = ("base", "large", "gigaspeech", "ljspeech")
SPEECH_VARIANTS = {"gigaspeech": "anhnct/audioldm2_gigaspeech", "ljspeech": "anhnct/audioldm2_ljspeech"}
PHONEME_MAX_LENGTH = 310  # the hub projection's max_seq_length: the tokenizer pads the phonemes to it


def tiny_configs(variant: str, vocab_sizes: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Reference-library constructor kwargs of every model component at tiny size."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} ({', '.join(VARIANTS)})")
    if variant in SPEECH_VARIANTS:
        return _tiny_speech_configs(vocab_sizes)
    large = variant == "large"
    return {
        "text_encoder": dict(
            projection_dim=CLAP_DIM,
            text_config=dict(
                vocab_size=vocab_sizes["tokenizer"],
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=37,
                max_position_embeddings=514,  # RoBERTa is padded to 512 tokens
                projection_hidden_size=32,
            ),
            audio_config=dict(
                depths=[1, 1, 2, 1],
                num_attention_heads=[1, 2, 2, 4],
                patch_embeds_hidden_size=8,
                hidden_size=64,
                projection_hidden_size=32,
                num_classes=11,
            ),
        ),
        "text_encoder_2": dict(
            vocab_size=vocab_sizes["tokenizer_2"],
            d_model=T5_DIM,
            d_kv=8,
            d_ff=40,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
        ),
        "language_model": dict(
            n_embd=LM_DIM,
            n_layer=2,
            n_head=4,
            n_positions=256,
            vocab_size=100,
            bos_token_id=99,
            eos_token_id=99,
            max_new_tokens=8,  # AudioLDM 2 stores it in the GPT-2 config (diffusers reads it from there)
        ),
        "projection_model": dict(
            text_encoder_dim=CLAP_DIM, text_encoder_1_dim=T5_DIM, langauge_model_dim=LM_DIM
        ),
        "unet": dict(
            sample_size=64,
            in_channels=8,
            out_channels=8,
            down_block_types=(
                "DownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
            ),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=2,
            attention_head_dim=2,
            cross_attention_dim=[[None, LM_DIM, T5_DIM, None] if large else [None, LM_DIM, T5_DIM]] * 4,
            transformer_layers_per_block=2 if large else 1,
        ),
        "vae": dict(TINY_VAE),
        "vocoder": dict(TINY_VOCODER),
    }


def _tiny_speech_configs(vocab_sizes: dict[str, int]) -> dict[str, dict[str, Any]]:
    """The speech checkpoints' shape at tiny size (hub_configs/anhnct__*): VITS in place of T5, the learned
    position table, GPT-2 with room for 310 + 4 + 1 + 512 positions, a UNet attending to GPT-2 only."""
    c = tiny_configs("base", vocab_sizes)
    c["text_encoder_2"] = dict(TINY_VITS)
    c["language_model"] |= dict(n_positions=1024, max_new_tokens=512)
    c["projection_model"] = dict(
        text_encoder_dim=CLAP_DIM,
        text_encoder_1_dim=VITS_DIM,
        langauge_model_dim=LM_DIM,
        use_learned_position_embedding=True,
        max_seq_length=PHONEME_MAX_LENGTH,
    )
    c["unet"]["cross_attention_dim"] = [[None, LM_DIM]] * 4
    return c


def is_vits(config: dict[str, Any]) -> bool:
    """A ``text_encoder_2`` config of the speech checkpoints (VITS) rather than T5."""
    return config.get("model_type") == "vits" or "window_size" in config


def real_configs(repo: str = "cvssp/audioldm2") -> dict[str, dict[str, Any]]:
    """Constructor kwargs at the real size, from the shipped hub configs."""
    out = {}
    for component in (
        "text_encoder",
        "text_encoder_2",
        "language_model",
        "projection_model",
        "unet",
        "vae",
        "vocoder",
    ):
        d = hub_config(repo, component)
        out[component] = {k: v for k, v in d.items() if not k.startswith("_") and k not in ("architectures",)}
    return out


def _perturb(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Move weights off their constant initialisation, so that no parity test compares zeros or ones.

    0-D and 1-D parameters (norm scales, biases, logit scales) and all-zero tables (Swin relative position
    biases) get noise; BatchNorm statistics (CLAP's mel BatchNorm) get random means and variances.
    """
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim <= 1 or not p.any():
                p.add_(0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=generator))
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=generator) + 0.5)


def unit_gain_vocoder(
    model: torch.nn.Module, upsample_rates: list[int], generator: torch.Generator, gain: float = 1.2
) -> None:
    """Re-draw the vocoder's convolutions near unit gain (in place).

    transformers initialises them with std 0.01, which leaves little but conv_post's bias at the output: a
    parity test (or a benchmark's error column) on such a vocoder would check almost nothing. ``gain`` keeps
    every layer contributing without saturating the final tanh: 1.2 at the tiny width, 0.9 at the real one
    (the output level grows with the width).
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                std = 0.1
            elif name.startswith(
                "upsampler."
            ):  # ConvTranspose1d (in, out, k): in * k / stride taps per sample
                std = gain * (p.shape[0] * p.shape[2] / upsample_rates[int(name.split(".")[1])]) ** -0.5
            else:  # Conv1d (out, in, k)
                std = gain * p[0].numel() ** -0.5
            p.copy_(torch.randn(p.shape, generator=generator) * std)


def build_models(configs: dict[str, dict[str, Any]], seed: int = 0, tiny: bool = False) -> dict[str, Any]:
    """Instantiate the reference modules with random weights (float32), deterministic for ``seed``.

    ``tiny``: also re-draw the vocoder near unit gain (see ``unit_gain_vocoder``); at the real width the
    caller chooses (the benchmark re-draws it with gain 0.9).
    """
    from diffusers import AutoencoderKL
    from diffusers.pipelines.audioldm2.modeling_audioldm2 import (
        AudioLDM2ProjectionModel,
        AudioLDM2UNet2DConditionModel,
    )
    from transformers import (
        ClapConfig,
        ClapModel,
        GPT2Config,
        GPT2Model,
        SpeechT5HifiGan,
        SpeechT5HifiGanConfig,
        T5Config,
        T5EncoderModel,
        VitsConfig,
        VitsModel,
    )

    c = copy.deepcopy(configs)
    vits = is_vits(c["text_encoder_2"])
    if vits:  # model_type is the class's, not a constructor argument
        c["text_encoder_2"].pop("model_type", None)
    builders = {
        "text_encoder": lambda: ClapModel(ClapConfig(**c["text_encoder"])),
        "text_encoder_2": lambda: (
            VitsModel(VitsConfig(**c["text_encoder_2"]))
            if vits
            else T5EncoderModel(T5Config(**c["text_encoder_2"]))
        ),
        "language_model": lambda: GPT2Model(GPT2Config(**c["language_model"])),
        "projection_model": lambda: AudioLDM2ProjectionModel(**c["projection_model"]),
        "unet": lambda: AudioLDM2UNet2DConditionModel(**c["unet"]),
        "vae": lambda: AutoencoderKL(**c["vae"]),
        "vocoder": lambda: SpeechT5HifiGan(SpeechT5HifiGanConfig(**c["vocoder"])),
    }
    models = {}
    for i, (name, build) in enumerate(builders.items()):
        torch.manual_seed(seed * 1000 + i)
        model = build().float().eval()
        _perturb(model, torch.Generator().manual_seed(seed * 1000 + 100 + i))
        if name == "vocoder":
            if tiny:
                unit_gain_vocoder(
                    model, c["vocoder"]["upsample_rates"], torch.Generator().manual_seed(seed * 1000 + 300)
                )
            with torch.no_grad():  # normalisation statistics, used when normalize_before is set
                g = torch.Generator().manual_seed(seed * 1000 + 200)
                model.mean.copy_(torch.randn(model.mean.shape, generator=g))
                model.scale.copy_(torch.rand(model.scale.shape, generator=g) + 0.5)
        models[name] = model
    return models


def write_checkpoint(
    out_dir: Path, models: dict[str, Any], repo_for_configs: str = "cvssp/audioldm2"
) -> Path:
    """Save models + scheduler + feature extractor + tokenizers as one pipeline folder."""
    from diffusers import AudioLDM2Pipeline, DDIMScheduler
    from transformers import ClapFeatureExtractor, RobertaTokenizerFast, T5TokenizerFast

    out_dir = Path(out_dir)
    tok_root = out_dir / "_tokenizers"  # written by train_tokenizers; re-saved by the pipeline below
    tokenizer = RobertaTokenizerFast.from_pretrained(tok_root / "tokenizer")
    speech = type(models["text_encoder_2"]).__name__ == "VitsModel"
    if (
        speech
    ):  # saved as transformers 5 saves it (vocab.json, tokenizer_config.json): no older layout to keep
        from transformers import VitsTokenizer

        tokenizer_2 = VitsTokenizer.from_pretrained(tok_root / "tokenizer_2")
    else:
        tokenizer_2 = T5TokenizerFast.from_pretrained(tok_root / "tokenizer_2")
    scheduler = DDIMScheduler.from_config(hub_config(repo_for_configs, "scheduler"))
    fe = {
        k: v
        for k, v in hub_config(repo_for_configs, "feature_extractor").items()
        if k != "feature_extractor_type"
    }
    pipe = AudioLDM2Pipeline(
        vae=models["vae"],
        text_encoder=models["text_encoder"],
        text_encoder_2=models["text_encoder_2"],
        projection_model=models["projection_model"],
        language_model=models["language_model"],
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        feature_extractor=ClapFeatureExtractor(**fe),
        unet=models["unet"],
        scheduler=scheduler,
        vocoder=models["vocoder"],
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    # transformers 5 re-saves tokenizers as tokenizer.json + a new-style config only; the hub has the
    # transformers 4 layout (vocab.json, merges.txt, spiece.model, special_tokens_map.json, legacy configs),
    # which train_tokenizers wrote: keep those.
    for name in ("tokenizer",) if speech else ("tokenizer", "tokenizer_2"):
        shutil.rmtree(out_dir / name)
        shutil.move(tok_root / name, out_dir / name)
    shutil.rmtree(tok_root)
    return out_dir


# The VITS symbol table (jaywalnut310/vits text/symbols.py): pad/blank "_", punctuation and space, Latin
# letters, the IPA espeak-ng writes (stress and length marks included); a repeated symbol keeps its first id.
_VITS_SYMBOLS = (
    "_"
    + ';:,.!?¡¿—…"«»“” '
    + "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    + "ɑɐɒæɓʙβɔɕçɗɖðʤəɘɚɛɜɝɞɟʄɡɠɢʛɦɧħɥʜɨɪʝɭɬɫɮʟɱɯɰŋɳɲɴøɵɸθœɶʘɹɺɾɻʀʁɽʂʃʈʧʉʊʋⱱʌɣɤʍχʎʏʑʐʒʔʡʕʢǀǁǂǃˈˌːˑʼʴʰʱʲʷˠˤ˞↓↑→↗↘'̩'ᵻ"
)


def write_phoneme_tokenizer(out: Path, add_blank: bool) -> int:
    """A ``VitsTokenizer`` over the VITS symbol table, saved by transformers; returns the vocabulary size."""
    from transformers import VitsTokenizer

    vocab: dict[str, int] = {}
    for symbol in _VITS_SYMBOLS:
        vocab.setdefault(symbol, len(vocab))
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    tok = VitsTokenizer(
        str(out / "vocab.json"),
        pad_token="_",
        unk_token="_",
        add_blank=add_blank,
        normalize=True,
        phonemize=True,
        model_max_length=PHONEME_MAX_LENGTH,
    )
    tok.save_pretrained(out)
    return len(vocab)


def make_tiny(out_dir: str | Path, variant: str = "base", seed: int = 0) -> Path:
    """Write a tiny random checkpoint (see module docstring) to ``out_dir`` and return it."""
    from weights_tools.tiny_tokenizers import train_tokenizers

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} ({', '.join(VARIANTS)})")
    out_dir = Path(out_dir)
    vocab_sizes = train_tokenizers(out_dir / "_tokenizers", seed=seed)
    if variant in SPEECH_VARIANTS:
        shutil.rmtree(out_dir / "_tokenizers" / "tokenizer_2")
        write_phoneme_tokenizer(out_dir / "_tokenizers" / "tokenizer_2", add_blank=variant == "gigaspeech")
    models = build_models(tiny_configs(variant, vocab_sizes), seed=seed, tiny=True)
    return write_checkpoint(out_dir, models, SPEECH_VARIANTS.get(variant, "cvssp/audioldm2"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description="Write a tiny random AudioLDM 2 checkpoint in the official layout."
    )
    p.add_argument("out_dir", help="folder to write (created)")
    p.add_argument("--variant", default="base", choices=VARIANTS, help="checkpoint shape")
    p.add_argument("--seed", type=int, default=0, help="random seed for weights and tokenizers")
    a = p.parse_args(argv)
    print(make_tiny(a.out_dir, a.variant, a.seed))


if __name__ == "__main__":
    main()
