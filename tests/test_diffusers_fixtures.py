"""diffusers' own AudioLDM 2 fast-test fixture (``tests/diffusers_fixtures.py``), saved in the hub layout: this
stack loads it strictly and matches diffusers' pipeline on the cases of that test file that apply, and each
component matches the reference module.

Their cases, and how they apply here:
- ``test_audioldm2_ddim``, ``test_audioldm2_audio_length_in_s`` (0.016 s, 0.032 s): as written;
- ``test_audioldm2_negative_prompt``, ``test_audioldm2_num_waveforms_per_prompt``: they swap in
  ``PNDMScheduler(skip_prk_steps=True)`` at 2 steps, which no sampler here is (PNDM with its Runge-Kutta
  warm-up needs 4 steps): the folder's DDIM runs them;
- several waveforms per prompt: re-ranking is off on both sides, since the reference cannot re-rank with the
  main fixture's CLAP (its audio branch breaks) and this stack refuses the fixture's ``truncation="fusion"``
  (the refusal is tested below); the candidates are compared in generation order;
- ``test_audioldm2_vocoder_model_in_dim``: the folder with the wider vocoder.
"""

from __future__ import annotations

import json

import pytest
import torch

from audioldm2_core import AudioLDM2, clap_audio
from audioldm2_core.config import clap_config, htsat_stages
from audioldm2_core.errors import UnsupportedConfigError
from audioldm2_core.loading import open_checkpoint
from tests import diffusers_fixtures as fx
from tests.checkpoints import TensorReadSpy
from tests.helpers import rel_err
from tests.oracle import reference_pipeline, run_reference

PROMPT = "A hammer hitting a wooden surface"  # their get_dummy_inputs
WAVE_TOL, MODULE_TOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """version -> {"int": the folder as saved, "pair": patch_stride edited to a pair, "vocoder": wider}."""
    root = tmp_path_factory.mktemp("diffusers_fixtures")
    out = {}
    for version in fx.VERSIONS:
        saved = fx.save_fixture(root / version, version)
        out[version] = {
            "int": saved,
            "pair": fx.with_patch_stride_pair(saved, root / f"{version}-pair"),
            "vocoder": fx.with_wider_vocoder(saved, root / f"{version}-vocoder"),
        }
    return out


@pytest.fixture(scope="module")
def pipes(folders):
    """(version, folder kind) -> this stack's pipeline, loaded once."""
    loaded = {}

    def get(version: str, kind: str = "int") -> AudioLDM2:
        if (version, kind) not in loaded:
            loaded[version, kind] = AudioLDM2.from_pretrained(folders[version][kind])
        return loaded[version, kind]

    return get


@pytest.fixture
def no_reference_rerank(monkeypatch):
    """The reference pipeline of a folder with its CLAP re-ranking replaced by the identity."""

    def get(folder):
        pipe = reference_pipeline(str(folder))
        monkeypatch.setattr(pipe, "score_waveforms", lambda text, audio, **kw: audio)
        return folder

    return get


def ours(pipe: AudioLDM2, prompt, **kw) -> torch.Tensor:
    return pipe(prompt, generator=torch.Generator().manual_seed(0), output_type="pt", **kw).audios


# ------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("version", fx.VERSIONS)
def test_patch_stride_reads_as_an_int_or_a_pair(folders, version):
    configs = [
        json.loads((folders[version][k] / "text_encoder/config.json").read_text()) for k in ("int", "pair")
    ]
    assert [c["audio_config"]["patch_stride"] for c in configs] == [2, [2, 2]]
    assert [clap_config(c).audio.patch_stride for c in configs] == [(2, 2), (2, 2)]
    assert [clap_config(c).audio.patch_size for c in configs] == [(2, 2), (2, 2)]


@pytest.mark.parametrize("version", fx.VERSIONS)
def test_both_folders_load_strictly_and_agree(pipes, version):
    kw = dict(num_inference_steps=2, guidance_scale=6.0)
    a, b = ours(pipes(version, "int"), PROMPT, **kw), ours(pipes(version, "pair"), PROMPT, **kw)
    assert a.shape == (1, 256) and torch.equal(a, b)


def test_language_model_saved_with_its_head_loads_too(pipes, folders, tmp_path):
    """main's pipeline as their test builds it (a GPT2LMHeadModel, for transformers 5), saved as it is."""
    folder = fx.save_fixture(tmp_path / "main-head", "main", hub_layout=False)
    assert json.loads((folder / "model_index.json").read_text())["language_model"][1] == "GPT2LMHeadModel"
    kw = dict(num_inference_steps=2, guidance_scale=6.0)
    assert torch.equal(
        ours(AudioLDM2.from_pretrained(folder), PROMPT, **kw), ours(pipes("main"), PROMPT, **kw)
    )


def test_unet_config_forms(folders):
    main = open_checkpoint(folders["main"]["int"]).config("unet")
    v029 = open_checkpoint(folders["v0.29"]["int"]).config("unet")
    from audioldm2_core.config import unet_config

    # main: one int per block (the first block has no transformers and ignores its 8)
    assert main["cross_attention_dim"] == [8, 16]
    assert unet_config(main).cross_attention_dims == ((8,), (16,))
    assert unet_config(main).layers_per_block == (1, 1) and unet_config(main).num_heads == (8, 8)
    assert unet_config(v029).cross_attention_dims == ((None, 16, 32),) * 2


@pytest.mark.parametrize("version", fx.VERSIONS)
def test_reranking_refuses_fusion_features_by_name(pipes, folders, version):
    with pytest.raises(UnsupportedConfigError) as e:
        ours(pipes(version), PROMPT, num_inference_steps=1, num_waveforms_per_prompt=2)
    line = str(e.value)
    assert "truncation='fusion'" in line and str(folders[version]["int"] / "feature_extractor") in line


@pytest.mark.parametrize("version", fx.VERSIONS)
def test_audio_branch_refused_from_the_config_before_any_weight(folders, version, monkeypatch):
    spy = TensorReadSpy(monkeypatch)
    with pytest.raises(UnsupportedConfigError) as e:
        clap_audio.load_clap_audio(open_checkpoint(folders[version]["int"]))
    line = str(e.value)
    assert "patch_embed_input_channels=4" in line and "text_encoder/config.json" in line
    assert spy.read == [] and e.traceback[-1].name == "_require"  # the config function, not a shape error


def test_cli_runs_the_issue_command(folders, tmp_path):
    """``audioldm2 "a dog" --model ./dummy -o x.wav --steps 2``: the command issue 35 found failing."""
    import soundfile as sf

    from audioldm2_core import cli

    out = tmp_path / "x.wav"
    assert (
        cli.main(
            ["a dog", "--model", str(folders["v0.29"]["int"]), "-o", str(out), "--steps", "2", "--quiet"]
        )
        == 0
    )
    assert sf.info(str(out)).samplerate == 16000


# ---------------------------------------------------------------------------------------- end to end

CASES = {
    "ddim": dict(num_inference_steps=2, guidance_scale=6.0),
    "negative": dict(num_inference_steps=2, guidance_scale=6.0, negative_prompt="egg cracking"),
    "length-0.016": dict(num_inference_steps=2, guidance_scale=6.0, audio_length_in_s=0.016),
    "length-0.032": dict(num_inference_steps=2, guidance_scale=6.0, audio_length_in_s=0.032),
}
LENGTHS = {"ddim": 256, "negative": 256, "length-0.016": 256, "length-0.032": 512}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("version", fx.VERSIONS)
def test_matches_diffusers(pipes, folders, version, case):
    folder, kw = folders[version]["int"], CASES[case]
    got = ours(pipes(version), PROMPT, **kw)
    want = run_reference(folder, PROMPT, seed=0, **kw)
    assert got.shape == want["audio"].shape == (1, LENGTHS[case])
    assert rel_err(got, want["audio"]) <= WAVE_TOL
    if case == "ddim":  # the latents too: the fixture's vocoder (std 0.01 init) makes a faint waveform
        latents = pipes(version)(
            PROMPT, generator=torch.Generator().manual_seed(0), output_type="latent", **kw
        )
        assert rel_err(latents.audios, want["latents"]) <= WAVE_TOL


@pytest.mark.parametrize("waveforms", [1, 2])
@pytest.mark.parametrize("version", fx.VERSIONS)
def test_waveforms_per_prompt(pipes, folders, no_reference_rerank, version, waveforms):
    folder = no_reference_rerank(folders[version]["int"])
    kw = dict(num_inference_steps=2, num_waveforms_per_prompt=waveforms)
    got = ours(pipes(version), [PROMPT] * 2, rerank=False, **kw)
    want = run_reference(folder, [PROMPT] * 2, seed=0, **kw)["audio"]
    assert got.shape == want.shape == (2 * waveforms, 256)
    assert rel_err(got, want) <= WAVE_TOL


@pytest.mark.parametrize("version", fx.VERSIONS)
def test_vocoder_with_twice_the_mel_bins(pipes, folders, version):
    folder = folders[version]["vocoder"]
    got = ours(pipes(version, "vocoder"), ["hey"], num_inference_steps=1)
    want = run_reference(folder, ["hey"], seed=0, num_inference_steps=1)["audio"]
    assert got.shape == want.shape == (1, 256)  # the same length: twice the mel bins, not the frames
    assert rel_err(got, want) <= WAVE_TOL


# ------------------------------------------------------------------------------------- per component


def _text_inputs(pipe: AudioLDM2):
    prompts = [PROMPT, "egg cracking"]
    return pipe.tokenizer(prompts), pipe.tokenizer_2(prompts)


@pytest.mark.parametrize("version", fx.VERSIONS)
def test_text_side_matches_reference_modules(pipes, folders, version):
    from diffusers import AudioLDM2Pipeline

    ref, pipe = reference_pipeline(str(folders[version]["int"])), pipes(version)
    clap_tokens, t5_tokens = _text_inputs(pipe)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        clap = pipe.text_encoder(clap_tokens.input_ids, clap_tokens.attention_mask)
        want = ref.text_encoder.get_text_features(
            clap_tokens.input_ids, attention_mask=clap_tokens.attention_mask
        )
        assert rel_err(clap, want.pooler_output) <= MODULE_TOL
        t5 = pipe.text_encoder_2(t5_tokens.input_ids, t5_tokens.attention_mask)
        want = ref.text_encoder_2(input_ids=t5_tokens.input_ids, attention_mask=t5_tokens.attention_mask)
        assert rel_err(t5, want.last_hidden_state) <= MODULE_TOL
        clap_states, t5_states = torch.randn(2, 1, 16, generator=g), torch.randn(*t5.shape, generator=g)
        ones, mask_1 = torch.ones(2, 1, dtype=torch.long), t5_tokens.attention_mask
        seq, mask = pipe.projection_model(clap_states, t5_states, ones, mask_1)
        want = ref.projection_model(
            hidden_states=clap_states, hidden_states_1=t5_states, attention_mask=ones, attention_mask_1=mask_1
        )
        assert rel_err(seq, want.hidden_states) <= MODULE_TOL and torch.equal(mask, want.attention_mask)
        from audioldm2_core.gpt2 import generate

        got = generate(pipe.language_model, seq, mask, 8)
        want = AudioLDM2Pipeline.generate_language_model(ref, seq, attention_mask=mask, max_new_tokens=8)
        assert got.shape == (2, 8, 16) and rel_err(got, want) <= MODULE_TOL


@pytest.mark.parametrize("version", fx.VERSIONS)
def test_unet_vae_vocoder_match_reference_modules(pipes, folders, version):
    ref, pipe = reference_pipeline(str(folders[version]["int"])), pipes(version)
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 4, 16, 4, generator=g), torch.tensor(500)
    states, states_1 = torch.randn(2, 8, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    mask_1 = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        got = pipe.unet(x, t, states, states_1, mask_1)
        want = ref.unet(
            x,
            t,
            encoder_hidden_states=states,
            encoder_hidden_states_1=states_1,
            encoder_attention_mask_1=mask_1,
        ).sample
        assert rel_err(got, want) <= MODULE_TOL
        got = pipe.vae.decode(x)
        want = ref.vae.decode(1 / ref.vae.config.scaling_factor * x).sample
        assert got.shape == (2, 1, 32, 8) and rel_err(got, want) <= MODULE_TOL
        mel = torch.randn(2, 20, 8, generator=g)
        assert rel_err(pipe.vocoder(mel), ref.vocoder(mel)) <= MODULE_TOL


def test_clap_audio_matches_reference_module(folders, monkeypatch):
    """The v0.29 audio branch (four input channels, patch_stride 2), loaded strictly past the re-ranking
    refusal of four-channel features."""
    folder = folders["v0.29"]["int"]
    monkeypatch.setattr(clap_audio, "clap_audio_config", lambda d: clap_config(d).audio)
    model = clap_audio.load_clap_audio(open_checkpoint(folder))
    ref = reference_pipeline(str(folder)).text_encoder
    x = 10 * torch.randn(2, 4, 61, 64, generator=torch.Generator().manual_seed(3)) - 40
    with torch.no_grad():
        want, got = ref.get_audio_features(input_features=x).pooler_output, model(x)
    assert rel_err(got, want) <= MODULE_TOL


def test_main_audio_branch_is_one_neither_side_runs(folders):
    """main's CLAP audio (spec 8, stride 2, window 4): stage 2 is 2x2, smaller than the window, which breaks
    the reference's bias table; the config refuses it here."""
    folder = folders["main"]["int"]
    cfg = clap_config(open_checkpoint(folder).config("text_encoder")).audio
    with pytest.raises(UnsupportedConfigError, match=r"stage 1 resolution 2x2 .* window_size 4"):
        htsat_stages(cfg)
    ref = reference_pipeline(str(folder)).text_encoder
    with torch.no_grad(), pytest.raises(RuntimeError):
        ref.get_audio_features(input_features=torch.zeros(1, 4, 8, 8))
