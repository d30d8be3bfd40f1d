"""Flan-T5 encoder parity with transformers' T5EncoderModel, tied-embedding handling, float16 layout."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from audioldm2_core.errors import CheckpointError
from audioldm2_core.loading import open_checkpoint
from audioldm2_core.t5 import load_t5, relative_position_bucket
from tests.checkpoints import edit_weights, perturb, write_component
from tests.helpers import rel_err

HUB = Path(__file__).parents[1] / "weights_tools/hub_configs/cvssp__audioldm2/text_encoder_2/config.json"
VOCAB = 90
SIZES = {
    # the brief's tiny size (Flan-T5: gated-gelu), and T5 v1.0 (relu) with heads * d_kv != d_model and a
    # short max_distance, so that the logarithmic and the saturated buckets are all exercised
    "tiny": dict(d_model=48, d_kv=8, d_ff=40, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu"),
    "other": dict(
        d_model=40,
        d_kv=12,
        d_ff=56,
        num_layers=3,
        num_heads=5,
        feed_forward_proj="relu",
        relative_attention_num_buckets=16,
        relative_attention_max_distance=20,
    ),
}


def build_reference(config: dict, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return perturb(T5EncoderModel(T5Config(**config)), seed + 1)


@pytest.fixture(scope="module", params=list(SIZES))
def ckpt(request, tmp_path_factory):
    ref = build_reference(dict(vocab_size=VOCAB, **SIZES[request.param]), seed=len(request.param))
    root = write_component(tmp_path_factory.mktemp(f"t5_{request.param}"), "text_encoder_2", ref)
    return ref, root


def prompts(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T5-like ids: tokens, </s>=1, then <pad>=0; rows of different lengths (row 0 unpadded)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(batch):
        n = length - 5 * b if b else length
        ids[b, n - 1] = 1
        ids[b, n:], mask[b, n:] = 0, 0
    return ids, mask


def reference(ref, ids, mask):
    return ref(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("batch", [1, 3])
def test_matches_reference(ckpt, batch: int):
    ref, root = ckpt
    model = load_t5(open_checkpoint(root))
    ids, mask = prompts(batch, 40, seed=batch)  # 40 tokens: distances past max_exact and max_distance
    with torch.no_grad():
        want, got = reference(ref, ids, mask), model(ids, mask)
    assert got.shape == want.shape == (batch, 40, ref.config.d_model)
    assert rel_err(got, want) <= 1e-5


def test_buckets_follow_the_reference():
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = torch.arange(-300, 300)[None, :]
    for buckets, distance in [(32, 128), (16, 20), (8, 5)]:
        want = T5Attention._relative_position_bucket(relative, True, buckets, distance)
        assert torch.equal(relative_position_bucket(relative, buckets, distance), want)


def test_file_holds_shared_weight_only(ckpt):
    # transformers 5 writes the tied embedding once, as shared.weight
    from safetensors import safe_open

    with safe_open(ckpt[1] / "text_encoder_2" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "shared.weight" in keys and "encoder.embed_tokens.weight" not in keys


@pytest.mark.parametrize("layout", ["both", "alias_only"])
def test_tied_embedding_layouts(ckpt, tmp_path, layout: str):
    def edit(s):
        s["encoder.embed_tokens.weight"] = s["shared.weight"].clone()
        if layout == "alias_only":
            del s["shared.weight"]

    root = edit_weights(ckpt[1], tmp_path / "c", "text_encoder_2", edit)
    model = load_t5(open_checkpoint(root))
    ids, mask = prompts(2, 9, seed=0)
    with torch.no_grad():
        assert rel_err(model(ids, mask), reference(ckpt[0], ids, mask)) <= 1e-5


def test_untied_embedding_is_an_error(ckpt, tmp_path):
    def edit(s):
        s["encoder.embed_tokens.weight"] = s["shared.weight"] + 1

    root = edit_weights(ckpt[1], tmp_path / "c", "text_encoder_2", edit)
    with pytest.raises(CheckpointError, match="tied"):
        load_t5(open_checkpoint(root))


def test_missing_key_is_named(ckpt, tmp_path):
    key = "encoder.block.1.layer.1.layer_norm.weight"
    root = edit_weights(ckpt[1], tmp_path / "c", "text_encoder_2", lambda s: s.pop(key))
    with pytest.raises(
        CheckpointError, match=r"missing keys: encoder\.block\.1\.layer\.1\.layer_norm\.weight"
    ):
        load_t5(open_checkpoint(root))


def test_unexpected_key_is_named(ckpt, tmp_path):
    # a relative-bias table in block 1 would be silently unused by the reference's architecture
    def add(s):
        s["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"] = torch.zeros(32, 4)

    root = edit_weights(ckpt[1], tmp_path / "c", "text_encoder_2", add)
    with pytest.raises(CheckpointError, match=r"unexpected keys: encoder\.block\.1\.layer\.0\.SelfAttention"):
        load_t5(open_checkpoint(root))


def test_decoder_keys_are_an_error(ckpt, tmp_path):
    def add(s):
        s["decoder.final_layer_norm.weight"] = torch.ones(3)

    root = edit_weights(ckpt[1], tmp_path / "c", "text_encoder_2", add)
    with pytest.raises(CheckpointError, match=r"unexpected keys: decoder\.final_layer_norm\.weight"):
        load_t5(open_checkpoint(root))


def test_float16_keeps_wo_in_float32(ckpt):
    """As transformers' from_pretrained(torch_dtype=float16) does (``_keep_in_fp32_modules = ["wo"]``)."""
    from transformers import T5EncoderModel

    ref, root = ckpt
    model = load_t5(open_checkpoint(root), dtype=torch.float16)
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if name.endswith(".wo.weight") else torch.float16), name
        if name.endswith(".wo.weight"):  # the file's values, not float16-rounded ones
            assert torch.equal(p, ref.state_dict()[name])
    ref16 = T5EncoderModel.from_pretrained(root / "text_encoder_2", torch_dtype=torch.float16).eval()
    assert {n for n, p in ref16.named_parameters() if p.dtype == torch.float32} == {
        n for n, p in model.named_parameters() if p.dtype == torch.float32
    }
    ids, mask = prompts(2, 16, seed=3)
    with torch.no_grad():
        got, want = model(ids, mask), reference(ref16, ids, mask)
    assert got.dtype == want.dtype == torch.float16
    assert rel_err(got, want) <= 1e-5  # the same float16 arithmetic (bit-identical on CPU today)


def test_tiny_checkpoint_fixture(tiny_base):
    root = tiny_base
    from transformers import T5EncoderModel

    ref = T5EncoderModel.from_pretrained(root / "text_encoder_2", torch_dtype=torch.float32).eval()
    model = load_t5(open_checkpoint(root))
    ids, mask = prompts(3, 16, seed=7)
    ids = ids.clamp(max=ref.config.vocab_size - 1)
    with torch.no_grad():
        assert rel_err(model(ids, mask), reference(ref, ids, mask)) <= 1e-5


@pytest.mark.slow
def test_real_size_random_weights(tmp_path):
    hub = json.loads(HUB.read_text())
    config = {k: v for k, v in hub.items() if not k.startswith("_") and k != "architectures"}
    ref = build_reference(config, seed=0)
    root = write_component(tmp_path, "text_encoder_2", ref)
    t0 = time.perf_counter()
    model = load_t5(open_checkpoint(root))
    load_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, hub["vocab_size"], (2, 128), generator=g)  # the hub tokenizer's max length
    mask = torch.ones(2, 128, dtype=torch.long)
    ids[1, 20], ids[1, 21:], mask[1, 21:] = 1, 0, 0
    with torch.no_grad():
        t0 = time.perf_counter()
        want = reference(ref, ids, mask)
        ref_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = model(ids, mask)
        ours_s = time.perf_counter() - t0
    err = rel_err(got, want)
    print(f"t5 real size: rel err {err:.3e}; load {load_s:.1f} s, ref {ref_s:.2f} s, ours {ours_s:.2f} s")
    assert err <= 1e-5
