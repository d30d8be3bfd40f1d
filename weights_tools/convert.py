"""``audioldm2-weights convert SRC OUT [--dtype float16|bfloat16|float32] [--force]``: rewrite a checkpoint.

SRC is a pipeline folder or a hub repo id; OUT becomes a complete pipeline folder in which every component's
weights are safetensors: pickled ``.bin`` files (the only format of the ``anhnct/*`` speech repos) are read
with ``torch.load(weights_only=True)``, which runs no code from the file, and written as safetensors; files
already in safetensors are rewritten (and cast, with ``--dtype``). Everything else (``model_index.json``,
configs, tokenizers, READMEs) is copied as it is, so OUT loads wherever SRC did.

- Names: ``diffusion_pytorch_model.bin`` -> ``diffusion_pytorch_model.safetensors``, ``pytorch_model.bin``
  -> ``model.safetensors`` (transformers' names); a sharded component keeps its sharding, with a
  ``*.safetensors.index.json`` of the new names and sizes.
- One format per component, the one the loaders would read (safetensors first); other weight files of a
  component (the second format, ``fp16`` variants) and weight files outside component folders are not
  carried over, and are listed.
- Shared storage: a pickle may hold one tensor under two names (T5's ``shared.weight`` and
  ``encoder.embed_tokens.weight``); safetensors refuses shared storage, so the second name gets a copy.
  Both names are kept: the output holds the keys the input held.
- ``--dtype``: floating tensors are cast (integer buffers are not), and the ``torch_dtype`` / ``dtype``
  fields of the transformers configs are set to match, as ``save_pretrained`` would write them. As
  transformers does for T5 in float16 (``_keep_in_fp32_modules``), the ``wo`` feed-forward weights of a
  ``T5EncoderModel`` stay float32 there: Flan-T5 overflows float16 in them. Without ``--dtype`` tensors are
  written bit for bit as read.

OUT is written to a temporary folder beside it and renamed into place at the end; an existing OUT is an
error unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from audioldm2_core.loading import read_weights

from . import ToolError
from .files import (
    WeightSet,
    atomic_output,
    dtype_of,
    find_weights,
    human_bytes,
    is_weight_file,
    resolve_folder,
)

DTYPES = ("float32", "float16", "bfloat16")
# (model class, dtype) -> key suffixes kept in float32, as transformers' _keep_in_fp32_modules does.
KEEP_FLOAT32: dict[tuple[str, torch.dtype], tuple[str, ...]] = {
    ("T5EncoderModel", torch.float16): ("DenseReluDense.wo.weight",),
}


@dataclass
class ConvertReport:
    out: Path
    converted: dict[str, list[str]] = field(default_factory=dict)  # component -> files written
    copied: int = 0  # other files copied as they are
    skipped: list[str] = field(default_factory=list)  # weight files not carried over
    bytes_written: int = 0


def output_name(src: Path, weights: WeightSet) -> str:
    """The safetensors file name for a source weight file (shards keep their numbering)."""
    name = src.name
    if weights.format == "safetensors":
        return name
    stem = "model" if weights.stem == "pytorch_model" else weights.stem
    return stem + name[len(weights.stem) :].removesuffix(".bin") + ".safetensors"


def prepare(
    state: dict[str, torch.Tensor], dtype: torch.dtype | None, keep_float32: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """Cast floating tensors to ``dtype`` (except keys ending in ``keep_float32``), and give every tensor
    storage of its own and a contiguous layout, as safetensors requires."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in state.items():
        if dtype is not None and t.is_floating_point():
            t = t.to(torch.float32 if key.endswith(keep_float32) else dtype)
        ptr = t.untyped_storage().data_ptr()
        if (ptr in seen and t.numel() > 0) or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)  # tied weights: one copy per name
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _set_dtype_fields(config: object, name: str) -> None:
    """Set every ``torch_dtype`` / ``dtype`` string field of a (nested) transformers config to ``name``."""
    if isinstance(config, dict):
        for key, value in config.items():
            if key in ("torch_dtype", "dtype") and isinstance(value, str):
                config[key] = name
            else:
                _set_dtype_fields(value, name)


def convert_component(
    src: Path, dst: Path, weights: WeightSet, dtype: torch.dtype | None, class_name: str | None
) -> tuple[list[str], int]:
    """Write one component's weights as safetensors into ``dst``; return the file names and bytes written."""
    keep = KEEP_FLOAT32.get((class_name or "", dtype), ()) if dtype is not None else ()
    written, weight_map, total = [], {}, 0
    for path in weights.files:
        state = prepare(read_weights([path]), dtype, keep)
        name = output_name(path, weights)
        save_file(state, dst / name, metadata={"format": "pt"})  # transformers requires the "format" field
        written.append(name)
        weight_map.update({k: name for k in state})
        total += sum(t.numel() * t.element_size() for t in state.values())
    if weights.index is not None:
        stem = "model" if weights.stem == "pytorch_model" else weights.stem
        index_name = f"{stem}.safetensors.index.json"
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / index_name).write_text(json.dumps(index, indent=2) + "\n")
        written.append(index_name)
    return written, total


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    force: bool = False,
    revision: str | None = None,
) -> ConvertReport:
    """Rewrite the checkpoint ``src`` (folder or repo id) into ``out``; see the module docstring."""
    root = resolve_folder(str(src), revision).resolve()
    out = Path(out).expanduser().absolute()
    if out.resolve() == root or root in out.resolve().parents or out.resolve() in root.parents:
        raise ToolError(f"{out}: the output must not be the input folder, inside it, or contain it")
    if not (root / "model_index.json").is_file():
        raise ToolError(f"{src}: no model_index.json in {root}; not a diffusers pipeline")
    if dtype is not None and dtype not in DTYPES:
        raise ToolError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    torch_dtype = dtype_of(dtype) if dtype is not None else None
    try:
        index = json.loads((root / "model_index.json").read_text())
    except ValueError as e:
        raise ToolError(f"{root / 'model_index.json'}: cannot read JSON ({e})") from e

    # Each component folder's weight set, chosen before anything is written (errors come first).
    components = {
        d.name: w for d in sorted(root.iterdir()) if d.is_dir() and (w := find_weights(d)) is not None
    }
    report = ConvertReport(out=out)
    with atomic_output(out, force) as tmp:
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root)
            if any(part.startswith(".") for part in rel.parts) or path.is_dir():
                continue  # .cache/ of local_dir downloads, .git/, .gitattributes
            if is_weight_file(path):
                chosen = components.get(rel.parts[0]) if len(rel.parts) == 2 else None
                if chosen is None or (path not in chosen.files and path != chosen.index):
                    report.skipped.append(str(rel))
                continue
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if dtype is not None and path.name == "config.json":
                config = json.loads(path.read_text())
                _set_dtype_fields(config, dtype)
                target.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            else:
                shutil.copyfile(path, target)  # follows hub-cache symlinks to their blobs
            report.copied += 1
        for name, weights in components.items():
            entry = index.get(name)
            class_name = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
            (tmp / name).mkdir(exist_ok=True)
            files, nbytes = convert_component(root / name, tmp / name, weights, torch_dtype, class_name)
            report.converted[name] = files
            report.bytes_written += nbytes
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="checkpoint folder or hub repo id")
    p.add_argument("out", help="output folder (must not exist, unless --force)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="cast floating weights (default: keep)")
    p.add_argument("--revision", default=None, help="hub revision (repo ids only)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    r = convert_checkpoint(args.src, args.out, dtype=args.dtype, force=args.force, revision=args.revision)
    for name, files in r.converted.items():
        print(f"{name:<18} {', '.join(files)}")
    if r.skipped:
        print(f"not carried over: {', '.join(r.skipped)}")
    print(f"{r.out}: {human_bytes(r.bytes_written)} of weights, {r.copied} other files copied")
    return 0
