"""GPT-2 embedding-driven generation parity with diffusers' AudioLDM2Pipeline.generate_language_model.

The reference: diffusers' ``generate_language_model`` needs a ``GenerationMixin`` model, which the hub's
``GPT2Model`` is not under transformers 5, so the same saved ``GPT2Model`` folder is loaded as
``GPT2LMHeadModel`` (its ``transformer`` is that model; the LM head is never used) and the unbound method is
called with a stand-in pipeline holding only ``language_model``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from audioldm2_core.errors import CheckpointError
from audioldm2_core.gpt2 import generate, load_gpt2
from audioldm2_core.loading import open_checkpoint
from tests.checkpoints import TensorReadSpy, edit_weights, perturb, write_component
from tests.helpers import rel_err

HUB = Path(__file__).parents[1] / "weights_tools/hub_configs/cvssp__audioldm2/language_model/config.json"
SIZES = {
    # the brief's tiny size, and a second one (more layers, wider heads, explicit n_inner)
    "tiny": dict(n_embd=32, n_layer=2, n_head=4),
    "other": dict(n_embd=48, n_layer=3, n_head=3, n_inner=72),
}


def build_reference(config: dict, seed: int):
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(seed)
    config = dict(
        vocab_size=100, n_positions=64, bos_token_id=99, eos_token_id=99, max_new_tokens=8, **config
    )
    return perturb(GPT2Model(GPT2Config(**config)), seed + 1)


@pytest.fixture(scope="module", params=list(SIZES))
def ckpt(request, tmp_path_factory):
    ref = build_reference(SIZES[request.param], seed=len(request.param))
    return write_component(tmp_path_factory.mktemp(f"gpt2_{request.param}"), "language_model", ref)


def reference_generate(root: Path, inputs_embeds, attention_mask, max_new_tokens: int):
    from diffusers import AudioLDM2Pipeline
    from transformers import GPT2LMHeadModel

    lm = GPT2LMHeadModel.from_pretrained(root / "language_model", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return AudioLDM2Pipeline.generate_language_model(
            SimpleNamespace(language_model=lm),
            inputs_embeds,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
        )


def projected_sequence(batch: int, t5_length: int, width: int, seed: int, float_mask: bool = False):
    """Shaped like the projection's output: [sos, clap, eos, sos_1, t5 (right-padded), eos_1], so the
    padding sits in the middle of the sequence; rows have different amounts of padding (row 0 none)."""
    g = torch.Generator().manual_seed(seed)
    L = 3 + 1 + t5_length + 1
    x = torch.randn(batch, L, width, generator=g)
    mask = torch.ones(batch, L, dtype=torch.long)
    for b in range(1, batch):
        mask[b, L - 1 - 3 * b : L - 1] = 0
    return x, mask.float() if float_mask else mask


@pytest.mark.parametrize("max_new_tokens", [8, 3, 1])
@pytest.mark.parametrize("batch", [1, 3])
def test_matches_reference(ckpt, batch: int, max_new_tokens: int):
    model = load_gpt2(open_checkpoint(ckpt))
    x, mask = projected_sequence(batch, 9, model.cfg.n_embd, seed=batch)
    want = reference_generate(ckpt, x, mask, max_new_tokens)
    got = generate(model, x, mask, max_new_tokens)
    assert got.shape == want.shape == (batch, max_new_tokens, model.cfg.n_embd)
    assert rel_err(got, want) <= 1e-5


def test_float_mask_and_config_length(ckpt):
    # the TTS pipeline's masks can be float; the pipeline reads max_new_tokens from the config (8)
    model = load_gpt2(open_checkpoint(ckpt))
    assert model.cfg.max_new_tokens == 8
    x, mask = projected_sequence(3, 6, model.cfg.n_embd, seed=11, float_mask=True)
    want = reference_generate(ckpt, x, mask, model.cfg.max_new_tokens)
    assert rel_err(generate(model, x, mask, model.cfg.max_new_tokens), want) <= 1e-5


def test_padding_is_ignored(ckpt):
    """Changing the embeddings at masked positions changes nothing (they are masked as keys)."""
    model = load_gpt2(open_checkpoint(ckpt))
    x, mask = projected_sequence(3, 9, model.cfg.n_embd, seed=2)
    y = x.clone()
    y[mask == 0] = 100.0
    assert torch.equal(generate(model, x, mask, 4), generate(model, y, mask, 4))


def test_sequence_longer_than_positions_is_an_error(ckpt):
    model = load_gpt2(open_checkpoint(ckpt))
    x, mask = projected_sequence(1, 55, model.cfg.n_embd, seed=0)  # 60 + 8 - 1 > 64 positions
    with pytest.raises(ValueError, match="positions"):
        generate(model, x, mask, 8)


def test_token_embedding_is_not_read(ckpt, monkeypatch):
    spy = TensorReadSpy(monkeypatch)
    model = load_gpt2(open_checkpoint(ckpt))
    assert "wte.weight" in spy.listed and "wte.weight" not in spy.read
    assert sorted(spy.read) == sorted(model.state_dict())


def test_file_without_token_embedding_is_an_error(ckpt, tmp_path):
    root = edit_weights(ckpt, tmp_path / "c", "language_model", lambda s: s.pop("wte.weight"))
    with pytest.raises(CheckpointError, match="wte.weight"):
        load_gpt2(open_checkpoint(root))


def test_old_causal_mask_buffers_are_skipped(ckpt, tmp_path):
    # transformers < 4.31 saved them; transformers ignores them on load, and so do we
    def add(s):
        n = 64
        for i in range(2):
            s[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)
            s[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)

    root = edit_weights(ckpt, tmp_path / "c", "language_model", add)
    model, same = load_gpt2(open_checkpoint(root)), load_gpt2(open_checkpoint(ckpt))
    x, mask = projected_sequence(2, 5, model.cfg.n_embd, seed=0)
    assert torch.equal(generate(model, x, mask, 2), generate(same, x, mask, 2))


def test_missing_key_is_named(ckpt, tmp_path):
    root = edit_weights(ckpt, tmp_path / "c", "language_model", lambda s: s.pop("h.1.mlp.c_fc.bias"))
    with pytest.raises(CheckpointError, match=r"missing keys: h\.1\.mlp\.c_fc\.bias"):
        load_gpt2(open_checkpoint(root))


def test_unexpected_key_is_named(ckpt, tmp_path):
    def add(s):
        s["h.1.crossattention.c_attn.weight"] = torch.zeros(3)

    root = edit_weights(ckpt, tmp_path / "c", "language_model", add)
    with pytest.raises(CheckpointError, match=r"unexpected keys: h\.1\.crossattention\.c_attn\.weight"):
        load_gpt2(open_checkpoint(root))


def test_transposed_conv1d_weight_is_misshaped(ckpt, tmp_path):
    # a Linear-layout (out, in) c_fc weight must not load into the Conv1D (in, out) slot
    def edit(s):
        s["h.0.mlp.c_fc.weight"] = s["h.0.mlp.c_fc.weight"].t().contiguous()

    root = edit_weights(ckpt, tmp_path / "c", "language_model", edit)
    with pytest.raises(CheckpointError, match=r"mis-shaped keys: h\.0\.mlp\.c_fc\.weight"):
        load_gpt2(open_checkpoint(root))


def test_tiny_checkpoint_fixture(tiny_base):
    root = tiny_base
    model = load_gpt2(open_checkpoint(root))
    x, mask = projected_sequence(3, 9, model.cfg.n_embd, seed=4)
    n = model.cfg.max_new_tokens
    assert rel_err(generate(model, x, mask, n), reference_generate(root, x, mask, n)) <= 1e-5


@pytest.mark.slow
def test_real_size_random_weights(tmp_path):
    from transformers import GPT2Config, GPT2Model

    hub = json.loads(HUB.read_text())
    torch.manual_seed(0)
    ref = perturb(GPT2Model(GPT2Config(**{k: v for k, v in hub.items() if k != "architectures"})), 1)
    root = write_component(tmp_path, "language_model", ref)
    t0 = time.perf_counter()
    model = load_gpt2(open_checkpoint(root))
    load_s = time.perf_counter() - t0
    x, mask = projected_sequence(2, 40, hub["n_embd"], seed=0)
    x = x * 0.1  # the scale of projected text states
    t0 = time.perf_counter()
    want = reference_generate(root, x, mask, hub["max_new_tokens"])
    ref_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = generate(model, x, mask, model.cfg.max_new_tokens)
    ours_s = time.perf_counter() - t0
    err = rel_err(got, want)
    print(f"gpt2 real size: rel err {err:.3e}; load {load_s:.1f} s, ref {ref_s:.2f} s, ours {ours_s:.2f} s")
    assert err <= 1e-5
