"""VITS phoneme encoder parity with transformers' ``VitsModel.text_encoder``; strict loading of the whole file."""

from __future__ import annotations

import pytest
import torch

from audioldm2_core.config import vits_config
from audioldm2_core.errors import UnsupportedConfigError, WeightsError
from audioldm2_core.loading import open_checkpoint
from audioldm2_core.vits import load_vits
from tests.checkpoints import edit_weights, perturb, write_component
from tests.helpers import rel_err
from weights_tools.make_tiny import TINY_VITS

SIZES = {
    "tiny": {},  # the tiny checkpoints' VITS: window 4, kernel 3
    # longer window than some inputs, an even kernel (asymmetric "same" padding), three heads, no biases
    "other": dict(hidden_size=30, num_attention_heads=3, window_size=7, ffn_kernel_size=4, use_bias=False),
}


@pytest.fixture(scope="module", params=list(SIZES))
def ckpt(request, tmp_path_factory):
    from transformers import VitsConfig, VitsModel

    torch.manual_seed(len(request.param))
    ref = perturb(VitsModel(VitsConfig(**(TINY_VITS | SIZES[request.param]))), 3)
    return ref, write_component(tmp_path_factory.mktemp(f"vits_{request.param}"), "text_encoder_2", ref)


def phonemes(batch: int, length: int, seed: int, vocab: int = 183) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths, right-padded with 0 (row 0 unpadded, the last one a single token)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(1, batch):
        n = max(1, length - 7 * b) if b < batch - 1 else 1
        ids[b, n:], mask[b, n:] = 0, 0
    return ids, mask


@pytest.mark.parametrize("length", [1, 3, 12, 40])  # shorter than, about, and much longer than the window
def test_parity(ckpt, length):
    ref, root = ckpt
    ours = load_vits(open_checkpoint(root))
    ids, mask = phonemes(3, length, seed=length)
    with torch.no_grad():
        want = ref.text_encoder(ids, attention_mask=mask, padding_mask=mask.unsqueeze(-1)).last_hidden_state
        got = ours(ids, mask)
    assert got.shape == want.shape == (3, length, ref.config.hidden_size)
    assert rel_err(got, want) <= 1e-5
    assert (got[mask == 0] == 0).all()


def test_reads_only_the_text_encoder(ckpt, monkeypatch):
    from tests.checkpoints import TensorReadSpy

    _, root = ckpt
    spy = TensorReadSpy(monkeypatch)
    model = load_vits(open_checkpoint(root))
    assert set(spy.read) == {"text_encoder." + k for k in model.text_encoder.state_dict()}
    assert any(k.startswith("flow.") for k in spy.listed) and any(
        k.startswith("decoder.") for k in spy.listed
    )
    assert not any(k.startswith("text_encoder.project.") for k in spy.read)


def test_stray_and_missing_keys_are_errors(ckpt, tmp_path):
    _, root = ckpt

    def add_stray(state):
        state["vocoder_head.weight"] = torch.zeros(2)

    bad = edit_weights(root, tmp_path / "stray", "text_encoder_2", add_stray)
    with pytest.raises(WeightsError, match="keys of no known part.*vocoder_head.weight"):
        load_vits(open_checkpoint(bad))

    def drop_flow(state):
        for k in [k for k in state if k.startswith("flow.")]:
            del state[k]

    bad = edit_weights(root, tmp_path / "noflow", "text_encoder_2", drop_flow)
    with pytest.raises(WeightsError, match=r"parts missing: \['flow.'\]"):
        load_vits(open_checkpoint(bad))

    def drop_layer_norm(state):
        del state["text_encoder.encoder.layers.0.layer_norm.weight"]

    bad = edit_weights(root, tmp_path / "missing", "text_encoder_2", drop_layer_norm)
    with pytest.raises(WeightsError, match="missing keys: text_encoder.encoder.layers.0.layer_norm.weight"):
        load_vits(open_checkpoint(bad))


def test_config_translation():
    from weights_tools.make_tiny import hub_config

    cfg = vits_config(hub_config("anhnct/audioldm2_gigaspeech", "text_encoder_2"))
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads) == (183, 192, 6, 2)
    assert (cfg.ffn_dim, cfg.ffn_kernel_size, cfg.window_size, cfg.use_bias) == (768, 3, 4, True)
    with pytest.raises(UnsupportedConfigError, match="hidden_act='gelu'"):
        vits_config({"model_type": "vits", "hidden_act": "gelu"})
    with pytest.raises(UnsupportedConfigError, match="window_size=None"):
        vits_config({"model_type": "vits", "window_size": None})


def test_pickled_file_as_on_the_hub(ckpt, tmp_path):
    """The anhnct/* repos hold ``pytorch_model.bin`` only: the same tensors from a pickle, the same output."""
    import shutil

    from safetensors.torch import load_file

    ref, root = ckpt
    copy = tmp_path / "bin"
    shutil.copytree(root, copy)
    folder = copy / "text_encoder_2"
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    ids, mask = phonemes(2, 9, seed=5)
    with torch.no_grad():
        want = ref.text_encoder(ids, attention_mask=mask, padding_mask=mask.unsqueeze(-1)).last_hidden_state
        assert rel_err(load_vits(open_checkpoint(copy))(ids, mask), want) <= 1e-5
