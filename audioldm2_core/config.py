"""Configs: one small frozen dataclass per component, and one function per component that builds it from
the hub's ``config.json``.

Each dataclass holds only the fields our code reads. Each ``*_config(d)`` function reads the hub dict field
by field, fills in the reference library's default for keys the file leaves out (transformers and diffusers
write partial configs), names the misnomers of the hub files, and raises :class:`UnsupportedConfigError`
for a setting we do not implement, rather than silently building a different network. A field the
reference accepts in more than one form (an int or a pair, one value or one per block, an alias) is read
as the reference reads it. Errors name the component, its class and, read from a checkpoint, the file.

Misnomers on the hub, translated here and nowhere else:
- UNet ``attention_head_dim`` is the number of heads, not their width (diffusers issue 2011).
- projection model ``langauge_model_dim`` is misspelled; we call it ``language_model_dim``.
- CLAP's top-level ``hidden_size`` / ``num_hidden_layers`` describe nothing that exists; the text branch
  uses ``text_config`` (whose defaults are RoBERTa-base's) and the audio branch ``audio_config``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, UnsupportedConfigError

__all__ = [
    "ConfigFile", "ClapTextConfig", "ClapAudioConfig", "ClapConfig", "T5Config", "VitsConfig", "GPT2Config",
    "ProjectionConfig", "UNetConfig", "VAEConfig", "VocoderConfig", "SchedulerConfig", "FeatureExtractorConfig",
    "clap_config", "clap_audio_config", "htsat_stages", "t5_config", "vits_config", "gpt2_config",
    "projection_config", "unet_config", "vae_config", "vocoder_config", "scheduler_config",
    "feature_extractor_config",
]  # fmt: skip


class ConfigFile(dict):
    """A component's parsed config file, with the path it was read from: errors about it name the file."""

    def __init__(self, data: dict[str, Any], path: str | os.PathLike):
        super().__init__(data)
        self.path = str(path)


def _where(d: dict[str, Any], component: str, cls: str | None = None) -> str:
    """How errors name a config: the component, its class, and its file when it came from one."""
    parts = [p for p in (cls, getattr(d, "path", None)) if p]
    return f"{component} ({', '.join(parts)})" if parts else component


def _require(d: dict[str, Any], component: str, key: str, expected: Any, default: Any = None) -> None:
    """Reject a setting whose value differs from the only one we implement."""
    value = d.get(key, default)
    ok = value in expected if isinstance(expected, tuple) else value == expected
    if not ok:
        raise UnsupportedConfigError(
            f"{component}: {key}={value!r} is not supported (supported: {expected!r})"
        )


def _get(d: dict[str, Any], component: str, key: str) -> Any:
    if key not in d:
        raise ConfigError(f"{component}: config has no {key!r}")
    return d[key]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(d: dict[str, Any], c: str, key: str, default: Any) -> int:
    v = d.get(key, default)
    if not _is_int(v):
        raise ConfigError(f"{c}: {key}={v!r} is not an integer")
    return v


def _ints(d: dict[str, Any], c: str, key: str, default: Any) -> tuple[int, ...]:
    """A list or a tuple of ints (JSON writes both as a list)."""
    v = d.get(key, default)
    if not isinstance(v, (list, tuple)) or not all(_is_int(x) for x in v):
        raise ConfigError(f"{c}: {key}={v!r} is not a list of integers")
    return tuple(v)


def _pair(d: dict[str, Any], c: str, key: str, default: Any) -> tuple[int, int]:
    """An int or a pair: transformers' Swin/CLAP read ``patch_size``, ``patch_stride`` as (v, v) from an int."""
    v = d.get(key, default)
    if _is_int(v):
        return (v, v)
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(x) for x in v):
        return (v[0], v[1])
    raise ConfigError(f"{c}: {key}={v!r} is neither an integer nor a pair of integers")


def _per_block(d: dict[str, Any], c: str, key: str, default: Any, n: int) -> tuple[int, ...]:
    """One int for every block, or a list of one per block, as diffusers' UNet constructor reads them."""
    v = d.get(key, default)
    if _is_int(v):
        return (v,) * n
    if isinstance(v, (list, tuple)) and len(v) == n and all(_is_int(x) for x in v):
        return tuple(v)
    raise ConfigError(f"{c}: {key}={v!r} is neither an integer nor a list of {n} (one per block)")


def _aliased(d: dict[str, Any], key: str, alias: str, default: Any) -> Any:
    """A transformers field that its config class's ``attribute_map`` also accepts under another name
    (T5's ``hidden_size`` for ``d_model``, ...); the alias wins when both are there, as it does there."""
    return d.get(alias, d.get(key, default))


# ----------------------------------------------------------------------------------------------- CLAP


@dataclass(frozen=True)
class ClapTextConfig:
    vocab_size: int  # RoBERTa vocabulary (50265)
    hidden_size: int  # width of the RoBERTa encoder (768)
    num_layers: int  # encoder layers (12)
    num_heads: int  # attention heads (12)
    intermediate_size: int  # feed-forward width (3072)
    max_position_embeddings: int  # 514: RoBERTa positions start at pad_token_id + 1
    type_vocab_size: int  # 1: a single token-type row, added to every position
    layer_norm_eps: float  # 1e-12
    pad_token_id: int  # 1: also the offset of the position ids
    projection_dim: int  # 512: the joint CLAP text/audio space


@dataclass(frozen=True)
class ClapAudioConfig:
    """The HTSAT Swin-transformer audio branch, used only for candidate re-ranking."""

    num_mel_bins: int  # 64
    spec_size: int  # 256: the log-mel image is reshaped to spec_size x spec_size
    window_size: int  # 8: Swin window
    patch_size: tuple[int, int]  # (4, 4): the patch convolution's kernel (the hub writes an int)
    patch_stride: tuple[int, int]  # (4, 4): its stride
    patch_embeds_hidden_size: int  # 128: width of stage 1
    depths: tuple[int, ...]  # Swin blocks per stage
    num_heads: tuple[int, ...]  # heads per stage
    hidden_size: int  # 1024: width after the last stage
    mlp_ratio: float  # 4.0
    qkv_bias: bool
    layer_norm_eps: float  # 1e-5
    enable_patch_layer_norm: bool
    flatten_patch_embeds: bool
    patch_embed_input_channels: int  # 1
    num_classes: int  # 527: the AudioSet head present in the file
    projection_dim: int  # 512


@dataclass(frozen=True)
class ClapConfig:
    text: ClapTextConfig
    audio: ClapAudioConfig
    projection_dim: int
    logit_scale_init_value: float  # init only; the loaded ``logit_scale_t`` is what scores use


def clap_config(d: dict[str, Any]) -> ClapConfig:
    """Translate ``text_encoder/config.json`` (transformers ``ClapConfig``).

    ``ClapConfig`` writes its own ``projection_dim`` and ``projection_hidden_act`` into both branches, over
    whatever the branches' dicts say: only the top-level ones are read.
    """
    c = _where(d, "text_encoder", "ClapModel")
    _require(d, c, "model_type", "clap")
    projection_dim = _int(d, c, "projection_dim", 512)
    _require(d, c, "projection_hidden_act", "relu", "relu")
    return ClapConfig(
        text=_clap_text_config(d.get("text_config") or {}, c + " text_config", projection_dim),
        audio=_clap_audio_config(d.get("audio_config") or {}, c + " audio_config", projection_dim),
        projection_dim=projection_dim,
        logit_scale_init_value=d.get("logit_scale_init_value", 1 / 0.07),
    )


def _clap_text_config(t: dict[str, Any], c: str, projection_dim: int) -> ClapTextConfig:
    _require(t, c, "hidden_act", ("gelu",), "gelu")
    # transformers 5 no longer reads it (always absolute); a checkpoint trained otherwise would not load right
    _require(t, c, "position_embedding_type", "absolute", "absolute")
    hidden, heads = _int(t, c, "hidden_size", 768), _int(t, c, "num_attention_heads", 12)
    if hidden % heads:
        raise ConfigError(f"{c}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    return ClapTextConfig(
        vocab_size=_int(t, c, "vocab_size", 50265),
        hidden_size=hidden,
        num_layers=_int(t, c, "num_hidden_layers", 12),
        num_heads=heads,
        intermediate_size=_int(t, c, "intermediate_size", 3072),
        max_position_embeddings=_int(t, c, "max_position_embeddings", 514),
        type_vocab_size=_int(t, c, "type_vocab_size", 1),
        layer_norm_eps=t.get("layer_norm_eps", 1e-12),
        pad_token_id=_int(t, c, "pad_token_id", 1),
        projection_dim=projection_dim,
    )


def _clap_audio_config(a: dict[str, Any], c: str, projection_dim: int) -> ClapAudioConfig:
    _require(a, c, "enable_fusion", False, False)
    _require(a, c, "hidden_act", "gelu", "gelu")
    depths = _ints(a, c, "depths", (2, 2, 6, 2))
    heads = _ints(a, c, "num_attention_heads", (4, 8, 16, 32))
    if len(depths) != len(heads):
        raise ConfigError(f"{c}: depths {depths} and num_attention_heads {heads} differ in length")
    return ClapAudioConfig(
        num_mel_bins=_int(a, c, "num_mel_bins", 64),
        spec_size=_int(a, c, "spec_size", 256),  # an int: the reference divides it by num_mel_bins
        window_size=_int(a, c, "window_size", 8),  # an int: the reference halves it for the shift
        patch_size=_pair(a, c, "patch_size", 4),
        patch_stride=_pair(a, c, "patch_stride", (4, 4)),
        patch_embeds_hidden_size=_int(a, c, "patch_embeds_hidden_size", 96),
        depths=depths,
        num_heads=heads,
        hidden_size=_int(a, c, "hidden_size", 768),
        mlp_ratio=a.get("mlp_ratio", 4.0),
        qkv_bias=a.get("qkv_bias", True),
        layer_norm_eps=a.get("layer_norm_eps", 1e-5),
        enable_patch_layer_norm=a.get("enable_patch_layer_norm", True),
        flatten_patch_embeds=a.get("flatten_patch_embeds", True),
        patch_embed_input_channels=_int(a, c, "patch_embed_input_channels", 1),
        num_classes=_int(a, c, "num_classes", 527),
        projection_dim=projection_dim,
    )


def clap_audio_config(d: dict[str, Any]) -> ClapAudioConfig:
    """The audio branch of ``text_encoder/config.json`` as re-ranking runs it (only then is it read).

    ``audio.clap_features`` makes one-channel features (``truncation="rand_trunc"``); the four-channel
    ``"fusion"`` features are not implemented.
    """
    c = _where(d, "text_encoder", "ClapModel") + " audio_config"
    cfg = clap_config(d).audio
    _require(d.get("audio_config") or {}, c, "patch_embed_input_channels", 1, 1)
    htsat_stages(cfg, c)
    return cfg


def htsat_stages(cfg: ClapAudioConfig, where: str = "CLAP audio") -> list[tuple[int, int]]:
    """The token grid (H, W) of each Swin stage; raises for layouts the reference cannot run or we do not."""
    n = len(cfg.depths)
    if not cfg.flatten_patch_embeds:
        raise UnsupportedConfigError(f"{where}: flatten_patch_embeds=False is not supported")
    if cfg.spec_size % cfg.num_mel_bins:
        raise UnsupportedConfigError(
            f"{where}: spec_size {cfg.spec_size} is not a multiple of num_mel_bins {cfg.num_mel_bins}"
        )
    if cfg.hidden_size != cfg.patch_embeds_hidden_size * 2 ** (n - 1):
        raise UnsupportedConfigError(
            f"{where}: hidden_size {cfg.hidden_size} != patch_embeds_hidden_size * 2**{n - 1} "
            f"({cfg.patch_embeds_hidden_size * 2 ** (n - 1)}), the width of the last stage"
        )
    grid = (cfg.spec_size // cfg.patch_stride[0], cfg.spec_size // cfg.patch_stride[1])
    stages = [(grid[0] // 2**i, grid[1] // 2**i) for i in range(n)]
    for i, (h, w) in enumerate(stages):
        # The reference pads a grid that is not a multiple of the window; a smaller grid breaks its bias table.
        if min(h, w) < cfg.window_size or h % cfg.window_size or w % cfg.window_size:
            raise UnsupportedConfigError(
                f"{where}: stage {i} resolution {h}x{w} is not a multiple of window_size "
                f"{cfg.window_size} (spec_size {cfg.spec_size}, {n} stages)"
            )
    return stages


# ------------------------------------------------------------------------------------------------ T5


@dataclass(frozen=True)
class T5Config:
    vocab_size: int  # 32128
    d_model: int  # 1024 for Flan-T5-large
    d_kv: int  # per-head width (64); heads * d_kv need not equal d_model
    d_ff: int  # 2816
    num_layers: int  # encoder layers (24); the decoder is not in the file
    num_heads: int  # 16
    relative_attention_num_buckets: int  # 32
    relative_attention_max_distance: int  # 128
    layer_norm_epsilon: float  # 1e-6 (RMS norm)
    gated: bool  # True for "gated-gelu" (Flan-T5), False for T5 v1.0 "relu"


def t5_config(d: dict[str, Any]) -> T5Config:
    """Translate ``text_encoder_2/config.json`` (transformers ``T5Config``, used as ``T5EncoderModel``).

    ``feed_forward_proj`` is "ACT" or "gated-ACT"; transformers runs "gated-gelu" with ``gelu_new``.
    """
    c = _where(d, "text_encoder_2", "T5EncoderModel")
    _require(d, c, "model_type", "t5")
    ff = d.get("feed_forward_proj", "relu")
    if ff not in ("gated-gelu", "gated-gelu_new", "relu"):
        raise UnsupportedConfigError(
            f"{c}: feed_forward_proj={ff!r} is not supported ('gated-gelu', 'gated-gelu_new', 'relu')"
        )
    return T5Config(
        vocab_size=_int(d, c, "vocab_size", 32128),
        d_model=_aliased(d, "d_model", "hidden_size", 512),
        d_kv=_aliased(d, "d_kv", "head_dim", 64),
        d_ff=_int(d, c, "d_ff", 2048),
        num_layers=_aliased(d, "num_layers", "num_hidden_layers", 6),
        num_heads=_aliased(d, "num_heads", "num_attention_heads", 8),
        relative_attention_num_buckets=_int(d, c, "relative_attention_num_buckets", 32),
        relative_attention_max_distance=_int(d, c, "relative_attention_max_distance", 128),
        layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-6),
        gated=ff != "relu",  # gelu_new, whatever the file's dense_act_fn says (transformers overwrites it)
    )


# ------------------------------------------------------------------------------ VITS (speech checkpoints)


@dataclass(frozen=True)
class VitsConfig:
    """The text encoder of a transformers ``VitsModel`` (``text_encoder_2`` of the speech checkpoints)."""

    vocab_size: int  # 183 phoneme symbols (the pipeline writes id 182 as the end token)
    hidden_size: int  # 192
    num_layers: int  # 6 (hub ``num_hidden_layers``)
    num_heads: int  # 2 (hub ``num_attention_heads``)
    ffn_dim: int  # 768: width of the convolutional feed-forward
    ffn_kernel_size: int  # 3: its kernel along the phoneme axis
    window_size: int  # 4: relative positions -4..4 have their own key/value embedding, farther ones none
    use_bias: bool  # biases of q/k/v/out projections
    layer_norm_eps: float  # 1e-5


def vits_config(d: dict[str, Any]) -> VitsConfig:
    """Translate ``text_encoder_2/config.json`` of a speech checkpoint (transformers ``VitsConfig``).

    Only the text encoder is built; the rest of the VITS config (flow, duration predictor, HiFi-GAN) describes
    parts AudioLDM 2 never runs and is not read.
    """
    c = _where(d, "text_encoder_2", "VitsModel")
    _require(d, c, "model_type", "vits")
    _require(d, c, "hidden_act", "relu", "relu")
    window = d.get("window_size", 4)
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        # transformers also allows None (no relative positions); no AudioLDM 2 checkpoint uses it
        raise UnsupportedConfigError(f"{c}: window_size={window!r} is not supported (a positive int)")
    hidden, heads = d.get("hidden_size", 192), d.get("num_attention_heads", 2)
    if hidden % heads:
        raise ConfigError(f"{c}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    return VitsConfig(
        vocab_size=d.get("vocab_size", 38),
        hidden_size=hidden,
        num_layers=d.get("num_hidden_layers", 6),
        num_heads=heads,
        ffn_dim=d.get("ffn_dim", 768),
        ffn_kernel_size=d.get("ffn_kernel_size", 3),
        window_size=window,
        use_bias=d.get("use_bias", True),
        layer_norm_eps=d.get("layer_norm_eps", 1e-5),
    )


# --------------------------------------------------------------------------------------------- GPT-2


@dataclass(frozen=True)
class GPT2Config:
    n_embd: int  # 768: also the width of the projected conditioning sequence
    n_layer: int  # 12
    n_head: int  # 12
    n_inner: int  # feed-forward width; the hub's null means 4 * n_embd
    n_positions: int  # 1024 learned positions
    vocab_size: int  # 50257: the token embedding is in the file but generation never uses it
    layer_norm_epsilon: float  # 1e-5
    max_new_tokens: int  # 8 hidden states generated per prompt (AudioLDM 2's "LOA" length)


def gpt2_config(d: dict[str, Any]) -> GPT2Config:
    """Translate ``language_model/config.json`` (transformers ``GPT2Config``; ``hidden_size``,
    ``num_hidden_layers``, ``num_attention_heads`` and ``max_position_embeddings`` are aliases there)."""
    c = _where(d, "language_model", "GPT2Model")
    _require(d, c, "model_type", "gpt2")
    _require(d, c, "activation_function", "gelu_new", "gelu_new")
    _require(d, c, "scale_attn_weights", True, True)
    _require(d, c, "scale_attn_by_inverse_layer_idx", False, False)
    _require(d, c, "reorder_and_upcast_attn", False, False)
    _require(d, c, "add_cross_attention", False, False)
    n_embd = _aliased(d, "n_embd", "hidden_size", 768)
    n_head = _aliased(d, "n_head", "num_attention_heads", 12)
    if not (_is_int(n_embd) and _is_int(n_head)) or n_embd % n_head:
        raise ConfigError(f"{c}: n_embd {n_embd!r} is not a multiple of n_head {n_head!r}")
    n_inner = d.get("n_inner")
    return GPT2Config(
        n_embd=n_embd,
        n_layer=_aliased(d, "n_layer", "num_hidden_layers", 12),
        n_head=n_head,
        n_inner=4 * n_embd if n_inner is None else _int(d, c, "n_inner", None),
        n_positions=_aliased(d, "n_positions", "max_position_embeddings", 1024),
        vocab_size=_int(d, c, "vocab_size", 50257),
        layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
        # Not a GPT2Config field: the AudioLDM 2 conversion stores it there; diffusers defaults to 8.
        max_new_tokens=_int(d, c, "max_new_tokens", 8),
    )


# ---------------------------------------------------------------------------------------- projection


@dataclass(frozen=True)
class ProjectionConfig:
    text_encoder_dim: int  # 512: CLAP text embedding width
    text_encoder_1_dim: int  # 1024: T5 hidden width (192 for the VITS phoneme encoder of the TTS models)
    language_model_dim: int  # 768: GPT-2 width (hub key misspelled ``langauge_model_dim``)
    use_learned_position_embedding: bool  # TTS checkpoints add a learned position table to stream 2
    max_seq_length: int | None  # length of that table


def projection_config(d: dict[str, Any]) -> ProjectionConfig:
    """Translate ``projection_model/config.json`` (diffusers ``AudioLDM2ProjectionModel``)."""
    c = _where(d, "projection_model", "AudioLDM2ProjectionModel")
    learned = bool(d.get("use_learned_position_embedding") or False)
    max_len = d.get("max_seq_length")
    if learned and not max_len:
        raise ConfigError(f"{c}: use_learned_position_embedding needs max_seq_length")
    return ProjectionConfig(
        text_encoder_dim=_get(d, c, "text_encoder_dim"),
        text_encoder_1_dim=_get(d, c, "text_encoder_1_dim"),
        language_model_dim=_get(d, c, "langauge_model_dim"),
        use_learned_position_embedding=learned,
        max_seq_length=max_len if learned else None,
    )


# ---------------------------------------------------------------------------------------------- UNet

_DOWN_TYPES = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}
_UP_TYPES = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
_DEFAULT_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)  # diffusers' defaults
_DEFAULT_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3


@dataclass(frozen=True)
class UNetConfig:
    sample_size: int | None  # nominal latent height; informational
    in_channels: int  # 8 latent channels
    out_channels: int  # 8
    block_out_channels: tuple[int, ...]  # (128, 256, 384, 640)
    layers_per_block: tuple[int, ...]  # per block: resnets of the down block (its up block has one more)
    down_attn: tuple[bool, ...]  # per down block: has transformers ("CrossAttnDownBlock2D")
    up_attn: tuple[bool, ...]  # per up block, in up order
    cross_attention_dims: tuple[tuple[int | None, ...], ...]  # per block: one transformer per entry;
    #   None = self-attention only, 768 = attends GPT-2 states, 1024 = attends T5 states
    transformer_layers: tuple[int, ...]  # per block: BasicTransformerBlocks inside each Transformer2D
    num_heads: tuple[int, ...]  # per block (hub ``attention_head_dim``: a head count, not a width)
    norm_num_groups: int  # 32
    norm_eps: float  # 1e-5 for the resnets; transformers use their own 1e-6 GroupNorm
    flip_sin_to_cos: bool  # True: timestep embedding is [cos, sin]
    freq_shift: int  # 0
    downsample_padding: int  # 1
    mid_block_scale_factor: float  # 1

    def __post_init__(self) -> None:
        if isinstance(self.layers_per_block, int):  # one int for every block, as diffusers reads it
            object.__setattr__(
                self, "layers_per_block", (self.layers_per_block,) * len(self.block_out_channels)
            )

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]


# Options diffusers' AudioLDM 2 UNet has that we implement at their default only (num_attention_heads:
# diffusers itself refuses it, the misnomer above).
_UNET_DEFAULTS = {
    "act_fn": "silu", "time_embedding_type": "positional", "class_embed_type": None, "num_class_embeds": None,
    "class_embeddings_concat": False, "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "use_linear_projection": False, "upcast_attention": False, "resnet_time_scale_shift": "default",
    "num_attention_heads": None, "mid_block_type": "UNetMidBlock2DCrossAttn",
}  # fmt: skip


def unet_config(d: dict[str, Any]) -> UNetConfig:
    """Translate ``unet/config.json`` (diffusers ``AudioLDM2UNet2DConditionModel``).

    Per-block settings (``layers_per_block``, ``attention_head_dim``, ``transformer_layers_per_block``,
    ``cross_attention_dim``) are one value for every block or a list of one per block, as diffusers reads
    them; up block i takes the settings of down block n-1-i, the mid block those of the last.
    """
    c = _where(d, "unet", "AudioLDM2UNet2DConditionModel")
    for key, value in _UNET_DEFAULTS.items():
        _require(d, c, key, value, value)
    only = d.get("only_cross_attention", False)  # a bool, or one per block
    if only is not False and (only is True or any(only)):
        raise UnsupportedConfigError(f"{c}: only_cross_attention={only!r} is not supported (False)")
    blocks = _ints(d, c, "block_out_channels", (320, 640, 1280, 1280))
    n = len(blocks)
    down = _block_types(d, c, "down_block_types", _DOWN_TYPES, n, _DEFAULT_DOWN)
    up = _block_types(d, c, "up_block_types", _UP_TYPES, n, _DEFAULT_UP)
    sample_size = d.get("sample_size")
    if sample_size is not None and not _is_int(sample_size):
        # the pipeline's default length is sample_size * ...: diffusers' fails on a pair too
        raise UnsupportedConfigError(f"{c}: sample_size={sample_size!r} is not supported (an int)")
    return UNetConfig(
        sample_size=sample_size,
        in_channels=_int(d, c, "in_channels", 4),
        out_channels=_int(d, c, "out_channels", 4),
        block_out_channels=blocks,
        layers_per_block=_per_block(d, c, "layers_per_block", 2, n),
        down_attn=down,
        up_attn=up,
        cross_attention_dims=_cross_attention_dims(d, c, n, down, up),
        transformer_layers=_per_block(d, c, "transformer_layers_per_block", 1, n),
        num_heads=_per_block(d, c, "attention_head_dim", 8, n),
        norm_num_groups=_int(d, c, "norm_num_groups", 32),
        norm_eps=d.get("norm_eps", 1e-5),
        flip_sin_to_cos=d.get("flip_sin_to_cos", True),
        freq_shift=d.get("freq_shift", 0),
        downsample_padding=_int(d, c, "downsample_padding", 1),
        mid_block_scale_factor=d.get("mid_block_scale_factor", 1),
    )


def _block_name(t: Any) -> Any:
    """diffusers' block factories read "UNetResDownBlock2D" as "DownBlock2D"."""
    return t[7:] if isinstance(t, str) and t.startswith("UNetRes") else t


def _block_types(
    d: dict[str, Any], c: str, key: str, table: dict[str, bool], n: int, default: tuple[str, ...]
) -> tuple[bool, ...]:
    """Per block: has it transformers (a ``CrossAttn*`` block)?"""
    types = d.get(key, default)
    names = [_block_name(t) for t in types] if isinstance(types, (list, tuple)) else None
    if names is None or len(names) != n or any(t not in table for t in names):
        raise UnsupportedConfigError(
            f"{c}: {key}={types!r} is not supported "
            f"(need {n} entries from {sorted(table)} to match block_out_channels)"
        )
    return tuple(table[t] for t in names)


def _cross_attention_dims(
    d: dict[str, Any], c: str, n: int, down: tuple[bool, ...], up: tuple[bool, ...]
) -> tuple[tuple[int | None, ...], ...]:
    """``cross_attention_dim`` per block, each a tuple with one entry per transformer after a resnet.

    diffusers reads an int as that int for every block, a list as one entry per block, and each block's
    entry, an int or a list of up to 4 (None: a second self-attention), as its transformers' widths.
    """
    v = d.get("cross_attention_dim", 1280)
    per_block = [v] * n if _is_int(v) else v
    if not isinstance(per_block, (list, tuple)) or len(per_block) != n:
        raise ConfigError(
            f"{c}: cross_attention_dim={v!r} is neither an integer nor a list of {n} (one per block)"
        )
    dims = []
    for x in per_block:
        x = (x,) if _is_int(x) else x
        if not isinstance(x, (list, tuple)) or len(x) > 4 or not all(e is None or _is_int(e) for e in x):
            raise ConfigError(f"{c}: cross_attention_dim={v!r}: {x!r} is not an integer or a list of up to 4")
        dims.append(tuple(x))
    # Blocks with transformers, and the mid block (the last block's entry); the others ignore theirs.
    used = {dims[i] for i in range(n) if down[i]} | {dims[n - 1 - i] for i in range(n) if up[i]} | {dims[-1]}
    if len(used) != 1:
        # The pipeline pairs the i-th transformer of every block with the i-th condition stream.
        raise UnsupportedConfigError(f"{c}: cross_attention_dim differs between blocks: {v!r}")
    return tuple(dims)


# ----------------------------------------------------------------------------------------------- VAE


@dataclass(frozen=True)
class VAEConfig:
    latent_channels: int  # 8
    in_channels: int  # 1: the encoder's input, a log-mel spectrogram as a one-channel image
    out_channels: int  # 1: the decoder's output, the same
    block_out_channels: tuple[int, ...]  # (128, 256, 512); the decoder walks it in reverse
    layers_per_block: int  # 2 resnets per encoder block (the decoder's up blocks have one more)
    norm_num_groups: int  # 32
    scaling_factor: float  # latents are divided by it before decoding, multiplied after encoding
    mid_block_add_attention: bool  # True

    @property
    def scale_factor(self) -> int:
        """Mel frames and bins per latent cell (4 for three blocks)."""
        return 2 ** (len(self.block_out_channels) - 1)


def vae_config(d: dict[str, Any]) -> VAEConfig:
    """Translate ``vae/config.json`` (diffusers ``AutoencoderKL``): the decoder, and the encoder for audio input."""
    c = _where(d, "vae", "AutoencoderKL")
    _require(d, c, "act_fn", "silu", "silu")
    _require(d, c, "use_quant_conv", True, True)
    _require(d, c, "use_post_quant_conv", True, True)
    _require(d, c, "shift_factor", None)
    _require(d, c, "latents_mean", None)
    blocks = _ints(d, c, "block_out_channels", (64,))
    for key, kind in (("up_block_types", "UpDecoderBlock2D"), ("down_block_types", "DownEncoderBlock2D")):
        types = d.get(key, (kind,))
        if not isinstance(types, (list, tuple)) or [_block_name(t) for t in types] != [kind] * len(blocks):
            raise UnsupportedConfigError(f"{c}: {key}={types!r} is not supported ({len(blocks)} x {kind!r})")
    return VAEConfig(
        latent_channels=_int(d, c, "latent_channels", 4),
        in_channels=_int(d, c, "in_channels", 3),
        out_channels=_int(d, c, "out_channels", 3),
        block_out_channels=blocks,
        layers_per_block=_int(d, c, "layers_per_block", 1),  # an int: diffusers' Encoder/Decoder take no list
        norm_num_groups=_int(d, c, "norm_num_groups", 32),
        scaling_factor=d.get("scaling_factor", 0.18215),
        mid_block_add_attention=d.get("mid_block_add_attention", True),
    )


# ------------------------------------------------------------------------------------------- vocoder


@dataclass(frozen=True)
class VocoderConfig:
    model_in_dim: int  # 64 mel bins
    sampling_rate: int  # 16000
    upsample_initial_channel: int  # 1024
    upsample_rates: tuple[int, ...]  # product = hop length (160 samples per mel frame)
    upsample_kernel_sizes: tuple[int, ...]
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    leaky_relu_slope: float  # 0.1
    normalize_before: bool  # False for AudioLDM 2: the mean/scale buffers exist but are not applied

    @property
    def hop_length(self) -> int:
        h = 1
        for r in self.upsample_rates:
            h *= r
        return h


def vocoder_config(d: dict[str, Any]) -> VocoderConfig:
    """Translate ``vocoder/config.json`` (transformers ``SpeechT5HifiGan``)."""
    c = _where(d, "vocoder", "SpeechT5HifiGan")
    _require(d, c, "model_type", ("hifigan", "speecht5_hifigan"))
    rates = _ints(d, c, "upsample_rates", (4, 4, 4, 4))
    kernels = _ints(d, c, "upsample_kernel_sizes", (8, 8, 8, 8))
    rk = _ints(d, c, "resblock_kernel_sizes", (3, 7, 11))
    rd = d.get("resblock_dilation_sizes", ((1, 3, 5),) * 3)
    if not isinstance(rd, (list, tuple)) or not all(
        isinstance(x, (list, tuple)) and x and all(_is_int(e) for e in x) for x in rd
    ):
        raise ConfigError(f"{c}: resblock_dilation_sizes={rd!r} is not a list of lists of integers")
    # The reference pairs these lists with zip: extra kernels or dilations go unused, too few break it.
    if len(kernels) < len(rates):
        raise ConfigError(
            f"{c}: upsample_kernel_sizes {kernels} has fewer entries than upsample_rates {rates}"
        )
    if len(rd) < len(rk):
        raise ConfigError(f"{c}: resblock_dilation_sizes has fewer entries than resblock_kernel_sizes {rk}")
    return VocoderConfig(
        model_in_dim=_int(d, c, "model_in_dim", 80),
        sampling_rate=_int(d, c, "sampling_rate", 16000),
        upsample_initial_channel=_int(d, c, "upsample_initial_channel", 512),
        upsample_rates=rates,
        upsample_kernel_sizes=kernels[: len(rates)],
        resblock_kernel_sizes=rk,
        resblock_dilation_sizes=tuple(tuple(x) for x in rd[: len(rk)]),
        leaky_relu_slope=d.get("leaky_relu_slope", 0.1),
        normalize_before=d.get("normalize_before", True),
    )


# ----------------------------------------------------------------------------------------- scheduler


@dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int  # 1000
    beta_start: float  # 0.0015
    beta_end: float  # 0.0195
    beta_schedule: str  # "scaled_linear" (linear in sqrt(beta)) or "linear"
    prediction_type: str  # "epsilon" or "v_prediction"
    set_alpha_to_one: bool  # DDIM: alpha of the step "before" t=0 is 1 (True) or alphas_cumprod[0]
    steps_offset: int  # 1: added to "leading" timesteps
    timestep_spacing: str  # "leading" (the hub's), "trailing" or "linspace"


def scheduler_config(d: dict[str, Any]) -> SchedulerConfig:
    """Translate ``scheduler/scheduler_config.json`` (diffusers ``DDIMScheduler``).

    The DPM-Solver++ sampler reads the same fields, as ``DPMSolverMultistepScheduler.from_config`` does.
    """
    c = _where(d, "scheduler", d.get("_class_name"))
    _require(d, c, "clip_sample", False, True)
    _require(d, c, "thresholding", False, False)
    _require(d, c, "rescale_betas_zero_snr", False, False)
    _require(d, c, "trained_betas", None)
    _require(d, c, "beta_schedule", ("scaled_linear", "linear"), "linear")
    _require(d, c, "prediction_type", ("epsilon", "v_prediction"), "epsilon")
    _require(d, c, "timestep_spacing", ("leading", "trailing", "linspace"), "leading")
    return SchedulerConfig(
        num_train_timesteps=d.get("num_train_timesteps", 1000),
        beta_start=d.get("beta_start", 0.0001),
        beta_end=d.get("beta_end", 0.02),
        beta_schedule=d.get("beta_schedule", "linear"),
        prediction_type=d.get("prediction_type", "epsilon"),
        set_alpha_to_one=d.get("set_alpha_to_one", True),
        steps_offset=d.get("steps_offset", 0),
        timestep_spacing=d.get("timestep_spacing", "leading"),
    )


# --------------------------------------------------------------------------------- feature extractor


@dataclass(frozen=True)
class FeatureExtractorConfig:
    """CLAP audio front end (transformers ``ClapFeatureExtractor``), used only for re-ranking."""

    sampling_rate: int  # 48000: CLAP hears 48 kHz audio; generated 16 kHz audio is resampled
    feature_size: int  # 64 mel bins
    fft_window_size: int  # 1024
    hop_length: int  # 480
    frequency_min: float  # 50
    frequency_max: float  # 14000
    max_length_s: int  # 10: longer audio is cropped, shorter repeated then padded
    padding: str  # "repeatpad"
    truncation: str  # "rand_trunc" on the hub; see audio.py for the deterministic choice we make

    @property
    def nb_max_samples(self) -> int:
        return self.max_length_s * self.sampling_rate


def feature_extractor_config(d: dict[str, Any]) -> FeatureExtractorConfig:
    """Translate ``feature_extractor/preprocessor_config.json``."""
    c = _where(d, "feature_extractor", "ClapFeatureExtractor")
    _require(d, c, "feature_extractor_type", "ClapFeatureExtractor", "ClapFeatureExtractor")
    _require(d, c, "padding", ("repeatpad", "repeat", "pad"), "repeatpad")
    _require(d, c, "truncation", ("rand_trunc",), "fusion")
    _require(d, c, "top_db", None)
    return FeatureExtractorConfig(
        sampling_rate=d.get("sampling_rate", 48000),
        feature_size=d.get("feature_size", 64),
        fft_window_size=d.get("fft_window_size", 1024),
        hop_length=d.get("hop_length", 480),
        frequency_min=d.get("frequency_min", 0),
        frequency_max=d.get("frequency_max", 14000),
        max_length_s=d.get("max_length_s", 10),
        padding=d.get("padding", "repeatpad"),
        truncation=d.get("truncation", "fusion"),
    )
