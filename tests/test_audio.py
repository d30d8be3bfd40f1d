"""CLAP audio front end: resampling against librosa.resample (its default, soxr_hq) and log-mel features
against transformers' ClapFeatureExtractor, for shorter, exactly-10-s and longer audio."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from audioldm2_core.audio import clap_features, mel_filter_bank, resample
from audioldm2_core.config import feature_extractor_config
from tests.helpers import rel_err

HUB_FE = Path(__file__).parents[1] / "weights_tools/hub_configs/cvssp__audioldm2/feature_extractor"


def hub_dict(**changes) -> dict:
    return {**json.loads((HUB_FE / "preprocessor_config.json").read_text()), **changes}


def reference_extractor(d: dict):
    from transformers import ClapFeatureExtractor

    return ClapFeatureExtractor(**{k: v for k, v in d.items() if k != "feature_extractor_type"})


def noise(shape, seed: int, scale: float = 0.3) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("length", [16000, 12347])
def test_resample_equals_librosa_default(length: int):
    import librosa

    audio = noise((3, length), seed=length)
    want = librosa.resample(audio, orig_sr=16000, target_sr=48000)  # what score_waveforms calls
    got = resample(torch.from_numpy(audio), 16000, 48000)
    assert got.dtype == torch.float32 and got.shape == want.shape == (3, int(np.ceil(3 * length)))
    np.testing.assert_array_equal(got.numpy(), want)
    np.testing.assert_array_equal(resample(audio[1], 16000, 48000).numpy(), want[1])  # unbatched


def test_mel_filters_equal_the_reference_slaney_bank():
    d = hub_dict()
    assert (
        rel_err(mel_filter_bank(feature_extractor_config(d)), reference_extractor(d).mel_filters_slaney)
        <= 1e-12
    )


def _reference_features(d: dict, audio: np.ndarray, offset: int = 0) -> torch.Tensor:
    """The reference extractor as score_waveforms calls it, with rand_trunc's random offset pinned."""
    with mock.patch("numpy.random.randint", return_value=offset) as draw:
        out = reference_extractor(d)(list(audio), return_tensors="pt", sampling_rate=48000).input_features
    overflow = audio.shape[-1] - 480000
    if overflow > 0:  # the reference did draw a crop offset, uniformly from [0, overflow]
        assert draw.call_args.args == (0, overflow + 1)
    return out


@pytest.mark.parametrize(
    "seconds", [0.3, 3.7, 10.0, 10.37], ids=["short", "repeatpad", "exactly-10s", "longer"]
)
def test_features_match_reference_extractor(seconds: float):
    d = hub_dict()
    audio = noise((2, round(seconds * 48000)), seed=int(seconds * 100))
    want = _reference_features(d, audio)  # longer: the reference's crop at offset 0 is our deterministic one
    got = clap_features(torch.from_numpy(audio), feature_extractor_config(d))
    assert got.dtype == want.dtype == torch.float32
    assert got.shape == want.shape == (2, 1, 1001, 64)
    assert rel_err(got, want) <= 1e-4


def test_longer_audio_is_its_first_ten_seconds():
    """Our crop is the reference's features of the pre-cropped first 10 s, whatever its own draw would be."""
    d = hub_dict()
    audio = noise((1, 480000 + 4321), seed=5)
    want = _reference_features(d, audio[:, :480000])
    got = clap_features(audio, feature_extractor_config(d))
    assert rel_err(got, want) <= 1e-4
    # and not another crop: the reference at a different offset gives different features
    assert rel_err(_reference_features(d, audio, offset=4321), want) > 1e-2


@pytest.mark.parametrize("padding", ["repeat", "pad"])
def test_other_padding_modes(padding: str):
    d = hub_dict(padding=padding)
    audio = noise((1, 70001), seed=9)
    want = _reference_features(d, audio)
    assert rel_err(clap_features(audio, feature_extractor_config(d)), want) <= 1e-4


def test_silence_hits_the_floor_like_the_reference():
    d = hub_dict()
    audio = np.zeros((1, 48000), dtype=np.float32)
    got = clap_features(audio, feature_extractor_config(d))
    assert torch.equal(got, _reference_features(d, audio))  # all -100 dB
    with pytest.raises(ValueError, match="empty"):
        clap_features(np.zeros((1, 0), dtype=np.float32), feature_extractor_config(d))
