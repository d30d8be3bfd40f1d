"""Session fixtures: tiny checkpoints written by the reference stack's own save_pretrained, built once."""

from __future__ import annotations

import os

import pytest

from weights_tools.make_tiny import make_tiny

# The tests compare with the reference on the CPU: device=None / --device auto means the CPU here even on a
# machine with a GPU (and so in the CLI's subprocesses); the GPU tests ask for CUDA by name.
os.environ.setdefault("AUDIOLDM2_DEVICE", "cpu")
# ... and PyTorch's attention: the front ends' default C++ kernel rounds differently (its own tests turn it on)
os.environ.setdefault("AUDIOLDM2_CPU_ATTENTION", "0")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A tiny random checkpoint with the cvssp/audioldm2 architecture (UNet [[None, lm, t5]] per block)."""
    return make_tiny(tmp_path_factory.mktemp("tiny") / "base", variant="base", seed=0)


@pytest.fixture(scope="session")
def tiny_large(tmp_path_factory):
    """The cvssp/audioldm2-large shape: UNet [[None, lm, t5, None]] per block, two transformer layers."""
    return make_tiny(tmp_path_factory.mktemp("tiny") / "large", variant="large", seed=1)


@pytest.fixture
def cpu_attention_on():
    """audioldm2_core.fast.cpu_attention loaded (built on first use, ~12 s, then cached): a model optimized
    with ``cpu_attention=True`` routes its self-attentions to it."""
    from audioldm2_core.fast import cpu_attention
    from tests.helpers import CPU_KERNEL

    if not CPU_KERNEL:  # the refusal itself is tested in test_cpu_attention.py and test_cli.py
        pytest.skip("the CPU attention kernel needs AVX-512 or AVX2")
    cpu_attention.build()
    return cpu_attention


@pytest.fixture(scope="session")
def tiny_gigaspeech(tmp_path_factory):
    """The anhnct/audioldm2_gigaspeech shape (text-to-speech: VITS, UNet [[None, lm]]); its tokenizer blanks."""
    return make_tiny(tmp_path_factory.mktemp("tiny") / "gigaspeech", variant="gigaspeech", seed=2)


@pytest.fixture(scope="session")
def tiny_ljspeech(tmp_path_factory):
    """The anhnct/audioldm2_ljspeech shape; its tokenizer does not blank (the end token lands on the first pad)."""
    return make_tiny(tmp_path_factory.mktemp("tiny") / "ljspeech", variant="ljspeech", seed=3)
