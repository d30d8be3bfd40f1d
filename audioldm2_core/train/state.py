"""The run folder: its settings, its checkpoints, its metrics log and its outputs, each written so that a kill at
any moment leaves something a rerun of the same command resumes from.

    run/settings.json                      the settings that define the result (``TrainOptions.settings`` and the
                                           dataset's fingerprint): a rerun with other ones is refused, naming one
    run/checkpoint-<step>/                 trained.safetensors, ema.safetensors, optimizer.pt, state.json: built as
                                           a hidden folder (each file fsynced), then renamed into place, so a
                                           checkpoint folder is always whole; the oldest beyond ``keep`` removed
    run/metrics.jsonl                      one line per step (and per validation); cut back to the checkpoint a
                                           rerun resumes from, so that no step is counted twice
    run/pytorch_lora_weights.safetensors   the LoRA, diffusers' format (``lora.save_lora``), or with --full
    run/pipeline/                          a whole pipeline folder in the hub layout: the new UNet, the other
                                           components linked (or copied) from the base checkpoint

Every rerun first removes what a killed one can leave half-made: hidden ``.checkpoint-*`` / ``.pipeline*``
folders and temp files (``outputs.write_atomic``'s).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import UsageError
from ..loading import COMPONENTS
from ..outputs import write_atomic

__all__ = [
    "SETTINGS",
    "METRICS",
    "check_settings",
    "write_settings",
    "remove_leftovers",
    "latest_checkpoint",
    "write_durable",
    "save_checkpoint",
    "load_checkpoint",
    "MetricsLog",
    "write_pipeline",
]

SETTINGS = "settings.json"
METRICS = "metrics.jsonl"
_CHECKPOINT = "checkpoint-"


def check_settings(folder: Path, settings: dict[str, Any]) -> None:
    """Refuse a run folder started with other settings, naming the first that differs."""
    path = folder / SETTINGS
    if not path.is_file():
        return
    try:
        before = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{path} cannot be read ({e}); use another output folder") from e
    for name, value in settings.items():
        if before.get(name) != value:
            what = "the dataset (its clips or captions) differs" if name == "data" else (
                f"the run there was started with {name}={before.get(name)!r}, not {value!r}")  # fmt: skip
            raise UsageError(
                f"{folder}: {what}: rerun with the same settings, or use another output folder", name
            )


def write_settings(folder: Path, settings: dict[str, Any]) -> None:
    if not (folder / SETTINGS).is_file():
        write_atomic(folder / SETTINGS, (json.dumps(settings, indent=2, sort_keys=True) + "\n").encode())


def remove_leftovers(folder: Path) -> None:
    """What a killed run leaves half-made: hidden checkpoint and pipeline folders, temp files."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name.startswith((".checkpoint-", ".pipeline")) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file():
            entry.unlink(missing_ok=True)


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    found = []
    for entry in folder.glob(f"{_CHECKPOINT}*"):
        suffix = entry.name.removeprefix(_CHECKPOINT)
        if suffix.isdigit() and (entry / "state.json").is_file():
            found.append((int(suffix), entry))
    return sorted(found)


def latest_checkpoint(folder: Path) -> Path | None:
    found = _checkpoints(folder) if folder.is_dir() else []
    return found[-1][1] if found else None


def write_durable(path: Path, data: bytes) -> None:
    """A file written and fsynced (inside a folder that is not in place yet)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tensors(state: dict[str, Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in state.items()})


def save_checkpoint(folder: Path, step: int, trained: dict[str, Tensor], ema: dict[str, Tensor] | None,
                    optimizer: dict[str, Any], extra: dict[str, Any], keep: int) -> Path:  # fmt: skip
    """``folder/checkpoint-<step>/``, whole or not at all; then only the newest ``keep`` checkpoints stay."""
    final = folder / f"{_CHECKPOINT}{step}"
    if final.is_dir():
        return final
    tmp = folder / f".{_CHECKPOINT}{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    buffer = io.BytesIO()
    torch.save(optimizer, buffer)
    write_durable(tmp / "trained.safetensors", _tensors(trained))
    if ema is not None:
        write_durable(tmp / "ema.safetensors", _tensors(ema))
    write_durable(tmp / "optimizer.pt", buffer.getvalue())
    write_durable(tmp / "state.json", json.dumps({"step": step, **extra}, indent=2).encode())
    _fsync_folder(tmp)
    os.rename(tmp, final)
    _fsync_folder(folder)
    for _, old in _checkpoints(folder)[:-keep]:
        # out of sight first: a kill mid-removal leaves no half checkpoint
        hidden = old.with_name(f".{old.name}")
        os.rename(old, hidden)
        shutil.rmtree(hidden, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Tensor] | None, dict]:
    """(state.json, trained weights, EMA weights or None, optimizer state) of a checkpoint folder."""
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    ema = load_file(path / "ema.safetensors") if (path / "ema.safetensors").is_file() else None
    optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    return state, load_file(path / "trained.safetensors"), ema, optimizer


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, each appended with one write; lines after the step a run
    resumes from are cut off first (they will be logged again)."""

    def __init__(self, folder: Path, resumed_step: int):
        self.path = folder / METRICS
        if self.path.is_file():
            kept = []
            for line in self.path.read_bytes().split(b"\n")[:-1]:  # a torn last line is dropped
                try:
                    if json.loads(line).get("step", 0) <= resumed_step:
                        kept.append(line + b"\n")
                except (json.JSONDecodeError, AttributeError):
                    continue
            write_atomic(self.path, b"".join(kept))

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "ab") as f:
            f.write((json.dumps(record) + "\n").encode())

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_bytes().split(b"\n")[:-1] if line.strip()]


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link to the file (a hub snapshot's link resolved to its blob), else a copy."""
    src = src.resolve()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_pipeline(folder: Path, base_root: Path, unet: dict[str, Tensor]) -> Path:
    """``folder/pipeline/``: the base checkpoint's folder with ``unet`` as its UNet's weights, in the hub layout
    (diffusers' ``from_pretrained`` and ``AudioLDM2.from_pretrained`` both load it); built hidden, then renamed
    into place (an older one replaced)."""
    final, tmp, old = folder / "pipeline", folder / ".pipeline-new", folder / ".pipeline-old"
    for path in (tmp, old):
        shutil.rmtree(path, ignore_errors=True)
    tmp.mkdir()
    _link_or_copy(base_root / "model_index.json", tmp / "model_index.json")
    for component in COMPONENTS:
        (tmp / component).mkdir()
        for src in sorted((base_root / component).rglob("*")):
            dst = tmp / component / src.relative_to(base_root / component)
            if src.is_dir():
                dst.mkdir(exist_ok=True)
            elif component != "unet" or src.name == "config.json":
                _link_or_copy(src, dst)
    from safetensors.torch import save

    weights = save(
        {k: v.detach().float().cpu().contiguous() for k, v in unet.items()}, metadata={"format": "pt"}
    )
    write_durable(tmp / "unet" / "diffusion_pytorch_model.safetensors", weights)
    _fsync_folder(tmp / "unet")
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final
