"""Fine-tuning on a GPU: ``pytest -m gpu`` on a CUDA machine; never part of CI, which has no GPU.

A short LoRA run on CUDA in float32 and under each autocast (bfloat16, float16 with its gradient scaler): it
finishes, its loss is finite and its first step's loss is the CPU run's (the same draws: they are made on the
CPU); the LoRA it writes loads into a CUDA pipeline; a full fine-tune with gradient checkpointing runs too.
"""

from __future__ import annotations

import json

import pytest
import torch

from audioldm2_core import AudioLDM2
from tests.test_train import items_file, train, write_clips

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda():
    if not torch.cuda.is_available():
        pytest.fail("pytest -m gpu runs the GPU checks: this machine has no CUDA device")
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 parity
    yield torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def losses(run) -> list[float]:
    return [
        r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_a_short_run_on_cuda(tiny_base, cuda, tmp_path, precision):
    clips = write_clips(tmp_path / "clips")
    data = items_file(clips, tmp_path / "items.jsonl")
    flags = ["--steps", "3", "--batch-size", "4", "--lr", "1e-3", "--mixed-precision", precision]
    assert train(tiny_base, data, tmp_path / "cuda", tmp_path / "cache", *flags, "--device", "cuda") == 0
    assert train(tiny_base, data, tmp_path / "cpu", tmp_path / "cache", "--steps", "1", "--batch-size", "4",
                 "--device", "cpu") == 0  # fmt: skip
    got, want = losses(tmp_path / "cuda"), losses(tmp_path / "cpu")
    assert len(got) == 3 and all(torch.isfinite(torch.tensor(got)))
    tolerance = 1e-4 if precision == "no" else 3e-2  # autocast rounds the forward to 8 or 11 bits
    assert abs(got[0] - want[0]) <= tolerance * want[0], (got, want)
    pipe = AudioLDM2.from_pretrained(tiny_base, device=cuda)
    pipe.load_lora(tmp_path / "cuda")
    out = pipe("a beep", num_inference_steps=2, audio_length_in_s=0.64, output_type="pt").audios
    assert out.is_cuda and torch.isfinite(out).all()


def test_full_fine_tune_with_checkpointing_on_cuda(tiny_base, cuda, tmp_path):
    clips = write_clips(tmp_path / "clips")
    data = items_file(clips, tmp_path / "items.jsonl")
    flags = [
        "--full",
        "--gradient-checkpointing",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--mixed-precision",
        "bf16",
    ]
    assert train(tiny_base, data, tmp_path / "run", tmp_path / "cache", *flags, "--device", "cuda") == 0
    assert (tmp_path / "run" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert all(torch.isfinite(torch.tensor(losses(tmp_path / "run"))))
