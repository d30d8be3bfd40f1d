"""The GPU path (issue 6): run on a CUDA machine with ``pytest -m gpu``; never part of CI, which has no GPU.

What it checks, on the tiny reference-made checkpoint: float32 on CUDA gives diffusers' audio (TF32 off, as
parity needs); the CUDA-graph denoising loop gives the eager loop's audio; ``torch.compile`` with CUDA
graphs on top too; float16 and bfloat16 give finite audio close to float32, with the VAE and the vocoder in
float32 under float16. Timings are the benchmarks' (``benchmarks/pipeline_ab.py --device cuda``), not here.
"""

from __future__ import annotations

import pytest
import torch

from audioldm2_core import AudioLDM2, fast
from audioldm2_core.samplers import SAMPLERS
from tests.helpers import rel_err
from tests.oracle import run_reference

pytestmark = pytest.mark.gpu

PROMPT = "a dog barks in the rain"
KW = dict(num_inference_steps=4, audio_length_in_s=2.56, negative_prompt="noise")


@pytest.fixture(scope="module")
def cuda():
    if not torch.cuda.is_available():
        pytest.fail("pytest -m gpu runs the GPU checks: this machine has no CUDA device")
    # float32 parity: no TF32 in matmuls or convolutions (cuDNN allows it by default)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def generate(pipe: AudioLDM2, sampler: str = "dpmpp-2m") -> torch.Tensor:
    g = torch.Generator().manual_seed(0)  # a CPU generator: the same draws as the reference's
    out = pipe(PROMPT, generator=g, output_type="pt", sampler=sampler, **KW).audios
    assert out.device.type == "cuda"
    return out.float().cpu()


@pytest.fixture(scope="module")
def float32(tiny_base, cuda):
    return generate(AudioLDM2.from_pretrained(tiny_base, device=cuda))


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp-2m"])
def test_float32_matches_diffusers(tiny_base, cuda, float32, sampler):
    got = (
        float32
        if sampler == "dpmpp-2m"
        else generate(AudioLDM2.from_pretrained(tiny_base, device=cuda), sampler)
    )
    want = run_reference(
        tiny_base, PROMPT, seed=0, sampler="dpmpp" if sampler == "dpmpp-2m" else "ddim", **KW
    )
    assert rel_err(got, want["audio"]) <= 1e-4


def test_cuda_graphs_same_audio(tiny_base, cuda, float32, monkeypatch):
    captures = []
    capture = fast.CudaGraphDenoiser._capture

    def counted(self, fn):
        captures.append(fn)
        return capture(self, fn)

    monkeypatch.setattr(fast.CudaGraphDenoiser, "_capture", counted)
    pipe = AudioLDM2.from_pretrained(tiny_base, device=cuda, cuda_graphs=True)
    assert rel_err(generate(pipe), float32) <= 1e-6
    assert rel_err(generate(pipe), float32) <= 1e-6  # a second loop records its own graph
    assert len(captures) == 2


def test_compile_with_cuda_graphs(tiny_base, cuda, float32):
    torch._dynamo.reset()
    try:
        pipe = AudioLDM2.from_pretrained(tiny_base, device=cuda, compile=True, cuda_graphs=True)
        got = generate(pipe)
    finally:
        torch._dynamo.reset()
    assert rel_err(got, float32) <= 1e-4  # Inductor's own kernels: other summation orders


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(tiny_base, cuda, float32, dtype):
    pipe = AudioLDM2.from_pretrained(tiny_base, device=cuda, dtype=dtype)
    got = generate(pipe)
    decoders = torch.float32 if dtype == torch.float16 else dtype  # float16 overflows in the VAE and vocoder
    assert next(pipe.unet.parameters()).dtype == dtype
    assert next(pipe.vae.parameters()).dtype == decoders
    assert next(pipe.vocoder.parameters()).dtype == decoders
    assert torch.isfinite(got).all()
    err = rel_err(got, float32)
    print(f"{dtype}: waveform rel. error vs float32 {err:.2e}")
    assert err <= (2e-2 if dtype == torch.float16 else 1e-1)  # 10 and 7 mantissa bits


@pytest.fixture(scope="module")
def cuda_pipe(tiny_base, cuda):
    return AudioLDM2.from_pretrained(tiny_base, device=cuda)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_matches_diffusers_on_cuda(tiny_base, cuda_pipe, sampler):
    """Each sampler's per-step scalars stay on the CPU as diffusers keeps them; its noise is drawn from the
    CPU generator and moved, as ``randn_tensor`` does."""
    want = run_reference(tiny_base, PROMPT, seed=0, sampler=sampler, **KW)["audio"]
    assert rel_err(generate(cuda_pipe, sampler), want) <= 1e-4


@pytest.mark.parametrize("sampler", ["heun", "kdpm2-a", "unipc", "euler-a"])
def test_cuda_graphs_with_other_samplers(tiny_base, cuda, cuda_pipe, sampler):
    """Fractional timesteps (KDPM2), two calls per step (Heun), noise between calls: the replayed graph
    takes each call's x and t through its static buffers."""
    graphs = AudioLDM2.from_pretrained(tiny_base, device=cuda, cuda_graphs=True)
    assert rel_err(generate(graphs, sampler), generate(cuda_pipe, sampler)) <= 1e-6
