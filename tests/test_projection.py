"""Projection model parity with diffusers' AudioLDM2ProjectionModel (text-to-audio and TTS layouts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from audioldm2_core.errors import CheckpointError
from audioldm2_core.loading import open_checkpoint
from audioldm2_core.projection import load_projection
from tests.checkpoints import edit_weights, perturb, write_component
from tests.helpers import rel_err

HUB = Path(__file__).parents[1] / "weights_tools/hub_configs"
SIZES = {
    # the brief's tiny size (CLAP 16, T5 48 -> GPT-2 32), another width, and the TTS layout (learned
    # position table on the second stream, which must then be exactly max_seq_length long)
    "tiny": dict(text_encoder_dim=16, text_encoder_1_dim=48, langauge_model_dim=32),
    "other": dict(text_encoder_dim=24, text_encoder_1_dim=20, langauge_model_dim=40),
    "tts": dict(
        text_encoder_dim=16,
        text_encoder_1_dim=12,
        langauge_model_dim=32,
        use_learned_position_embedding=True,
        max_seq_length=14,
    ),
}


def build_reference(config: dict, seed: int):
    from diffusers.pipelines.audioldm2.modeling_audioldm2 import AudioLDM2ProjectionModel

    torch.manual_seed(seed)
    ref = AudioLDM2ProjectionModel(**config)
    if "max_seq_length" in config:  # initialised to zeros; make it matter
        with torch.no_grad():
            ref.learnable_positional_embedding.normal_()
    return perturb(ref, seed + 1)


@pytest.fixture(scope="module", params=list(SIZES))
def ckpt(request, tmp_path_factory):
    config = SIZES[request.param]
    ref = build_reference(config, seed=len(request.param))
    root = write_component(tmp_path_factory.mktemp(f"proj_{request.param}"), "projection_model", ref)
    return ref, root, config


def inputs(config: dict, batch: int, seed: int, float_mask_1: bool = False):
    """As the pipeline builds them: CLAP (B, 1, C1) with a mask of ones, T5 (B, L2, C2) right-padded."""
    g = torch.Generator().manual_seed(seed)
    length = config.get("max_seq_length") or 11
    clap = torch.randn(batch, 1, config["text_encoder_dim"], generator=g)
    t5 = torch.randn(batch, length, config["text_encoder_1_dim"], generator=g)
    mask = torch.ones(batch, 1, dtype=torch.long)
    mask_1 = torch.ones(batch, length, dtype=torch.long)
    for b in range(1, batch):
        mask_1[b, length - 3 * b :] = 0
    if float_mask_1:  # the TTS pipeline's negative branch passes float zeros
        mask_1 = torch.zeros(batch, length)
    return clap, t5, mask, mask_1


def reference(ref, clap, t5, mask, mask_1):
    out = ref(hidden_states=clap, hidden_states_1=t5, attention_mask=mask, attention_mask_1=mask_1)
    return out.hidden_states, out.attention_mask


@pytest.mark.parametrize("batch", [1, 3])
def test_matches_reference(ckpt, batch: int):
    ref, root, config = ckpt
    model = load_projection(open_checkpoint(root))
    args = inputs(config, batch, seed=batch)
    with torch.no_grad():
        (want, want_mask), (got, got_mask) = reference(ref, *args), model(*args)
    L2 = args[1].shape[1]
    assert got.shape == want.shape == (batch, 1 + L2 + 4, config["langauge_model_dim"])
    assert rel_err(got, want) <= 1e-5
    assert got_mask.dtype == want_mask.dtype and torch.equal(got_mask, want_mask)
    assert got_mask[:, [0, 2, 3, -1]].eq(1).all()  # the four framing vectors are valid


def test_float_mask_promotes_like_the_reference(ckpt):
    ref, root, config = ckpt
    model = load_projection(open_checkpoint(root))
    args = inputs(config, 2, seed=0, float_mask_1=True)
    with torch.no_grad():
        (_, want_mask), (_, got_mask) = reference(ref, *args), model(*args)
    assert got_mask.dtype == want_mask.dtype == torch.float32 and torch.equal(got_mask, want_mask)


def test_learned_table_needs_its_length(tmp_path):
    config = SIZES["tts"]  # only the TTS layout has a position table
    root = write_component(tmp_path, "projection_model", build_reference(config, seed=3))
    model = load_projection(open_checkpoint(root))
    clap, t5, mask, mask_1 = inputs(config, 1, seed=0)
    with pytest.raises(ValueError, match="exactly 14"):
        model(clap, t5[:, :-1], mask, mask_1[:, :-1])


def test_missing_key_is_named(ckpt, tmp_path):
    root = edit_weights(ckpt[1], tmp_path / "c", "projection_model", lambda s: s.pop("eos_embed_1"))
    with pytest.raises(CheckpointError, match=r"missing keys: eos_embed_1"):
        load_projection(open_checkpoint(root))


def test_position_table_without_config_is_unexpected(tmp_path):
    ref = build_reference(SIZES["tts"], seed=0)
    root = write_component(tmp_path / "c", "projection_model", ref)
    config = json.loads((root / "projection_model/config.json").read_text())
    config.pop("use_learned_position_embedding")
    (root / "projection_model/config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"unexpected keys: learnable_positional_embedding"):
        load_projection(open_checkpoint(root))


def test_misshaped_key_is_named(ckpt, tmp_path):
    def edit(s):
        s["projection_1.weight"] = s["projection_1.weight"][:, :-1].contiguous()

    root = edit_weights(ckpt[1], tmp_path / "c", "projection_model", edit)
    with pytest.raises(CheckpointError, match=r"mis-shaped keys: projection_1\.weight"):
        load_projection(open_checkpoint(root))


def test_tiny_checkpoint_fixture(tiny_base):
    root = tiny_base
    from diffusers.pipelines.audioldm2.modeling_audioldm2 import AudioLDM2ProjectionModel

    ref = AudioLDM2ProjectionModel.from_pretrained(root / "projection_model").eval()
    model = load_projection(open_checkpoint(root))
    args = inputs(dict(ref.config), 3, seed=5)
    with torch.no_grad():
        (want, want_mask), (got, got_mask) = reference(ref, *args), model(*args)
    assert rel_err(got, want) <= 1e-5 and torch.equal(got_mask, want_mask)


@pytest.mark.slow
@pytest.mark.parametrize("repo", ["cvssp__audioldm2", "anhnct__audioldm2_gigaspeech"])
def test_real_size_random_weights(tmp_path, repo: str):
    hub = json.loads((HUB / repo / "projection_model/config.json").read_text())
    config = {k: v for k, v in hub.items() if not k.startswith("_")}
    ref = build_reference(config, seed=0)
    root = write_component(tmp_path, "projection_model", ref)
    model = load_projection(open_checkpoint(root))
    args = inputs(config, 2, seed=0)
    with torch.no_grad():
        (want, want_mask), (got, got_mask) = reference(ref, *args), model(*args)
    err = rel_err(got, want)
    print(f"projection real size ({repo}): rel err {err:.3e}")
    assert err <= 1e-5 and torch.equal(got_mask, want_mask)
