"""LoRA files both ways with diffusers/PEFT, merged and unmerged inference, a bit-exact unload, the ``--lora``
flag, and one clear line for a LoRA that does not fit (``lora.py``)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch

from audioldm2_core import AudioLDM2, lora
from audioldm2_core.errors import AudioLDM2Error, explain
from audioldm2_core.outputs import write_atomic
from tests.helpers import rel_err
from weights_tools.reference import reference_pipeline

ROOT = Path(__file__).resolve().parents[1]
KW = dict(num_inference_steps=3, audio_length_in_s=0.64, negative_prompt="noise", output_type="pt")
PROMPT = "a dog barks"


def random_lora(unet: torch.nn.Module, seed: int, rank: int = 4, alpha: float = 4.0) -> lora.LoRA:
    """A LoRA of the default targets with every matrix random (B is zero at init: that would change nothing)."""
    u = copy.deepcopy(unet)
    params = lora.inject(u, rank, alpha, lora.DEFAULT_TARGETS, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return lora.adapter_state(u)


def generate(pipe, **kw) -> torch.Tensor:
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **KW, **kw).audios


@pytest.fixture(scope="module")
def files(tiny_base, tmp_path_factory):
    """(our file, the LoRA in it)."""
    folder = tmp_path_factory.mktemp("lora")
    adapter = random_lora(AudioLDM2.from_pretrained(tiny_base, fast=False, low_memory=True).unet, seed=1)
    path = folder / lora.LORA_FILE
    write_atomic(path, lora.save_lora(adapter, lora.DEFAULT_TARGETS))
    return path, adapter


def diffusers_with_peft(tiny_base, state: dict, config) -> object:
    """diffusers' pipeline whose UNet carries a PEFT LoRA (``inject_adapter_in_model``): how diffusers' own
    loaders applied a LoRA to this UNet (``load_attn_procs`` up to v0.39)."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    ref = reference_pipeline.__wrapped__(str(tiny_base))
    inject_adapter_in_model(config, ref.unet)
    result = set_peft_model_state_dict(ref.unet, state)
    assert not result.unexpected_keys
    return ref


def test_our_file_in_diffusers_gives_the_same_audio(tiny_base, files):
    """Our file, loaded into diffusers' UNet through PEFT as diffusers converts it, and ``pipe.load_lora`` here:
    the same audio (<= 1e-4), for the plain UNet and the speed layer's; the metadata is a LoraConfig."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
    from peft import LoraConfig
    from safetensors import safe_open
    from safetensors.torch import load_file

    path, _ = files
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    config = LoraConfig(**{k.removeprefix("unet."): v for k, v in meta.items()})
    assert (config.r, config.lora_alpha) == (4, 4.0)
    state = load_file(path)
    assert all(k.startswith("unet.") and (".lora.down." in k or ".lora.up." in k) for k in state)
    peft_state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()})
    ref = diffusers_with_peft(tiny_base, peft_state, config)
    with torch.no_grad():
        want = ref(PROMPT, generator=torch.Generator().manual_seed(0), **KW).audios
    for fast in (False, True):
        pipe = AudioLDM2.from_pretrained(tiny_base, fast=fast)
        pipe.load_lora(path)
        assert rel_err(generate(pipe), want) <= 1e-4, fast
    assert rel_err(generate(AudioLDM2.from_pretrained(tiny_base)), want) > 1e-3  # the LoRA does change it


def test_peft_save_pretrained_loads_here(tiny_base, tmp_path):
    """A LoRA written by PEFT's ``save_pretrained`` (``base_model.model.`` keys, lora_A/B, its
    adapter_config.json with an alpha of twice the rank) gives here the audio diffusers gives with it."""
    from peft import LoraConfig, get_peft_model

    ref = reference_pipeline.__wrapped__(str(tiny_base))
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights="gaussian")
    model = get_peft_model(ref.unet, config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    with torch.no_grad():
        want = ref(PROMPT, generator=torch.Generator().manual_seed(0), **KW).audios
    pipe = AudioLDM2.from_pretrained(tiny_base)
    read = lora.read_lora(tmp_path / "adapter")
    assert set(read.alpha.values()) == {4.0} and {d.shape[0] for d in read.down.values()} == {2}
    pipe.load_lora(tmp_path / "adapter")
    assert rel_err(generate(pipe), want) <= 1e-4


def test_merged_unmerged_unload_and_low_memory(tiny_base, files):
    """Merged and unmerged (PEFT modules) inference agree (<= 1e-5); ``unload_lora`` restores every UNet weight
    and the audio bit for bit; a scale of 0.5 halves the update; with ``low_memory`` the UNet is reloaded for
    each generation and gets the LoRA each time."""
    path, _ = files
    pipe = AudioLDM2.from_pretrained(tiny_base)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    base = generate(pipe)
    pipe.load_lora(path)
    merged = generate(pipe)
    pipe.unload_lora()
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
    assert torch.equal(generate(pipe), base)
    pipe.load_lora(path, fuse=False)
    assert any(hasattr(m, "lora_A") for m in pipe.unet.modules())
    assert rel_err(generate(pipe), merged) <= 1e-5
    pipe.unload_lora()
    assert not any(hasattr(m, "lora_A") for m in pipe.unet.modules())
    assert torch.equal(generate(pipe), base)
    pipe.load_lora(path, scale=0.5)
    half = generate(pipe)
    assert rel_err(half, merged) > 1e-3 and rel_err(half, base) > 1e-3
    small = AudioLDM2.from_pretrained(tiny_base, low_memory=True)
    small.load_lora(path, scale=0.5)
    assert "unet" not in small.residency.modules  # checked against the config, applied when it loads
    for _ in range(2):  # released after each generation, loaded (with the LoRA) for the next
        assert rel_err(generate(small), half) <= 1e-6
    small.unload_lora()
    assert torch.equal(generate(small), base)


def test_a_lora_that_does_not_fit_is_one_line(tiny_base, tiny_large, files, tmp_path):
    """A LoRA of another model (the large shape: transformers the base has not), a matrix of another width, a
    file of other tensors, a missing file: one line each, and the UNet untouched."""
    path, adapter = files
    large = random_lora(AudioLDM2.from_pretrained(tiny_large, fast=False, low_memory=True).unet, seed=2)
    write_atomic(tmp_path / "large.safetensors", lora.save_lora(large, lora.DEFAULT_TARGETS))
    name = sorted(adapter.down)[0]
    wide = lora.LoRA({name: torch.zeros(4, 7)}, {name: torch.zeros(7, 4)}, {name: 4.0}, "x")
    write_atomic(tmp_path / "wide.safetensors", lora.save_lora(wide, lora.DEFAULT_TARGETS))
    from safetensors.torch import save_file

    save_file({"conv_in.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    pipe = AudioLDM2.from_pretrained(tiny_base)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    for bad, message in (
        ("large.safetensors", "matches no module of this UNet (a LoRA for another model?)"),
        ("wide.safetensors", f"{name} is 7x7 but this UNet's is"),
        ("other.safetensors", "'conv_in.weight' is not a LoRA weight"),
        ("junk.safetensors", "not a readable weight file"),
        ("missing.safetensors", "no such file or folder"),
    ):
        with pytest.raises(AudioLDM2Error) as e:
            pipe.load_lora(tmp_path / bad)
        line = explain(e.value)
        assert message in line and "\n" not in line, line
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
    with pytest.raises(AudioLDM2Error, match="scale must be a finite number"):
        pipe.load_lora(path, scale=float("nan"))


def test_other_spellings_and_alphas(tiny_base, files, tmp_path):
    """diffusers' older attention-processor keys and kohya-style ``.alpha`` tensors read as the same LoRA."""
    from safetensors.torch import save_file

    _, adapter = files
    state = {}
    for name in list(adapter.down)[:6]:
        module, _, proj = name.rpartition(".")
        if proj == "0":  # to_out.0
            module, proj = module.rpartition(".")[0], "to_out"
        state[f"{module}.processor.{proj}_lora.down.weight"] = adapter.down[name]
        state[f"{module}.processor.{proj}_lora.up.weight"] = adapter.up[name]
    state |= {f"{n}.alpha": torch.tensor(8.0) for n in list(adapter.down)[:6]}
    save_file(state, tmp_path / "old.safetensors")
    read = lora.read_lora(tmp_path / "old.safetensors")
    assert sorted(read.down) == sorted(list(adapter.down)[:6]) and set(read.alpha.values()) == {8.0}
    for n in read.down:
        assert torch.equal(read.down[n], adapter.down[n]) and torch.equal(read.up[n], adapter.up[n])


def test_lora_flag_of_the_command_line(tiny_base, files, tmp_path):
    """``audioldm2 PROMPT --lora FILE:0.5`` writes what the API gives with ``load_lora(FILE, 0.5)``; a missing file
    is one line and exit 2, before the model loads."""
    path, _ = files
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    # float32 and PyTorch's attention: the API's defaults, so that the CLI computes the same numbers
    args = [sys.executable, "-m", "audioldm2_core", PROMPT, "--model", str(tiny_base), "--steps", "3", "--length",
            "0.64", "--seed", "0", "--negative", "noise", "--quiet", "--dtype", "float32",
            "--no-cpu-attention"]  # fmt: skip
    r = subprocess.run([*args, "-o", str(tmp_path / "a.wav"), "--lora", f"{path}:0.5"], capture_output=True,
                       text=True, env=env, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    pipe = AudioLDM2.from_pretrained(tiny_base, low_memory=True)
    pipe.load_lora(path, 0.5)
    want = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **(KW | {"output_type": "np"})).audios[0]
    assert rel_err(sf.read(tmp_path / "a.wav", dtype="float32")[0], want) <= 1e-6
    r = subprocess.run([*args, "-o", str(tmp_path / "b.wav"), "--lora", str(tmp_path / "none.safetensors")],
                       capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert r.returncode == 2 and "--lora: lora " in r.stderr and "no such file or folder" in r.stderr, (
        r.stderr
    )
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "b.wav").exists()


def test_lora_flag_of_every_front_end(tmp_path):
    """``--lora`` is a flag of ``audioldm2 PROMPT``, ``--prompts-file`` and the demo alike: each carries it into
    the load options, which ``frontend.load_pipeline`` applies (run end to end above for the first)."""
    from audioldm2_core.frontend import DEMO, MANY, ONE, load_options, parse

    spec = f"{tmp_path}:0.5"
    argvs = {ONE: ["a dog"], MANY: ["--prompts-file", "items.jsonl", "-o", "out"], DEMO: []}
    for program, argv in argvs.items():
        args = parse(program, [*argv, "--lora", spec], "test")
        assert load_options(args, "cpu", "float32", True).lora == spec, program
