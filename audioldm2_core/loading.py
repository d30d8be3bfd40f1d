"""Checkpoint resolution and strict weight loading.

A checkpoint is a diffusers pipeline folder: ``model_index.json`` naming each component's class, and one
folder per component with a ``config.json`` (``scheduler_config.json``, ``preprocessor_config.json``) and
its weights. It is found either as a local folder or as a hub repo id, which goes through
``huggingface_hub.snapshot_download`` so the hub cache, ``HF_HOME``, ``HF_HUB_OFFLINE`` and ``HF_TOKEN``
behave as every huggingface_hub user expects. Only what this stack reads is fetched: configs, tokenizer
files and one weight format per component (safetensors; pickled ``.bin`` only where a component has no
safetensors, as in the ``anhnct/*`` TTS repos).

Loading is strict: a module is built on the meta device, its tensors come from the file through
``load_state_dict(strict=True, assign=True)``, and a missing, unexpected or mis-shaped key, or a file that
cannot be read, is an error naming the file and the keys. Nothing is ever left randomly initialised.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import mmap
import os
import re
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.overrides import TorchFunctionMode

from .config import ConfigFile
from .errors import CheckpointError, UsageTypeError, WeightsError

__all__ = [
    "Checkpoint",
    "open_checkpoint",
    "hub_patterns",
    "hub_snapshot",
    "hub_errors",
    "read_weights",
    "load_strict",
    "release_pages",
    "empty_init",
    "COMPONENTS",
]


# Component -> the classes of model_index.json we implement. What is not here is an error at open time.
COMPONENTS: dict[str, tuple[str, ...]] = {
    "text_encoder": ("ClapModel",),
    "text_encoder_2": ("T5EncoderModel", "VitsModel"),  # VitsModel: the speech checkpoints' phoneme encoder
    "projection_model": ("AudioLDM2ProjectionModel",),
    # GPT2LMHeadModel: what a pipeline built for transformers 5 saves (the hub has GPT2Model)
    "language_model": ("GPT2Model", "GPT2LMHeadModel"),
    "unet": ("AudioLDM2UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "vocoder": ("SpeechT5HifiGan",),
    "scheduler": ("DDIMScheduler", "DPMSolverMultistepScheduler"),
    "tokenizer": ("RobertaTokenizer", "RobertaTokenizerFast"),
    "tokenizer_2": ("T5Tokenizer", "T5TokenizerFast", "VitsTokenizer"),
    "feature_extractor": ("ClapFeatureExtractor",),
}
PIPELINE_CLASS = "AudioLDM2Pipeline"

_CONFIG_NAMES = ("config.json", "scheduler_config.json", "preprocessor_config.json")
# Weight file stems: diffusers names its files diffusion_pytorch_model.*, transformers model.* / pytorch_model.*
_SAFETENSORS = ("diffusion_pytorch_model.safetensors", "model.safetensors")
_PICKLES = ("diffusion_pytorch_model.bin", "pytorch_model.bin")
_MODEL_COMPONENTS = tuple(
    c for c in COMPONENTS if c not in ("scheduler", "tokenizer", "tokenizer_2", "feature_extractor")
)
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


# ------------------------------------------------------------------------------------ the checkpoint


class Checkpoint:
    """A resolved checkpoint folder: its ``model_index.json`` checked, its components' files at hand."""

    def __init__(self, root: Path, source: str | None = None):
        self.root = Path(root)
        self.source = source or str(root)
        index_path = self.root / "model_index.json"
        if not index_path.is_file():
            raise CheckpointError(
                f"{self.source}: no model_index.json in {self.root}; not a diffusers pipeline"
            )
        self.index = _read_json(index_path)
        cls = self.index.get("_class_name")
        if cls != PIPELINE_CLASS:
            raise CheckpointError(f"{index_path}: pipeline class {cls!r} is not {PIPELINE_CLASS!r}")
        for component, allowed in COMPONENTS.items():
            entry = self.index.get(component)
            if not isinstance(entry, list) or len(entry) != 2:
                raise CheckpointError(f"{index_path}: component {component!r} is missing or malformed")
            if entry[1] not in allowed:
                raise CheckpointError(
                    f"{index_path}: component {component!r} has class {entry[1]!r}, which audioldm2_core does "
                    f"not support (supported: {', '.join(allowed)})"
                )
            if not (self.root / component).is_dir():
                raise CheckpointError(
                    f"{self.source}: component folder {component}/ is missing ({self.root})"
                )

        # A speech checkpoint pairs the VITS phoneme encoder with its own tokenizer; T5 with T5's.
        if (self.index["text_encoder_2"][1] == "VitsModel") != (
            self.index["tokenizer_2"][1] == "VitsTokenizer"
        ):
            raise CheckpointError(
                f"{index_path}: text_encoder_2 {self.index['text_encoder_2'][1]!r} does not go with tokenizer_2 "
                f"{self.index['tokenizer_2'][1]!r} (VitsModel needs VitsTokenizer, T5EncoderModel a T5 tokenizer)"
            )

    def __repr__(self) -> str:
        return f"Checkpoint({self.source!r})"

    @property
    def is_speech(self) -> bool:
        """A text-to-speech checkpoint (``anhnct/audioldm2_gigaspeech``, ``_ljspeech``): the second text encoder
        is VITS's phoneme encoder, fed the ``transcription``."""
        return self.index["text_encoder_2"][1] == "VitsModel"

    def folder(self, component: str) -> Path:
        if component not in COMPONENTS:
            raise KeyError(f"unknown component {component!r}")
        path = self.root / component
        if not path.is_dir():
            raise CheckpointError(f"{self.source}: component folder {component}/ is missing ({path})")
        return path

    def config(self, component: str) -> ConfigFile:
        """The parsed config file of a component (a dict that knows its path, for the config's errors)."""
        folder = self.folder(component)
        for name in _CONFIG_NAMES:
            if (folder / name).is_file():
                return ConfigFile(_read_json(folder / name), folder / name)
        raise CheckpointError(
            f"{self.source}: {component}/ has no config file ({' or '.join(_CONFIG_NAMES)})"
        )

    def weight_files(self, component: str) -> list[Path]:
        """The weight file(s) of a component: safetensors (sharded or not), else a pickle."""
        folder = self.folder(component)
        for name in _SAFETENSORS:
            index = folder / f"{name}.index.json"
            if index.is_file():
                shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
                missing = [s for s in shards if not (folder / s).is_file()]
                if not shards or missing:
                    raise WeightsError(f"{index}: shard files missing: {missing or 'none listed'}")
                return [folder / s for s in shards]
            if (folder / name).is_file():
                return [folder / name]
        for name in _PICKLES:
            if (folder / name).is_file():
                return [folder / name]
        raise WeightsError(
            f"{self.source}: no weight file in {component}/ (looked for {', '.join(_SAFETENSORS + _PICKLES)})"
        )

    def read_weights(
        self, component: str, select: Callable[[str], bool] | None = None
    ) -> dict[str, torch.Tensor]:
        """Read a component's tensors; with ``select``, only the keys it accepts are read from disk."""
        return read_weights(self.weight_files(component), select)

    def weight_keys(self, component: str) -> list[str]:
        """All tensor names of a component's weights, without reading the tensors (safetensors)."""
        keys: list[str] = []
        for path in self.weight_files(component):
            if path.suffix == ".safetensors":
                keys += safetensors_keys(path)
            else:
                keys += read_weights([path]).keys()
        return keys


def open_checkpoint(path_or_repo_id: str | os.PathLike, revision: str | None = None) -> Checkpoint:
    """Resolve a local pipeline folder or a hub repo id (optionally at a revision) to a :class:`Checkpoint`."""
    if not isinstance(path_or_repo_id, (str, os.PathLike)):
        raise UsageTypeError(
            f"checkpoint must be a folder path or a hub repo id, not {type(path_or_repo_id).__name__}"
        )
    name = os.fspath(path_or_repo_id)
    path = Path(name).expanduser()
    if path.is_dir():
        if revision is not None:
            raise CheckpointError(f"{name}: a revision ({revision!r}) only applies to hub repo ids")
        return Checkpoint(path)
    if path.exists():
        raise CheckpointError(f"{name}: not a folder")
    if not _REPO_ID.match(name) or name.startswith((".", "/", "~")):
        raise CheckpointError(f"{name}: no such folder, and not a hub repo id of the form 'owner/name'")
    return Checkpoint(hub_snapshot(name, revision), source=name if revision is None else f"{name}@{revision}")


def hub_patterns(files: Iterable[str]) -> list[str]:
    """``allow_patterns`` for the files this stack uses, given the repo's file list.

    Configs and tokenizer files always; for weights, one format per component: safetensors (with a shard
    index if any) where the component has it, else the pickle. Variants (``*.fp16.safetensors``) are skipped.
    """
    files = set(files)
    patterns = ["model_index.json", "*/config.json", "*/scheduler_config.json", "*/preprocessor_config.json"]
    patterns += ["tokenizer/*", "tokenizer_2/*"]
    for component in _MODEL_COMPONENTS:
        for name in _SAFETENSORS:
            if f"{component}/{name}.index.json" in files:
                patterns += [f"{component}/{name}.index.json", f"{component}/*.safetensors"]
                break
            if f"{component}/{name}" in files:
                patterns.append(f"{component}/{name}")
                break
        else:
            patterns += [f"{component}/{name}" for name in _PICKLES if f"{component}/{name}" in files]
    return patterns


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None = None):
    """Turn the failures of fetching ``repo_id`` (huggingface_hub's errors, an unreachable hub, a full disk)
    into :class:`CheckpointError` with the one-line message of ``errors.explain``; anything else passes."""
    from .errors import explain

    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:
        message = explain(e, repo_id, revision)
        if message is None:
            raise
        raise CheckpointError(message) from e


def hub_snapshot(repo_id: str, revision: str | None = None, files: Iterable[str] | None = None) -> Path:
    """Download (or find in the hub cache) the files of ``repo_id`` that this stack uses; return the folder.

    ``files``: the repo's file list when the caller already has it; otherwise it is listed (offline, where
    nothing can be listed, both weight formats are taken from what the cache holds).
    """
    import huggingface_hub
    from huggingface_hub import constants

    with hub_errors(repo_id, revision):
        if files is None and not constants.HF_HUB_OFFLINE:
            files = huggingface_hub.list_repo_files(repo_id, revision=revision)
        patterns = (
            hub_patterns(files)
            if files is not None
            else hub_patterns([])
            + [f"{c}/{n}" for c in _MODEL_COMPONENTS for n in _SAFETENSORS + _PICKLES]
            + ["*/*.safetensors.index.json", "*/*.safetensors"]
        )
        folder = huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    return Path(folder)


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


# ----------------------------------------------------------------------------------------- weights


def _unreadable(path: Path, error: Exception, key: str | None = None) -> WeightsError:
    where = f"{key}: " if key is not None else ""
    return WeightsError(f"{path}: cannot read safetensors file, truncated or corrupt ({where}{error})")


@contextlib.contextmanager
def _safe_open(path: Path):
    """``safetensors.safe_open``, with its errors as :class:`WeightsError` naming the file.

    Opening checks the header against the file's size (the tensors' bytes must cover the data section
    exactly), so a truncated file is refused here, before anything is mapped, rather than crashing the
    process (SIGBUS) when a page past its end is first touched.
    """
    try:
        f = safe_open(path, framework="pt")
    except (SafetensorError, OSError) as e:
        raise _unreadable(path, e) from e
    with f:
        yield f


def safetensors_keys(path: Path) -> list[str]:
    """Tensor names of a safetensors file, from its header only."""
    with _safe_open(path) as f:
        return list(f.keys())


# safetensors dtype names -> torch dtypes (the ones a diffusers/transformers checkpoint can hold)
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_safetensors(path: Path, select: Callable[[str], bool] | None) -> dict[str, torch.Tensor]:
    """The selected tensors of a safetensors file, as views of one private memory map of the file.

    ``safe_open`` reads and checks the header; the views are made here rather than by ``get_tensor``, which
    costs several times as much per tensor (``benchmarks/RESULTS.md``). Where each tensor lies follows from the sizes of those before it, in the data section that
    follows the header: the format leaves no gap between tensors, which ``safe_open`` checks.

    A map costs nothing up front (no copy, no allocation); pages come from the page cache, shared with every
    other process using the file, when first touched; tensors that ``select`` rejects are never read; and the
    map goes with the last tensor that views it. It is copy-on-write: an in-place change to a weight changes
    this process's copy of that page, never the file. Once ``load_strict`` holds a copy of a tensor (another
    dtype or device), it hands that tensor's pages back (``release_pages``).
    """
    layout, end = [], 0  # (key, dtype, shape, offset in the data section, bytes) of the selected tensors
    with _safe_open(path) as f:
        for key in f.offset_keys():
            info = f.get_slice(key)
            dtype, shape = _DTYPES.get(info.get_dtype()), tuple(info.get_shape())
            if dtype is None:
                raise WeightsError(f"{path}: {key}: tensor type {info.get_dtype()} is not supported")
            nbytes = math.prod(shape) * dtype.itemsize
            if select is None or select(key):
                layout.append((key, dtype, shape, end, nbytes))
            end += nbytes
    if not layout:
        return {}
    try:
        with open(path, "rb") as file:
            mm = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as e:
        raise _unreadable(path, e) from e
    start = 8 + int.from_bytes(mm[:8], "little")  # the header's length, then the header
    if start + end != len(mm):  # changed since safe_open read it
        raise _unreadable(path, f"file of {len(mm)} bytes, its header says {start + end}")
    _MAPS[mm] = torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr()
    state = {}
    for key, dtype, shape, offset, nbytes in layout:
        offset += start
        if nbytes == 0:
            state[key] = torch.empty(shape, dtype=dtype)
        elif offset % dtype.itemsize:  # misaligned (not written by safetensors itself): copy instead
            raw = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=offset)
            state[key] = raw.clone().view(dtype).view(shape)
        else:
            state[key] = torch.frombuffer(
                mm, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset
            ).view(shape)
    return state


# The maps ``_read_safetensors`` made, with their addresses; an entry goes with its map.
_MAPS: weakref.WeakKeyDictionary[mmap.mmap, int] = weakref.WeakKeyDictionary()


def release_pages(t: torch.Tensor) -> None:
    """Drop from this process the pages of a file map that lie wholly under ``t``'s bytes.

    For a tensor loaded as a copy in another dtype or on another device: without this, the file's pages it was
    read from stay in the process (its RSS) until the whole map goes, that is until the last tensor of the
    file is loaded, so a bfloat16 load would peak at its copies plus the whole float32 file. Only pages of a private map of an unchanged file are
    dropped, and only those no other tensor shares: read again, such a page comes back from the file as it
    was. Elsewhere (a tensor of a pickle, or not from a file) this does nothing.
    """
    if t.device.type != "cpu" or not t.is_contiguous() or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start, end = t.data_ptr(), t.data_ptr() + t.nbytes
    for mm, base in list(_MAPS.items()):
        if base <= start and end <= base + len(mm):
            first = -(-(start - base) // mmap.PAGESIZE) * mmap.PAGESIZE
            last = (end - base) // mmap.PAGESIZE * mmap.PAGESIZE
            if last > first:
                mm.madvise(mmap.MADV_DONTNEED, first, last - first)
            return


def read_weights(
    paths: Path | str | list[Path], select: Callable[[str], bool] | None = None
) -> dict[str, torch.Tensor]:
    """Read tensors from safetensors files (or pickles, through ``torch.load(weights_only=True)``).

    safetensors tensors are memory-mapped (see ``_read_safetensors``); ``select`` is consulted before a
    tensor is touched, so what it rejects is never read from disk.
    """
    if isinstance(paths, (str, Path)):
        paths = [Path(paths)]
    state: dict[str, torch.Tensor] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise WeightsError(f"{path}: weight file is missing")
        if path.suffix == ".safetensors":
            with gc_paused():
                state.update(_read_safetensors(path, select))
        else:
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise WeightsError(f"{path}: cannot read pickled weights safely ({e})") from e
            if not isinstance(loaded, dict):
                raise WeightsError(f"{path}: expected a state dict, found {type(loaded).__name__}")
            state.update({k: v for k, v in loaded.items() if select is None or select(k)})
    return state


def _key_list(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def check_keys(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise :class:`WeightsError` naming every missing, unexpected and mis-shaped key."""
    expected = module.state_dict()
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(expected.keys() & state.keys())
        if state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_key_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_key_list(unexpected)}")
    if shapes:
        problems.append(f"mis-shaped keys: {'; '.join(shapes[:12])}")
    if problems:
        raise WeightsError(f"{source}: weights do not match {type(module).__name__}: " + " | ".join(problems))


@contextlib.contextmanager
def gc_paused():
    """Pause Python's cyclic garbage collector. Building and filling a model's thousands of small modules
    allocates enough objects to trigger it over and over, each time scanning every object torch has
    created, with nothing to collect: that was a third of the load time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# What the layers' ``reset_parameters`` call to write their initial values: torch.nn.init's functions that
# take part in torch's function overrides, and the tensor methods that the others (ones_, zeros_) use.
_INITIALISERS = frozenset(
    {
        nn.init.kaiming_uniform_,
        nn.init.uniform_,
        nn.init.normal_,
        nn.init.constant_,
        torch.Tensor.uniform_,
        torch.Tensor.normal_,
        torch.Tensor.fill_,
        torch.Tensor.zero_,
    }
)


class _SkipInit(TorchFunctionMode):
    """Return a meta tensor given to an initialiser untouched: it has no data to write."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _INITIALISERS:
            tensor = args[0] if args else kwargs["tensor"]
            if tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


@contextlib.contextmanager
def empty_init():
    """Build modules on the meta device, where a tensor has a shape and a dtype but no data, with their
    initialisation skipped: every weight is about to be replaced by the file's (``load_strict``).

    On the meta device initialising would be wasted work only, but for ``normal_`` (``nn.Embedding``): its
    meta kernel is a Python reference whose first use imports ``torch._dynamo``, most of a second. The
    initialisers are skipped by a torch function mode, as ``torch.device("meta")`` is one: it applies to this
    thread only, and ``torch.nn.init`` is left as it is for everyone else.
    """
    with torch.device("meta"), _SkipInit(), gc_paused():
        yield


def load_strict(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Fill a module built on the meta device with ``state``, strictly; cast floats to ``dtype``.

    ``load_state_dict(strict=True, assign=True)`` puts the file's tensors in place of the meta ones
    (parameters stay parameters, keeping ``requires_grad``). Where it refuses them, ``check_keys`` names the
    file and every missing, unexpected and mis-shaped key; it runs only then, since its own walk of the
    module would add half to the time of every successful call.
    """
    with gc_paused():
        loaded = {}
        for k, v in state.items():
            cast = dtype if dtype is not None and v.is_floating_point() else v.dtype
            loaded[k] = v.to(device=device, dtype=cast)
            if loaded[k] is not v:  # a copy: the file's pages under v are no longer needed
                release_pages(v)
        state = loaded
        try:
            module.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            check_keys(module, state, source)
            raise WeightsError(f"{source}: {e}") from e
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise WeightsError(f"{source}: tensors not filled from the file: {_key_list(left)}")
    return module.eval()
