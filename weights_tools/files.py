"""What the subcommands share about checkpoint folders on disk: resolving a folder or hub repo id, finding a
component's weight files (either format, sharded or not), reading tensor shapes without their data, and
writing an output folder atomically.

Unlike ``audioldm2_core.loading.Checkpoint``, nothing here requires a pipeline this stack supports: the
tools also work on the ``anhnct/*`` speech checkpoints (VITS text encoder) and on half-broken folders.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from audioldm2_core.errors import CheckpointError
from audioldm2_core.loading import hub_snapshot, read_weights

from . import ToolError

# Weight file stems in the order audioldm2_core.loading prefers them: safetensors, then pickles.
SAFETENSORS_STEMS = ("diffusion_pytorch_model", "model")
PICKLE_STEMS = ("diffusion_pytorch_model", "pytorch_model")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx")


@dataclass(frozen=True)
class WeightSet:
    """One component's weights in one format: the files, and the shard index when there is one."""

    format: str  # "safetensors" or "pickle"
    stem: str  # "diffusion_pytorch_model", "model" or "pytorch_model"
    files: tuple[Path, ...]
    index: Path | None


def resolve_folder(path_or_repo_id: str, revision: str | None = None) -> Path:
    """A local folder as it is, or a hub repo id downloaded (or found in the cache) with the files we use."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ToolError(f"{path_or_repo_id}: --revision only applies to hub repo ids")
        return path
    if path.exists():
        raise ToolError(f"{path_or_repo_id}: not a folder")
    if path_or_repo_id.count("/") != 1 or path_or_repo_id.startswith((".", "/", "~")):
        raise ToolError(f"{path_or_repo_id}: no such folder, and not a hub repo id of the form 'owner/name'")
    return hub_snapshot(path_or_repo_id, revision)


def find_weights(folder: Path) -> WeightSet | None:
    """The weights of a component folder, safetensors preferred (as the loaders prefer them); None if none."""
    for fmt, stems, suffix in (
        ("safetensors", SAFETENSORS_STEMS, ".safetensors"),
        ("pickle", PICKLE_STEMS, ".bin"),
    ):
        for stem in stems:
            index = folder / f"{stem}{suffix}.index.json"
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text()).get("weight_map")
                except (OSError, ValueError, AttributeError) as e:
                    raise CheckpointError(f"{index}: cannot read the shard index ({e})") from e
                if not isinstance(weight_map, dict) or not weight_map:
                    raise CheckpointError(f"{index}: no weight_map")
                shards = tuple(folder / s for s in sorted(set(weight_map.values())))
                missing = [s.name for s in shards if not s.is_file()]
                if missing:
                    raise CheckpointError(f"{index}: shard files missing: {missing}")
                return WeightSet(fmt, stem, shards, index)
            if (folder / f"{stem}{suffix}").is_file():
                return WeightSet(fmt, stem, (folder / f"{stem}{suffix}",), None)
    return None


def is_weight_file(path: Path) -> bool:
    """Weights in any format (or a shard index): what ``convert`` does not copy as it is."""
    return path.name.endswith(WEIGHT_SUFFIXES) or (
        path.name.endswith(".index.json") and any(s in path.name for s in WEIGHT_SUFFIXES)
    )


def tensor_info(files: tuple[Path, ...] | list[Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{key: (shape, dtype name)}`` of weight files, reading headers only (pickles: memory-mapped)."""
    from safetensors import safe_open

    info: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in files:
        if path.suffix == ".safetensors":
            try:
                with safe_open(path, framework="pt", device="cpu") as f:
                    for key in f.keys():
                        sl = f.get_slice(key)
                        info[key] = (
                            tuple(sl.get_shape()),
                            _SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype()),
                        )
            except Exception as e:  # safetensors' own error type for bad headers
                raise CheckpointError(f"{path}: cannot read safetensors header ({e})") from e
        else:
            for key, t in read_weights([path]).items():
                info[key] = (tuple(t.shape), str(t.dtype).removeprefix("torch."))
    return info


_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def dtype_of(name: str) -> torch.dtype:
    """``"float16"`` -> ``torch.float16``."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ToolError(f"unknown dtype {name!r}")
    return dtype


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under a folder (hub cache symlinks followed to their blobs; dot-folders skipped)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        total += sum(os.stat(os.path.join(dirpath, f)).st_size for f in filenames)
    return total


def human_bytes(n: int | float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


@contextlib.contextmanager
def atomic_output(out: Path, force: bool) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``out``; on success it becomes ``out`` (replacing it only with
    ``force``), on failure it is removed. A reader never sees a half-written ``out``."""
    out = Path(out).expanduser().absolute()
    if out.exists() and not force:
        raise ToolError(f"{out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():  # --force: move the old one aside first, so the swap is two renames
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old / "x")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
