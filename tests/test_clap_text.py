"""CLAP text encoder parity with transformers' ClapModel.get_text_features, and its key selection."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from audioldm2_core.clap_text import load_clap_text, roberta_position_ids
from audioldm2_core.errors import CheckpointError
from audioldm2_core.loading import open_checkpoint
from tests.checkpoints import TensorReadSpy, edit_weights, perturb, write_component
from tests.helpers import rel_err

HUB = Path(__file__).parents[1] / "weights_tools/hub_configs/cvssp__audioldm2/text_encoder/config.json"
# A small HTSAT audio tower: present in the file, never read by the text encoder.
AUDIO = dict(
    depths=[1, 1, 2, 1],
    num_attention_heads=[1, 2, 2, 4],
    patch_embeds_hidden_size=8,
    hidden_size=64,
    projection_hidden_size=32,
    num_classes=11,
)
SIZES = {
    # the brief's tiny size, and a second one (more layers and heads, wider head, other projection)
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, proj=16),
    "other": dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=64, proj=24),
}
VOCAB, PAD = 120, 1


def build_reference(text: dict, projection_dim: int, audio: dict, seed: int):
    from transformers import ClapConfig, ClapModel

    torch.manual_seed(seed)
    ref = ClapModel(ClapConfig(projection_dim=projection_dim, text_config=text, audio_config=audio))
    return perturb(ref, seed + 1)


@pytest.fixture(scope="module", params=list(SIZES))
def ckpt(request, tmp_path_factory):
    s = dict(SIZES[request.param])
    proj = s.pop("proj")
    text = dict(vocab_size=VOCAB, max_position_embeddings=40, **s)
    ref = build_reference(text, proj, AUDIO, seed=len(request.param))
    root = write_component(tmp_path_factory.mktemp(f"clap_{request.param}"), "text_encoder", ref)
    return ref, root


def prompts(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RoBERTa-like ids: <s>=0 ... </s>=2 then <pad>=1, rows of different lengths (row 0 unpadded)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(batch):
        n = length - 3 * b if b else length  # real tokens in this row
        ids[b, 0], ids[b, n - 1] = 0, 2
        ids[b, n:], mask[b, n:] = PAD, 0
    return ids, mask


def reference(ref, ids, mask):
    return ref.get_text_features(ids, attention_mask=mask).pooler_output


@pytest.mark.parametrize("batch", [1, 3])
def test_matches_reference(ckpt, batch: int):
    ref, root = ckpt
    model = load_clap_text(open_checkpoint(root))
    ids, mask = prompts(batch, 12, seed=batch)
    with torch.no_grad():
        want, got = reference(ref, ids, mask), model(ids, mask)
    assert got.shape == want.shape == (batch, ref.config.projection_dim)
    assert torch.allclose(got.norm(dim=-1), torch.ones(batch))
    assert rel_err(got, want) <= 1e-5


def test_position_ids_follow_the_reference():
    from transformers.models.clap.modeling_clap import ClapTextEmbeddings

    ids, _ = prompts(3, 10, seed=0)
    want = ClapTextEmbeddings.create_position_ids_from_input_ids(ids, PAD)
    assert torch.equal(roberta_position_ids(ids, PAD), want)
    assert want[2, -1] == PAD and want[0, 0] == PAD + 1


def test_audio_tensors_are_not_read(ckpt, monkeypatch):
    spy = TensorReadSpy(monkeypatch)
    model = load_clap_text(open_checkpoint(ckpt[1]))
    audio = [k for k in spy.listed if k.startswith(("audio_model.", "audio_projection.", "logit_scale"))]
    assert len(audio) > 20 and {"logit_scale_a", "logit_scale_t"} <= set(audio)
    assert not set(spy.read) & set(audio)
    index_tables = {"text_model.embeddings.position_ids", "text_model.embeddings.token_type_ids"}
    assert sorted(spy.read) == sorted([*model.state_dict(), *index_tables])  # each text key read once


def test_missing_text_key_is_named(ckpt, tmp_path):
    root = edit_weights(
        ckpt[1], tmp_path / "c", "text_encoder", lambda s: s.pop("text_model.pooler.dense.bias")
    )
    with pytest.raises(CheckpointError, match=r"missing keys: text_model\.pooler\.dense\.bias"):
        load_clap_text(open_checkpoint(root))


def test_unexpected_text_key_is_named(ckpt, tmp_path):
    def add(s):
        s["text_model.encoder.layer.9.output.dense.bias"] = torch.zeros(3)

    root = edit_weights(ckpt[1], tmp_path / "c", "text_encoder", add)
    with pytest.raises(CheckpointError, match=r"unexpected keys: text_model\.encoder\.layer\.9"):
        load_clap_text(open_checkpoint(root))


def test_misshaped_key_is_named(ckpt, tmp_path):
    def shrink(s):
        s["text_projection.linear2.weight"] = s["text_projection.linear2.weight"][:-1]

    root = edit_weights(ckpt[1], tmp_path / "c", "text_encoder", shrink)
    with pytest.raises(CheckpointError, match=r"mis-shaped keys: text_projection\.linear2\.weight"):
        load_clap_text(open_checkpoint(root))


def test_key_of_neither_tower_is_an_error(ckpt, tmp_path):
    def add(s):
        s["fusion_model.weight"] = torch.zeros(3)

    root = edit_weights(ckpt[1], tmp_path / "c", "text_encoder", add)
    with pytest.raises(CheckpointError, match=r"fusion_model\.weight"):
        load_clap_text(open_checkpoint(root))


def test_file_without_audio_tower_is_an_error(ckpt, tmp_path):
    def drop(s):
        for k in [k for k in s if k.startswith("audio_")]:
            del s[k]

    root = edit_weights(ckpt[1], tmp_path / "c", "text_encoder", drop)
    with pytest.raises(CheckpointError, match="audio keys found"):
        load_clap_text(open_checkpoint(root))


def test_nontrivial_token_type_table_is_an_error(ckpt, tmp_path):
    def edit(s):
        s["text_model.embeddings.token_type_ids"][0, 3] = 1

    root = edit_weights(ckpt[1], tmp_path / "c", "text_encoder", edit)
    with pytest.raises(CheckpointError, match="token_type_ids"):
        load_clap_text(open_checkpoint(root))


def test_dtype_and_meta_free(ckpt):
    model = load_clap_text(open_checkpoint(ckpt[1]), dtype=torch.float64)
    assert all(t.dtype == torch.float64 and not t.is_meta for t in model.parameters())


def test_tiny_checkpoint_fixture(tiny_base):
    root = tiny_base
    from transformers import ClapModel

    ref = ClapModel.from_pretrained(root / "text_encoder", torch_dtype=torch.float32).eval()
    model = load_clap_text(open_checkpoint(root))
    ids, mask = prompts(3, 12, seed=7)
    ids = ids.clamp(max=ref.config.text_config.vocab_size - 1)
    with torch.no_grad():
        assert rel_err(model(ids, mask), reference(ref, ids, mask)) <= 1e-5


@pytest.mark.slow
def test_real_size_random_weights(tmp_path):
    hub = json.loads(HUB.read_text())
    text, audio = dict(hub["text_config"]), dict(hub["audio_config"])
    ref = build_reference(text, hub["projection_dim"], audio, seed=0)
    root = write_component(tmp_path, "text_encoder", ref)
    t0 = time.perf_counter()
    model = load_clap_text(open_checkpoint(root))
    load_s = time.perf_counter() - t0
    vocab = ref.config.text_config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, 512), generator=g)  # padded to 512 as the hub tokenizer does
    mask = torch.zeros(2, 512, dtype=torch.long)
    for b, n in enumerate((512, 9)):
        ids[b, 0], ids[b, n - 1], mask[b, :n] = 0, 2, 1
        ids[b, n:] = PAD
    with torch.no_grad():
        t0 = time.perf_counter()
        want = reference(ref, ids, mask)
        ref_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = model(ids, mask)
        ours_s = time.perf_counter() - t0
    err = rel_err(got, want)
    print(
        f"clap text real size: rel err {err:.3e}; load {load_s:.1f} s, ref {ref_s:.2f} s, ours {ours_s:.2f} s"
    )
    assert err <= 1e-5
