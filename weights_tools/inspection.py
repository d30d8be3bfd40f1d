"""``audioldm2-weights inspect PATH_OR_REPO_ID [--json]``: what a checkpoint holds and whether we can load it.

Per component of ``model_index.json``: its library and class, a few key config fields, bytes on disk, and
for model components the weight file's tensor count, number of values (parameters plus the persistent
buffers the reference saves) and dtypes, read from the file headers; then what *our* modules make of it:
the components are loaded with the runtime loaders (strictly, in the file's dtype) and their tensor and
value counts reported, or the loader's error, which names the offending keys.

Our modules may use a subset of a file, on purpose: GPT-2 without its
token embedding, CLAP's text tower (``ClapTextEncoder``) and audio tower (``ClapAudio``, re-ranking) without
``logit_scale_a`` and two index tables. So "file" and "ours" counts differ there; both are shown.

Exit status 1 when a component does not load (or the checkpoint is not one ``audioldm2_core`` supports).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from audioldm2_core.clap_audio import load_clap_audio
from audioldm2_core.clap_text import load_clap_text
from audioldm2_core.config import feature_extractor_config, scheduler_config
from audioldm2_core.errors import CheckpointError
from audioldm2_core.gpt2 import load_gpt2
from audioldm2_core.loading import COMPONENTS, Checkpoint
from audioldm2_core.projection import load_projection
from audioldm2_core.t5 import load_t5
from audioldm2_core.tokenization import load_tokenizer
from audioldm2_core.unet import load_unet
from audioldm2_core.vae import load_vae, load_vae_encoder
from audioldm2_core.vits import load_vits
from audioldm2_core.vocoder import load_vocoder

from . import ToolError
from .files import find_weights, folder_bytes, human_bytes, numel, resolve_folder, tensor_info

# A few fields per component worth seeing at a glance (dotted: nested config dicts).
KEY_FIELDS: dict[str, tuple[str, ...]] = {
    "text_encoder": (
        "projection_dim",
        "text_config.hidden_size",
        "text_config.num_hidden_layers",
        "audio_config.hidden_size",
        "audio_config.depths",
    ),
    "text_encoder_2": (
        "d_model",
        "num_layers",
        "num_heads",
        "d_kv",
        "feed_forward_proj",
        # VITS (speech checkpoints)
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "window_size",
        "vocab_size",
    ),
    "language_model": ("n_embd", "n_layer", "n_head", "max_new_tokens"),
    "projection_model": (
        "text_encoder_dim",
        "text_encoder_1_dim",
        "langauge_model_dim",
        "use_learned_position_embedding",
    ),
    "unet": (
        "in_channels",
        "block_out_channels",
        "layers_per_block",
        "attention_head_dim",
        "cross_attention_dim",
        "transformer_layers_per_block",
    ),
    "vae": ("latent_channels", "block_out_channels", "scaling_factor"),
    "vocoder": ("model_in_dim", "sampling_rate", "upsample_rates", "upsample_initial_channel"),
    "scheduler": (
        "num_train_timesteps",
        "beta_schedule",
        "prediction_type",
        "timestep_spacing",
        "steps_offset",
    ),
    "feature_extractor": ("sampling_rate", "feature_size", "hop_length", "max_length_s"),
    "tokenizer": ("model_max_length",),
    "tokenizer_2": ("model_max_length", "add_blank", "normalize", "phonemize"),
}
_CONFIG_FILES = ("config.json", "scheduler_config.json", "preprocessor_config.json", "tokenizer_config.json")


def _load_text_encoder_2(ckpt: Checkpoint, dtype: torch.dtype) -> torch.nn.Module:
    """Flan-T5, or on a speech checkpoint the VITS phoneme encoder (the text encoder of its VitsModel)."""
    return (load_vits if ckpt.is_speech else load_t5)(ckpt, dtype)


# Our modules per model component: a file may fill more than one (CLAP: text and audio towers; the VAE:
# decoder and encoder).
LOADERS: dict[str, tuple[Callable[..., torch.nn.Module], ...]] = {
    "text_encoder": (load_clap_text, load_clap_audio),
    "text_encoder_2": (_load_text_encoder_2,),
    "projection_model": (load_projection,),
    "language_model": (load_gpt2,),
    "unet": (load_unet,),
    "vae": (load_vae, load_vae_encoder),
    "vocoder": (load_vocoder,),
}
# Components without weights: what reading them means to us.
READERS: dict[str, Callable[[Checkpoint], str]] = {
    "tokenizer": lambda ckpt: repr(load_tokenizer(ckpt, "tokenizer")),
    "tokenizer_2": lambda ckpt: repr(load_tokenizer(ckpt, "tokenizer_2")),
    "scheduler": lambda ckpt: type(scheduler_config(ckpt.config("scheduler"))).__name__,
    "feature_extractor": lambda ckpt: (
        type(feature_extractor_config(ckpt.config("feature_extractor"))).__name__
    ),
}


@dataclass
class ComponentReport:
    name: str
    library: str
    class_name: str
    config: dict[str, Any] = field(default_factory=dict)
    bytes_on_disk: int = 0
    weight_files: list[str] = field(default_factory=list)
    file_tensors: int | None = None  # tensors in the weight file(s)
    file_values: int | None = None  # their total number of values (parameters and saved buffers)
    file_dtypes: dict[str, int] = field(default_factory=dict)  # dtype -> tensors of it
    ours: str | None = None  # our module class(es), or what the component reads into
    ours_tensors: int | None = None  # tensors of our module(s)' state dicts
    ours_values: int | None = None
    loads: bool | None = None  # None: not checked (the checkpoint does not open)
    error: str | None = None


@dataclass
class CheckpointReport:
    checkpoint: str
    root: str
    pipeline: str
    bytes_on_disk: int
    opens: bool
    error: str | None
    components: list[ComponentReport]

    @property
    def ok(self) -> bool:
        return self.opens and all(c.loads for c in self.components)


def _config_summary(folder: Path, fields: tuple[str, ...]) -> dict[str, Any]:
    for name in _CONFIG_FILES:
        if (folder / name).is_file():
            try:
                config = json.loads((folder / name).read_text())
            except (OSError, ValueError):
                return {"error": f"{name} is not valid JSON"}
            break
    else:
        return {}
    out = {}
    for dotted in fields:
        value: Any = config
        for part in dotted.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            out[dotted] = value
    return out


def _load_dtype(dtypes: Counter) -> torch.dtype:
    """The file's floating dtype (the most common one: T5 files exported in float16 keep ``wo`` in float32)."""
    floating = [(n, d) for d, n in dtypes.items() if d in ("float16", "bfloat16", "float32", "float64")]
    return getattr(torch, max(floating)[1]) if floating else torch.float32


def inspect_component(root: Path, name: str, entry: list, ckpt: Checkpoint | None) -> ComponentReport:
    folder = root / name
    library, class_name = (entry + [None, None])[:2] if isinstance(entry, list) else (None, None)
    rep = ComponentReport(name=name, library=str(library), class_name=str(class_name))
    if not folder.is_dir():
        rep.loads, rep.error = False, f"component folder {name}/ is missing"
        return rep
    rep.config = _config_summary(folder, KEY_FIELDS.get(name, ()))
    rep.bytes_on_disk = folder_bytes(folder)
    dtypes: Counter = Counter()
    try:
        weights = find_weights(folder)
        if weights is not None:
            info = tensor_info(weights.files)
            rep.weight_files = [p.name for p in weights.files]
            rep.file_tensors = len(info)
            rep.file_values = sum(numel(shape) for shape, _ in info.values())
            dtypes = Counter(dtype for _, dtype in info.values())
            rep.file_dtypes = dict(dtypes)
    except CheckpointError as e:
        rep.loads, rep.error = False, str(e)
        return rep
    if ckpt is None:
        return rep
    try:
        if name in LOADERS:
            modules = [load(ckpt, _load_dtype(dtypes)) for load in LOADERS[name]]
            rep.ours = " + ".join(type(m).__name__ for m in modules)
            states = [m.state_dict() for m in modules]
            rep.ours_tensors = sum(len(s) for s in states)
            rep.ours_values = sum(t.numel() for s in states for t in s.values())
            del modules, states
        elif name in READERS:
            rep.ours = READERS[name](ckpt)
        rep.loads = True
    except Exception as e:  # a report, not a crash: any loader failure is this component's result
        rep.loads = False
        rep.error = str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {e}"
    return rep


def inspect_checkpoint(path_or_repo_id: str, revision: str | None = None) -> CheckpointReport:
    root = resolve_folder(path_or_repo_id, revision)
    index_path = root / "model_index.json"
    try:
        index = json.loads(index_path.read_text())
    except FileNotFoundError:
        raise ToolError(
            f"{path_or_repo_id}: no model_index.json in {root}; not a diffusers pipeline"
        ) from None
    except (OSError, ValueError) as e:
        raise ToolError(f"{index_path}: cannot read JSON ({e})") from e
    try:
        ckpt, error = Checkpoint(root, source=path_or_repo_id), None
    except CheckpointError as e:
        ckpt, error = None, str(e)
    order = list(COMPONENTS)  # data-flow order for the ones we know, then the rest as listed
    names = sorted(
        (n for n in index if not n.startswith("_")), key=lambda n: order.index(n) if n in order else 99
    )
    components = [inspect_component(root, name, index[name], ckpt) for name in names]
    return CheckpointReport(
        checkpoint=path_or_repo_id,
        root=str(root),
        pipeline=str(index.get("_class_name")),
        bytes_on_disk=folder_bytes(root),
        opens=ckpt is not None,
        error=error,
        components=components,
    )


def format_report(r: CheckpointReport) -> str:
    lines = [f"{r.checkpoint}: {r.pipeline}, {len(r.components)} components, {human_bytes(r.bytes_on_disk)}"]
    if r.root != r.checkpoint:
        lines.append(f"  folder: {r.root}")
    if r.error:
        lines.append(f"  does not open as an AudioLDM 2 checkpoint: {r.error}")
    for c in r.components:
        lines.append(f"{c.name:<18} {c.library}.{c.class_name}  ({human_bytes(c.bytes_on_disk)})")
        if c.config:
            lines.append("    config  " + " ".join(f"{k}={json.dumps(v)}" for k, v in c.config.items()))
        if c.file_tensors is not None:
            dtypes = ", ".join(f"{d} x{n}" for d, n in sorted(c.file_dtypes.items()))
            lines.append(
                f"    file    {' + '.join(c.weight_files)}: {c.file_tensors} tensors, "
                f"{c.file_values:,} values ({dtypes})"
            )
        if c.loads is None:
            lines.append("    ours    not checked")
        elif not c.loads:
            lines.append(f"    ours    DOES NOT LOAD: {c.error}")
        elif c.ours_tensors is not None:
            lines.append(
                f"    ours    {c.ours}: {c.ours_tensors} tensors, {c.ours_values:,} values; loads strictly"
            )
        else:
            lines.append(f"    ours    {c.ours}: reads")
    lines.append("all components load" if r.ok else "NOT every component loads")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint folder or hub repo id")
    p.add_argument("--revision", default=None, help="hub revision (repo ids only)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    report = inspect_checkpoint(args.checkpoint, args.revision)
    if args.json:
        print(json.dumps({**asdict(report), "ok": report.ok}, indent=2))
    else:
        print(format_report(report))
    return 0 if report.ok else 1
