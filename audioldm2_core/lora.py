"""LoRA of the UNet (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models"): read, check, merge,
unmerge, and write diffusers' file.

A LoRA adds to chosen linears of the UNet (by default every attention's ``to_q``, ``to_k``, ``to_v``,
``to_out.0``) a low-rank update: ``W x + (alpha / r) B A x``, A (r, in) the "down" matrix, B (out, r) the "up"
one. This module reads the three files such updates come in and writes the first:

- diffusers' ``pytorch_lora_weights.safetensors`` (what ``save_lora_weights`` and ``audioldm2-train`` write):
  keys ``unet.<module path>.lora.down.weight`` / ``.lora.up.weight``; rank and alpha in the safetensors
  metadata ``lora_adapter_metadata`` (a JSON ``LoraConfig`` whose keys carry the ``unet.`` prefix);
- PEFT's ``save_pretrained`` folder: ``adapter_model.safetensors`` (keys ``base_model.model.<path>.lora_A.weight``
  / ``lora_B``) with ``adapter_config.json`` (``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``,
  ``use_rslora``);
- the older diffusers attention-processor keys (``...attn1.processor.to_q_lora.down.weight``) and kohya-style
  ``<module>.alpha`` tensors.

Without an alpha anywhere, alpha = rank (scale 1), as diffusers assumes. A key that names no module of the
UNet, or a matrix whose shape does not fit its linear, is a ``CheckpointError`` naming it.

For inference a LoRA is merged into the weights (``fuse=True``): ``W <- W + scale (alpha / r) B A``, computed
in float32, so the UNet keeps its plain modules and the speed layer every rewrite; ``unload`` puts the saved
base weights back bit for bit. ``fuse=False`` adds the update as PEFT's adapter modules instead (for further
training; the speed layer then stands aside for those linears). PEFT is needed for that and for training only.

Left out on purpose: LoRAs of the text encoders or of convolutions, DoRA, LoKr, several unmerged adapters at once.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import CheckpointError, MissingDependencyError, UsageError

__all__ = [
    "DEFAULT_TARGETS",
    "LORA_FILE",
    "LoRA",
    "read_lora",
    "check_fits",
    "attach",
    "detach",
    "inject",
    "require_peft",
    "adapter_state",
    "save_lora",
    "meta_unet",
    "load_lora",
    "unload_lora",
]

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # every attention's projections, as diffusers' scripts
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
ADAPTER = "default"  # PEFT's adapter name for the adapter modules made here
_FOLDER_FILES = (LORA_FILE, "adapter_model.safetensors", "pytorch_lora_weights.bin", "adapter_model.bin")
_PREFIXES = ("unet.", "base_model.model.")  # diffusers' pipeline prefix; PEFT's wrapper
_OTHER_MODELS = ("text_encoder.", "text_encoder_2.", "transformer.")
_KEY = re.compile(
    r"^(?P<module>.+?)\.(?:lora\.(?P<a>down|up)|lora_(?P<b>A|B)(?:\.[\w-]+)?|lora_linear_layer\.(?P<c>down|up))"
    r"\.weight$"
)
_PROCESSOR_KEY = re.compile(
    r"^(?P<module>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<d>down|up)\.weight$"
)
_ALPHA_KEY = re.compile(r"^(?P<module>.+)\.alpha$")


@dataclass(frozen=True)
class LoRA:
    """Low-rank updates of some linears of a UNet, by module path (``down_blocks.1...attn1.to_q``)."""

    down: dict[str, Tensor]  # A (r, in)
    up: dict[str, Tensor]  # B (out, r)
    alpha: dict[str, float]  # the update is scaled by alpha / r
    source: str  # where it was read from, for messages

    def delta(self, name: str, scale: float = 1.0) -> Tensor:
        """scale (alpha / r) B A (out, in), float32."""
        down, up = self.down[name].float(), self.up[name].float()
        return (scale * self.alpha[name] / down.shape[0]) * (up @ down)

    @property
    def rank(self) -> int:
        """The most common rank (PEFT's ``r``; the others go into its ``rank_pattern``)."""
        return Counter(d.shape[0] for d in self.down.values()).most_common(1)[0][0]


# ------------------------------------------------------------------------------------------- reading


def _file_of(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise UsageError(f"LoRA {path}: no such file or folder", field="lora")
    for name in _FOLDER_FILES:
        if (path / name).is_file():
            return path / name
    raise UsageError(f"LoRA folder {path} holds none of {', '.join(_FOLDER_FILES)}", field="lora")


def _read_tensors(file: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors of a LoRA file and its safetensors metadata (a pickle: none)."""
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors' and pickle's errors have no common class
        raise CheckpointError(f"LoRA {file}: not a readable weight file ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"LoRA {file}: not a dict of tensors")
    return state, {}


def _config_of(file: Path, metadata: dict[str, str]) -> dict[str, Any]:
    """The LoraConfig fields saved beside the weights: PEFT's adapter_config.json, or diffusers' metadata."""
    peft_config = file.parent / "adapter_config.json"
    try:
        if file.name.startswith("adapter_model") and peft_config.is_file():
            return json.loads(peft_config.read_text())
        if "lora_adapter_metadata" in metadata:
            packed = json.loads(metadata["lora_adapter_metadata"])
            return {k.removeprefix("unet."): v for k, v in packed.items() if not k.startswith(_OTHER_MODELS)}
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"LoRA {file}: its config cannot be read ({e})") from e
    return {}


def _module_of(key: str, source: str) -> tuple[str, str] | None:
    """(module path, "down" / "up" / "alpha") of a file's key; None for a key that is no LoRA tensor."""
    for prefix in _PREFIXES:
        key = key.removeprefix(prefix)
    if key.startswith(_OTHER_MODELS):
        raise CheckpointError(f"LoRA {source}: {key!r} adapts another model than the UNet (UNet LoRAs only)")
    if m := _KEY.match(key):
        kind = m["a"] or m["c"] or {"A": "down", "B": "up"}[m["b"]]
        return m["module"], kind
    if m := _PROCESSOR_KEY.match(key):
        proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
        return f"{m['module']}.{proj}", m["d"]
    if m := _ALPHA_KEY.match(key):
        return m["module"], "alpha"
    return None


def _pattern(patterns: dict[str, Any], name: str) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup (``peft.utils.other.get_pattern_key``)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def _alphas(down: dict[str, Tensor], alphas: dict[str, Tensor], config: dict[str, Any], source: str):
    if config.get("use_dora"):
        raise CheckpointError(f"LoRA {source}: DoRA adapters (use_dora) are not supported")
    if config.get("lora_bias"):
        raise CheckpointError(f"LoRA {source}: adapters with a bias (lora_bias) are not supported")
    out = {}
    for name, d in down.items():
        r = d.shape[0]
        alpha = _pattern(config.get("alpha_pattern") or {}, name)
        if alpha is None:
            alpha = float(alphas[name]) if name in alphas else config.get("lora_alpha", r)
        out[name] = float(alpha) * (
            math.sqrt(r) if config.get("use_rslora") else 1.0
        )  # rsLoRA: alpha / sqrt(r)
    return out


def read_lora(path: str | Path) -> LoRA:
    """A LoRA file (``.safetensors``, or a ``.bin`` pickle of tensors), or a folder holding one: a training
    run, diffusers' ``save_lora_weights`` output, or PEFT's ``save_pretrained`` output."""
    file = _file_of(Path(path).expanduser())
    state, metadata = _read_tensors(file)
    source = str(file)
    parts: dict[str, dict[str, Tensor]] = {"down": {}, "up": {}, "alpha": {}}
    for key, tensor in state.items():
        found = _module_of(key, source)
        if found is None:
            raise CheckpointError(
                f"LoRA {source}: {key!r} is not a LoRA weight (lora.down/up, lora_A/B, alpha)"
            )
        parts[found[1]][found[0]] = tensor
    down, up = parts["down"], parts["up"]
    if not down:
        raise CheckpointError(f"LoRA {source}: no LoRA weights in the file")
    orphans = sorted(down.keys() ^ up.keys())
    if orphans:
        half = "down" if orphans[0] in down else "up"
        raise CheckpointError(f"LoRA {source}: {orphans[0]} has only its {half} matrix")
    for name in down:
        d, u = down[name], up[name]
        if d.ndim != 2 or u.ndim != 2 or d.shape[0] != u.shape[1]:
            raise CheckpointError(
                f"LoRA {source}: {name}: down {tuple(d.shape)} and up {tuple(u.shape)} are not (r, in) and "
                "(out, r) matrices of one rank r (a LoRA of a convolution?)"
            )
    alpha = _alphas(down, parts["alpha"], _config_of(file, metadata), source)
    return LoRA(down, up, alpha, source)


# ------------------------------------------------------------------------------------ the UNet side


def _base_linear(module: nn.Module) -> nn.Module:
    """The linear a LoRA changes: the module itself, or the base layer of PEFT's wrapper around it."""
    return getattr(module, "base_layer", module)


def check_fits(lora: LoRA, unet: nn.Module) -> None:
    """Every module path names a linear of ``unet`` whose (out, in) the update fits, or a clear error."""
    for name in sorted(lora.down):
        try:
            linear = _base_linear(unet.get_submodule(name))
        except AttributeError:
            raise CheckpointError(
                f"LoRA {lora.source}: {name} matches no module of this UNet (a LoRA for another model?)"
            ) from None
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"LoRA {lora.source}: {name} is a {type(linear).__name__}, not a linear")
        want = (linear.out_features, linear.in_features)
        have = (lora.up[name].shape[0], lora.down[name].shape[1])
        if have != want:
            raise CheckpointError(
                f"LoRA {lora.source}: {name} is {have[0]}x{have[1]} but this UNet's is {want[0]}x{want[1]} "
                "(a LoRA for another model?)"
            )


def _merge(unet: nn.Module, lora: LoRA, scale: float) -> None:
    """W <- W + delta, each base weight saved first (once) in ``unet.lora_base_weights`` for ``detach``."""
    saved: dict[str, Tensor] = unet.__dict__.setdefault("lora_base_weights", {})
    with torch.no_grad():
        for name in lora.down:
            weight = _base_linear(unet.get_submodule(name)).weight
            if name not in saved:
                saved[name] = weight.detach().clone()
            weight.copy_((weight.float() + lora.delta(name, scale).to(weight.device)).to(weight.dtype))


def require_peft() -> None:
    """PEFT is there, or the one line that says how to install it: adapter modules (training, ``fuse=False``)
    need it; merging a LoRA does not."""
    try:
        import peft  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(
            'LoRA adapter modules (training, fuse=False) need peft: pip install "audioldm2-core[train]"'
        ) from e


def _peft_config(lora: LoRA, scale: float):
    from peft import LoraConfig

    r = lora.rank
    names = sorted(lora.down)
    ranks = {re.escape(n): lora.down[n].shape[0] for n in names if lora.down[n].shape[0] != r}
    alphas = {re.escape(n): scale * lora.alpha[n] for n in names}
    return LoraConfig(
        r=r, lora_alpha=scale * r, target_modules=names, rank_pattern=ranks, alpha_pattern=alphas
    )


def _add_adapters(unet: nn.Module, lora: LoRA, scale: float) -> None:
    require_peft()
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    if any(hasattr(m, "lora_A") for m in unet.modules()):
        raise UsageError("the UNet already has unmerged LoRA adapters: unload_lora() first, or fuse=True")
    inject_adapter_in_model(_peft_config(lora, scale), unet, adapter_name=ADAPTER)
    state = {f"{n}.lora_A.weight": lora.down[n] for n in lora.down}
    state |= {f"{n}.lora_B.weight": lora.up[n] for n in lora.up}
    result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER)
    if getattr(result, "unexpected_keys", None):
        raise CheckpointError(f"LoRA {lora.source}: PEFT did not place {sorted(result.unexpected_keys)[:3]}")


def attach(unet: nn.Module, lora: LoRA, scale: float = 1.0, fuse: bool = True) -> None:
    """Apply a checked LoRA to ``unet``: merged into its weights, or (``fuse=False``) as PEFT adapter modules."""
    check_fits(lora, unet)
    if fuse:
        _merge(unet, lora, scale)
    else:
        _add_adapters(unet, lora, scale)


def detach(unet: nn.Module) -> None:
    """The base UNet back: merged LoRAs undone (the saved weights copied back, bit for bit) and PEFT adapter
    modules replaced by the linears they wrap."""
    saved = unet.__dict__.pop("lora_base_weights", {})
    with torch.no_grad():
        for name, weight in saved.items():
            _base_linear(unet.get_submodule(name)).weight.copy_(weight)
    wrapped = [name for name, m in unet.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    for name in wrapped:
        parent, _, child = name.rpartition(".")
        owner = unet.get_submodule(parent)
        base = unet.get_submodule(name).base_layer
        if isinstance(owner, (nn.ModuleList, nn.Sequential)):
            owner[int(child)] = base
        else:
            setattr(owner, child, base)


# ---------------------------------------------------------------------------------------- training


def inject(
    unet: nn.Module, rank: int, alpha: float, targets: tuple[str, ...], seed: int
) -> list[nn.Parameter]:
    """Fresh PEFT adapters on every linear named ``targets`` (module-name endings), initialised as diffusers'
    scripts do (A gaussian with std 1 / r, B zeros: the UNet starts unchanged) from ``seed``; returns the
    trainable parameters (A and B of each), in module order."""
    require_peft()
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, unet, adapter_name=ADAPTER)
    return [p for n, p in unet.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def adapter_state(unet: nn.Module, source: str = "the UNet") -> LoRA:
    """The PEFT adapters of ``unet`` as a LoRA (copies on the CPU, float32)."""
    down, up, alpha = {}, {}, {}
    for name, m in unet.named_modules():
        if hasattr(m, "lora_A") and ADAPTER in getattr(m, "lora_A", {}):
            down[name] = m.lora_A[ADAPTER].weight.detach().float().cpu().clone()
            up[name] = m.lora_B[ADAPTER].weight.detach().float().cpu().clone()
            alpha[name] = float(m.scaling[ADAPTER]) * down[name].shape[0]
    return LoRA(down, up, alpha, source)


def save_lora(lora: LoRA, targets: tuple[str, ...], extra: dict[str, str] | None = None) -> bytes:
    """``lora`` as diffusers' ``pytorch_lora_weights.safetensors`` bytes (write them with
    ``outputs.write_atomic``): ``unet.``-prefixed ``lora.down`` / ``lora.up`` keys, and the LoraConfig (r,
    lora_alpha, target_modules, per-module ranks and alphas where they differ) as its metadata."""
    from safetensors.torch import save

    r = lora.rank
    alpha = Counter(lora.alpha.values()).most_common(1)[0][0]
    config = {"r": r, "lora_alpha": alpha, "target_modules": list(targets), "init_lora_weights": "gaussian"}
    config["rank_pattern"] = {re.escape(n): d.shape[0] for n, d in lora.down.items() if d.shape[0] != r}
    config["alpha_pattern"] = {re.escape(n): a for n, a in lora.alpha.items() if a != alpha}
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in config.items()},
                                                                indent=2, sort_keys=True)}  # fmt: skip
    state = {f"unet.{n}.lora.down.weight": d.contiguous() for n, d in lora.down.items()}
    state |= {f"unet.{n}.lora.up.weight": u.contiguous() for n, u in lora.up.items()}
    return save(state, metadata=meta | (extra or {}))


# ---------------------------------------------------------------------------------------- the pipeline


class LoRALoader:
    """A residency's UNet loader that applies a LoRA to every UNet it loads (``low_memory`` reloads it)."""

    def __init__(self, base, lora: LoRA, scale: float, fuse: bool):
        self.base, self.lora, self.scale, self.fuse = base, lora, scale, fuse

    def __call__(self) -> nn.Module:
        unet = self.base()
        attach(unet, self.lora, self.scale, self.fuse)
        return unet


def meta_unet(config) -> nn.Module:
    """A UNet of ``config`` on the meta device (shapes, no weights): what a LoRA is checked against before a
    UNet loads."""
    from .loading import empty_init
    from .unet import AudioLDM2UNet

    with empty_init():
        return AudioLDM2UNet(config)


def load_lora(pipe, path: str | Path, scale: float = 1.0, fuse: bool = True) -> LoRA:
    """``AudioLDM2.load_lora``: checked against the UNet (the loaded one, else one built on the meta device
    from its config) before anything changes, then applied to it and to every later load of it."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise UsageError(f"LoRA scale must be a finite number, got {scale!r}", field="lora")
    lora = read_lora(path)
    residency = pipe.residency
    unet = residency.modules.get("unet")
    if unet is not None and pipe.options.compile:
        raise UsageError("load the LoRA before the UNet is compiled: with compile=..., pass low_memory=True")
    check_fits(lora, unet if unet is not None else meta_unet(pipe.unet_config))
    if unet is not None:
        attach(unet, lora, scale, fuse)
    if "unet" not in residency.replaced:
        residency.loaders["unet"] = LoRALoader(residency.loaders["unet"], lora, scale, fuse)
    return lora


def unload_lora(pipe) -> None:
    """``AudioLDM2.unload_lora``: every LoRA undone, on the loaded UNet and on later loads."""
    loader = pipe.residency.loaders["unet"]
    while isinstance(loader, LoRALoader):
        loader = loader.base
    pipe.residency.loaders["unet"] = loader
    unet = pipe.residency.modules.get("unet")
    if unet is not None:
        detach(unet)
