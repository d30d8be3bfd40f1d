"""Test helpers: one reference component saved in the official layout, then edited or read back."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from audioldm2_core.loading import COMPONENTS


def perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Move 0-D/1-D parameters (norm scales, biases, SOS/EOS vectors) off their 0/1 init so swaps show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim <= 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.float().eval()


def write_component(root: Path, component: str, model) -> Path:
    """A pipeline folder holding only ``component``, written by the reference's own ``save_pretrained``;
    model_index.json lists every component (the other folders exist, empty)."""
    root = Path(root)
    model.save_pretrained(root / component, safe_serialization=True)
    index = {
        "_class_name": "AudioLDM2Pipeline",
        **{c: ["x", classes[0]] for c, classes in COMPONENTS.items()},
    }
    (root / "model_index.json").write_text(json.dumps(index))
    for c in COMPONENTS:
        (root / c).mkdir(exist_ok=True)
    return root


def edit_weights(src: Path, dst: Path, component: str, edit: Callable[[dict], None]) -> Path:
    """Copy a checkpoint folder and change the tensors of one component's safetensors file."""
    shutil.copytree(src, dst)
    path = dst / component / "model.safetensors"
    if not path.is_file():
        path = dst / component / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})
    return dst


class TensorReadSpy:
    """Wraps the loader's safetensors reader to record which keys are listed (the file's header) and which
    tensors are read (mapped and handed back; the rest of the file is never touched)."""

    def __init__(self, monkeypatch):
        from audioldm2_core import loading

        self.listed: list[str] = []
        self.read: list[str] = []
        real_read, spy = loading._read_safetensors, self

        def read(path, select):
            spy.listed.extend(loading.safetensors_keys(path))
            state = real_read(path, select)
            spy.read.extend(state)
            return state

        monkeypatch.setattr(loading, "_read_safetensors", read)
