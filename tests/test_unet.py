"""UNet parity with diffusers' AudioLDM2UNet2DConditionModel, and strict loading of ``unet/``."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from audioldm2_core import fast
from audioldm2_core.config import unet_config
from audioldm2_core.errors import WeightsError
from audioldm2_core.loading import load_strict, open_checkpoint
from audioldm2_core.unet import AudioLDM2UNet, load_unet
from tests.checkpoints import edit_weights, perturb, write_component
from tests.helpers import rel_err

HUB = Path(__file__).parents[1] / "weights_tools/hub_configs"
LM, T5 = 32, 48  # tiny widths of the GPT-2 and T5 streams

# The real block layout (DownBlock2D first, UpBlock2D last) at small width.
TINY = dict(
    in_channels=8,
    out_channels=8,
    down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3,
    up_block_types=["CrossAttnUpBlock2D"] * 3 + ["UpBlock2D"],
    block_out_channels=[32, 32, 64, 64],
    layers_per_block=2,
    attention_head_dim=2,
    norm_num_groups=8,  # 4 channels per group, so grouping matters
    sample_size=64,
)
SHAPES = {  # the per-block transformer lists of the hub checkpoints
    "base": dict(cross_attention_dim=[[None, LM, T5]] * 4),  # cvssp/audioldm2, -music
    # cvssp/audioldm2-large; per-block head counts to check that up blocks read them in reverse
    "large": dict(
        cross_attention_dim=[[None, LM, T5, None]] * 4,
        transformer_layers_per_block=2,
        attention_head_dim=[2, 2, 4, 8],
    ),
    "speech": dict(cross_attention_dim=[[None, LM]] * 4),  # anhnct/audioldm2_gigaspeech, _ljspeech
    # Every other form diffusers reads: per-block lists that differ, "UNetRes" block names, an int entry for
    # the blocks without transformers, only_cross_attention per block.
    "forms": dict(
        down_block_types=["UNetResDownBlock2D"] + ["CrossAttnDownBlock2D"] * 3,
        up_block_types=["CrossAttnUpBlock2D"] * 3 + ["UNetResUpBlock2D"],
        layers_per_block=[1, 2, 1, 2],
        transformer_layers_per_block=[1, 2, 1, 2],
        attention_head_dim=[2, 4, 2, 4],
        cross_attention_dim=[LM, [None, LM, T5], [None, LM, T5], [None, LM, T5]],
        only_cross_attention=[False] * 4,
    ),
}


def _reference(config: dict, seed: int):
    from diffusers.pipelines.audioldm2.modeling_audioldm2 import AudioLDM2UNet2DConditionModel

    torch.manual_seed(seed)
    return perturb(AudioLDM2UNet2DConditionModel(**config), seed + 1)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """shape name -> (reference, ours loaded from the reference's saved folder), built on first use."""
    built: dict[str, tuple] = {}

    def get(shape: str):
        if shape not in built:
            ref = _reference({**TINY, **SHAPES[shape]}, seed=list(SHAPES).index(shape))
            root = write_component(tmp_path_factory.mktemp(f"unet_{shape}"), "unet", ref)
            built[shape] = ref, load_unet(open_checkpoint(root))
        return built[shape]

    return get


def _inputs(batch: int, frames: int, bins: int = 16, lm: int = LM, t5: int = T5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 8, frames, bins, generator=g)
    gpt2 = torch.randn(batch, 8, lm, generator=g)
    t5_states = torch.randn(batch, 7, t5, generator=g)
    mask = torch.ones(batch, 7, dtype=torch.long)
    mask[-1, 4:] = 0  # the last prompt is padded
    return sample, gpt2, t5_states, mask


def _compare(ref, ours, sample, timestep, gpt2, t5_states, mask) -> float:
    """Relative error of ours against the reference on the same inputs."""
    with torch.no_grad():
        expected = ref(
            sample,
            timestep,
            encoder_hidden_states=gpt2,
            encoder_hidden_states_1=t5_states,
            encoder_attention_mask_1=mask,
            return_dict=False,
        )[0]
        got = ours(sample, timestep, gpt2, t5_states, mask)
    assert got.shape == sample.shape
    return rel_err(got, expected)


# (shape, batch, latent frames, latent bins, timestep): T=25 and 43 are not multiples of 8 (rounded-up
# strides); bins=12 takes the same path along the other axis. Timesteps in the forms callers pass them.
# Few distinct sizes: each new one costs CPU kernel set-up time.
CASES = [
    ("base", 1, 25, 16, 981),
    ("base", 2, 32, 16, torch.tensor([1, 999])),
    ("base", 2, 43, 16, torch.tensor(500)),
    ("base", 1, 32, 12, 21.5),
    ("large", 1, 25, 16, 981),
    ("large", 2, 43, 16, torch.tensor([1, 999])),
    ("speech", 1, 25, 16, torch.tensor(500)),
    ("speech", 2, 43, 16, torch.tensor([1, 999])),
    ("forms", 2, 43, 16, torch.tensor([1, 999])),
]


@pytest.mark.parametrize("shape,batch,frames,bins,timestep", CASES)
def test_matches_reference(pairs, shape, batch, frames, bins, timestep):
    ref, ours = pairs(shape)
    sample, gpt2, t5_states, mask = _inputs(batch, frames, bins)
    err = _compare(ref, ours, sample, timestep, gpt2, t5_states, mask)
    assert err <= 1e-5, err


def test_batch_errors(pairs):
    _, ours = pairs("base")
    sample, gpt2, t5_states, mask = _inputs(3, 25)
    with torch.no_grad(), pytest.raises(ValueError, match="differs from encoder_hidden_states batch"):
        ours(sample[:2], 10, gpt2, t5_states, mask)
    with torch.no_grad(), pytest.raises(ValueError, match=r"scalar or \(3,\)"):
        ours(sample, torch.tensor([1, 2]), gpt2, t5_states, mask)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_padding_changes_output(pairs, shape):
    """The T5 mask reaches the attention (the speech shape never attends the T5 stream)."""
    _, ours = pairs(shape)
    sample, gpt2, t5_states, mask = _inputs(1, 25)
    with torch.no_grad():
        full = ours(sample, 10, gpt2, t5_states, torch.ones_like(mask))
        padded = ours(sample, 10, gpt2, t5_states, mask)
    assert (rel_err(padded, full) > 1e-4) == (shape != "speech")


@pytest.mark.parametrize("fixture", ["tiny_base", "tiny_large"])
def test_matches_reference_on_tiny_checkpoint(request, fixture):
    from diffusers.pipelines.audioldm2.modeling_audioldm2 import AudioLDM2UNet2DConditionModel

    root = request.getfixturevalue(fixture)
    ref = AudioLDM2UNet2DConditionModel.from_pretrained(root / "unet").eval()
    ours = load_unet(open_checkpoint(root))
    lm, t5 = ours.cfg.cross_attention_dims[0][1:3]
    sample, gpt2, t5_states, mask = _inputs(2, 43, lm=lm, t5=t5)
    assert _compare(ref, ours, sample, torch.tensor([3, 700]), gpt2, t5_states, mask) <= 1e-5


# ------------------------------------------------------------------------------------ strict loading


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    ref = _reference({**TINY, **SHAPES["base"]}, seed=0)
    return write_component(tmp_path_factory.mktemp("unet_saved"), "unet", ref)


@pytest.mark.parametrize(
    "edit,named",
    [
        (lambda s: s.pop("mid_block.attentions.2.proj_out.bias"), "mid_block.attentions.2.proj_out.bias"),
        (
            lambda s: s.update({"up_blocks.3.attentions.0.norm.weight": torch.ones(32)}),
            "up_blocks.3.attentions",
        ),
        (lambda s: s.update({"conv_in.weight": torch.zeros(32, 4, 3, 3)}), "conv_in.weight"),
    ],
    ids=["missing", "unexpected", "wrong-shape"],
)
def test_strict_loading(saved, tmp_path, edit, named):
    with pytest.raises(WeightsError, match=named.replace(".", r"\.")):
        load_unet(open_checkpoint(edit_weights(saved, tmp_path / "ckpt", "unet", edit)))


def test_load_dtype(saved):
    model = load_unet(open_checkpoint(saved), dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters()) and not model.training


# -------------------------------------------------------------------------------------- real size


@pytest.mark.slow
@pytest.mark.parametrize("repo", ["cvssp__audioldm2", "cvssp__audioldm2-large"])
def test_real_size_random_weights(repo, cpu_attention_on, monkeypatch):
    """The real architecture with random weights, at a short latent (T=20: not a multiple of 8); without and
    with the C++ attention kernel (head widths 32, 48, 80 at the real size)."""
    config = json.loads((HUB / repo / "unet/config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    ref = _reference(config, seed=0)
    with torch.device("meta"):
        ours = AudioLDM2UNet(unet_config(config))
    load_strict(ours, ref.state_dict(), repo)  # shares the reference's tensors: no second copy in memory
    sample, gpt2, t5_states, mask = _inputs(2, 20, lm=768, t5=1024)
    monkeypatch.setattr(cpu_attention_on, "min_keys", lambda dtype: 1)  # 80 tokens at the first level here
    for kernel in (False, True):
        fast.optimize(ours, select={"cpu-attention"}, cpu_attention=kernel)  # the kernel's route, or not
        err = _compare(ref, ours, sample, torch.tensor([1, 801]), gpt2, t5_states, mask)
        print(f"{repo}{' (CPU attention kernel)' if kernel else ''}: rel err {err:.2e}")
        assert err <= 1e-5


@pytest.mark.parametrize("shape", ["base", "large", "speech"])
def test_cpu_attention_kernel_matches_reference(pairs, cpu_attention_on, monkeypatch, shape):
    """With the opt-in C++ kernel taking the self-attentions through the speed layer (head widths 16 and 32
    here; -large's deeper blocks have width 8, which stays with PyTorch's kernel)."""
    monkeypatch.setattr(cpu_attention_on, "min_keys", lambda dtype: 1)
    calls = []
    kernel = cpu_attention_on.attention

    def counted(q, k, v):
        out = kernel(q, k, v)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(cpu_attention_on, "attention", counted)
    ref, plain = pairs(shape)
    ours = copy.deepcopy(plain)
    fast.optimize(ours, select={"cpu-attention"}, cpu_attention=True)
    sample, gpt2, t5_states, mask = _inputs(2, 43)
    assert _compare(ref, ours, sample, torch.tensor([1, 999]), gpt2, t5_states, mask) <= 1e-5
    assert any(calls) and (all(calls) or shape == "large")
