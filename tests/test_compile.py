"""The denoising loop's options for compiled and CUDA-graph execution, on the CPU.

``compile=`` is run with the ``aot_eager`` backend (Dynamo's trace and AOT autograd's graph, no code
generation: seconds instead of minutes); Inductor itself is the slow test below. The CUDA-graph denoiser's
bookkeeping (static buffers, warm-up call, replays) is run with recording replaced by re-running the recorded
function on the static buffers; the real capture is tests/test_gpu.py (``-m gpu``, on a CUDA machine).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from audioldm2_core import AudioLDM2, fast
from audioldm2_core.fast import CudaGraphDenoiser
from tests.helpers import rel_err
from tests.oracle import run_reference

KW = dict(num_inference_steps=3, audio_length_in_s=1.0, negative_prompt="noise", sampler="dpmpp-2m")
PROMPT = "a dog barks in the rain"


def generate(pipe: AudioLDM2) -> torch.Tensor:
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt", **KW).audios


@pytest.fixture(scope="module")
def eager(tiny_base):
    return generate(AudioLDM2.from_pretrained(tiny_base))


@pytest.fixture
def counting_backend():
    """A torch.compile backend that runs the traced graph as it is and counts the graphs it is given."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    yield backend, graphs
    torch._dynamo.reset()


def test_compiled_unet_one_graph_same_audio(tiny_base, eager, counting_backend):
    """The whole UNet call traces into one graph (fullgraph: no break), compiled once for every step (the
    timestep is a tensor, the condition caches are bypassed while tracing), and gives the eager audio."""
    backend, graphs = counting_backend
    pipe = AudioLDM2.from_pretrained(tiny_base, compile={"backend": backend, "fullgraph": True})
    got = generate(pipe)
    assert len(graphs) == 1
    # Traced, the linears are F.linear (the compiler's GEMM choice) instead of oneDNN's: summation order only
    assert rel_err(got, eager) <= 1e-5
    generate(pipe)  # a second generation of the same shape: no new graph
    assert len(graphs) == 1


def test_compiled_unet_aot_matches_diffusers(tiny_base):
    torch._dynamo.reset()
    try:
        pipe = AudioLDM2.from_pretrained(tiny_base, compile={"backend": "aot_eager", "fullgraph": True})
        got = generate(pipe)
    finally:
        torch._dynamo.reset()
    kw = {k: v for k, v in KW.items() if k != "sampler"}
    want = run_reference(tiny_base, PROMPT, seed=0, sampler="dpmpp", **kw)
    assert rel_err(got, want["audio"]) <= 1e-4


def test_compiled_unet_with_cpu_attention(tiny_base, cpu_attention_on, counting_backend, monkeypatch):
    """The C++ kernel is one opaque op of the compiled graph (its output shape registered for tracing)."""
    monkeypatch.setattr(cpu_attention_on, "min_keys", lambda dtype: 1)  # 100 tokens at the first level here
    backend, graphs = counting_backend
    want = generate(AudioLDM2.from_pretrained(tiny_base, cpu_attention=True))  # the kernel on, eager
    options = {"backend": backend, "fullgraph": True}
    got = generate(AudioLDM2.from_pretrained(tiny_base, compile=options, cpu_attention=True))
    assert len(graphs) == 1
    assert "audioldm2.attention" in str(graphs[0].graph)
    assert rel_err(got, want) <= 1e-5


@pytest.mark.slow
def test_inductor_compiled_unet(tiny_base, eager):
    """Inductor's generated code (C++ on the CPU): ~2.5 min to compile the tiny UNet on 2 cores."""
    torch._dynamo.reset()
    try:
        got = generate(AudioLDM2.from_pretrained(tiny_base, compile=True))
    finally:
        torch._dynamo.reset()
    assert rel_err(got, eager) <= 1e-5


class ReplayedByRerunning(CudaGraphDenoiser):
    """CUDA-free stand-in for recording: "replay" runs the recorded function again on the static buffers and
    writes the result into the static output, which is what a replayed graph does."""

    calls = 0

    def _warm_up(self, fn):
        return fn()

    def _capture(self, fn):
        out = fn()

        def replay():
            ReplayedByRerunning.calls += 1
            out.copy_(fn())

        return replay, out


def test_cuda_graph_denoiser_bookkeeping(tiny_base, eager, monkeypatch):
    """First step: the warm-up's own result; later steps: the static buffers refilled and the graph replayed,
    a fresh output tensor each time. The same audio, bit for bit."""
    monkeypatch.setattr(fast, "CudaGraphDenoiser", ReplayedByRerunning)
    pipe = AudioLDM2.from_pretrained(tiny_base)
    pipe.options = dataclasses.replace(pipe.options, cuda_graphs=True)  # refused on the CPU (below); the
    # stand-in needs no CUDA
    ReplayedByRerunning.calls = 0
    got = generate(pipe)
    assert ReplayedByRerunning.calls == KW["num_inference_steps"] - 1
    assert torch.equal(got, eager)


def test_cuda_graph_denoiser_refuses_other_shapes():
    graphed = ReplayedByRerunning(lambda x, t: x * t)
    x, t = torch.ones(1, 8, 4, 16), torch.tensor(3.0)
    first = graphed(x, t)
    again = graphed(2 * x, torch.tensor(5.0))
    assert torch.equal(first, 3 * x) and torch.equal(again, 10 * x)
    assert again is not graphed(x, t)  # a copy of the static output, not the buffer
    with pytest.raises(ValueError, match=r"recorded for x \(1, 8, 4, 16\)"):
        graphed(torch.ones(1, 8, 5, 16), t)


def test_option_errors(tiny_base):
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        AudioLDM2.from_pretrained(tiny_base, cuda_graphs=True)
    with pytest.raises(TypeError, match="compile must be a bool or a dict"):
        AudioLDM2.from_pretrained(tiny_base, compile="yes")
