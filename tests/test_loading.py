"""Checkpoint resolution (local folder, hub cache) and strict loading errors, on reference-made checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from audioldm2_core.errors import CheckpointError, WeightsError
from audioldm2_core.loading import (
    Checkpoint,
    empty_init,
    hub_patterns,
    load_strict,
    open_checkpoint,
    read_weights,
    release_pages,
    safetensors_keys,
)
from audioldm2_core.vocoder import load_vocoder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ckpt_copy(tiny_base, tmp_path):
    """A writable copy of the tiny checkpoint."""
    return Path(shutil.copytree(tiny_base, tmp_path / "ckpt"))


def test_open_local_folder(tiny_base):
    ckpt = open_checkpoint(tiny_base)
    assert ckpt.root == Path(tiny_base)
    assert ckpt.config("unet")["_class_name"] == "AudioLDM2UNet2DConditionModel"
    assert ckpt.config("scheduler")["_class_name"] == "DDIMScheduler"
    assert ckpt.config("feature_extractor")["feature_extractor_type"] == "ClapFeatureExtractor"
    assert [p.name for p in ckpt.weight_files("unet")] == ["diffusion_pytorch_model.safetensors"]
    assert [p.name for p in ckpt.weight_files("text_encoder")] == ["model.safetensors"]
    assert ckpt.index["language_model"] == ["transformers", "GPT2Model"]  # saved as on the hub
    vocoder = load_vocoder(ckpt)
    assert not any(p.is_meta for p in vocoder.parameters())


def _hub_cache(
    hf_home: Path, repo_id: str, src: Path, commit: str = "0123456789abcdef0123456789abcdef01234567"
):
    """Lay out ``src`` as huggingface_hub's cache has a snapshot: blobs are plain copies here."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(src, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def _open_in_subprocess(name: str, hf_home: Path, revision: str | None = None) -> subprocess.CompletedProcess:
    # huggingface_hub reads HF_HOME and HF_HUB_OFFLINE at import time, as users set them: a fresh process.
    code = (
        "import sys\nfrom audioldm2_core.loading import open_checkpoint, CheckpointError\n"
        f"try:\n    print(open_checkpoint({name!r}, revision={revision!r}).root)\n"
        "except CheckpointError as e:\n    print('ERROR', e); sys.exit(3)\n"
    )
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_open_repo_id_from_offline_hub_cache(tiny_base, tmp_path):
    snapshot = _hub_cache(tmp_path / "hf", "cvssp/audioldm2", tiny_base)
    r = _open_in_subprocess("cvssp/audioldm2", tmp_path / "hf")
    assert r.returncode == 0, r.stdout + r.stderr
    assert Path(r.stdout.strip().splitlines()[-1]) == snapshot
    # The same by commit hash.
    r = _open_in_subprocess("cvssp/audioldm2", tmp_path / "hf", revision=snapshot.name)
    assert r.returncode == 0, r.stdout + r.stderr


def test_repo_id_missing_from_offline_cache(tmp_path):
    r = _open_in_subprocess("cvssp/audioldm2-music", tmp_path / "empty")
    assert r.returncode == 3
    assert "cvssp/audioldm2-music: not in the local hub cache" in r.stdout
    assert "HF_HUB_OFFLINE is set" in r.stdout


def test_not_a_folder_nor_repo_id(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder, and not a hub repo id"):
        open_checkpoint(str(tmp_path / "nope" / "deeper"))
    with pytest.raises(TypeError, match="folder path or a hub repo id"):
        open_checkpoint(42)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model_index.json"):
        open_checkpoint(tmp_path / "empty")


def test_hub_patterns_pick_one_format_per_component():
    files = [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder_2/config.json",
        "text_encoder_2/pytorch_model.bin",  # as in the anhnct/* repos: pickles only
        "vae/diffusion_pytorch_model.safetensors",
    ]
    patterns = hub_patterns(files)
    assert "unet/diffusion_pytorch_model.safetensors" in patterns
    assert "unet/diffusion_pytorch_model.bin" not in patterns
    assert not any("fp16" in p for p in patterns)
    assert "text_encoder_2/pytorch_model.bin" in patterns


def test_truncated_safetensors(ckpt_copy):
    path = ckpt_copy / "vocoder" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"vocoder/model\.safetensors: .*truncated or corrupt"):
        load_vocoder(open_checkpoint(ckpt_copy))
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{notjson")
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        read_weights(path)


def _rewrite(path: Path, edit) -> None:
    state = load_file(path)
    edit(state)
    save_file(state, path)


def test_extra_missing_and_misshaped_keys(ckpt_copy):
    path = ckpt_copy / "vocoder" / "model.safetensors"
    original = load_file(path)
    key = "conv_pre.bias" if "conv_pre.bias" in original else sorted(original)[0]

    _rewrite(path, lambda s: s.__setitem__("extra.weight", torch.zeros(3)))
    with pytest.raises(WeightsError, match=r"vocoder.*unexpected keys: extra\.weight"):
        load_vocoder(open_checkpoint(ckpt_copy))

    save_file({k: v for k, v in original.items() if k != key}, path)
    with pytest.raises(WeightsError, match=rf"vocoder.*missing keys: {key}"):
        load_vocoder(open_checkpoint(ckpt_copy))

    save_file({**original, key: torch.zeros(7, 7)}, path)
    with pytest.raises(WeightsError, match=rf"mis-shaped keys: {key}: file \(7, 7\)"):
        load_vocoder(open_checkpoint(ckpt_copy))


def test_missing_weight_file_and_component_folder(ckpt_copy):
    (ckpt_copy / "vocoder" / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"no weight file in vocoder/"):
        load_vocoder(open_checkpoint(ckpt_copy))
    shutil.rmtree(ckpt_copy / "vae")
    with pytest.raises(CheckpointError, match=r"component folder vae/ is missing"):
        open_checkpoint(ckpt_copy)


def test_unsupported_component_class(ckpt_copy):
    index = json.loads((ckpt_copy / "model_index.json").read_text())
    index["text_encoder_2"] = ["transformers", "BertModel"]  # (VitsModel: the speech checkpoints, supported)
    (ckpt_copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError, match=r"component 'text_encoder_2' has class 'BertModel'.*not support"
    ):
        open_checkpoint(ckpt_copy)
    index["_class_name"] = "StableDiffusionPipeline"
    (ckpt_copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="pipeline class 'StableDiffusionPipeline'"):
        Checkpoint(ckpt_copy)


def test_pickle_weights_are_read_safely(ckpt_copy):
    folder = ckpt_copy / "vocoder"
    state = load_file(folder / "model.safetensors")
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    ckpt = open_checkpoint(ckpt_copy)
    assert [p.name for p in ckpt.weight_files("vocoder")] == ["pytorch_model.bin"]
    vocoder = load_vocoder(ckpt)
    assert torch.equal(dict(vocoder.state_dict())["conv_post.weight"], state["conv_post.weight"])
    # A pickle that is not plain tensors is refused by weights_only loading.
    torch.save({"x": object()}, folder / "pytorch_model.bin", _use_new_zipfile_serialization=True)
    with pytest.raises(WeightsError, match="cannot read pickled weights safely"):
        read_weights(folder / "pytorch_model.bin")


def test_load_strict_reports_unfilled_tensors():
    class WithBuffer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            self.register_buffer("tmp", torch.zeros(2), persistent=False)

    with torch.device("meta"):
        m = WithBuffer()
    with pytest.raises(WeightsError, match="not filled from the file: tmp"):
        load_strict(m, {"lin.weight": torch.zeros(2, 2), "lin.bias": torch.zeros(2)}, "test")


@pytest.mark.parametrize("cut", ["mid-data", "last byte", "header"])
def test_truncated_file_is_an_error_when_opened(tmp_path, cut):
    """safe_open refuses a file whose tensors do not cover it exactly: an error naming the file at load time,
    never a crash (SIGBUS) on first touching a page past its end."""
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(64, 64), "b": torch.randn(1000)}, path)
    data = path.read_bytes()
    path.write_bytes({"mid-data": data[: len(data) - 3000], "last byte": data[:-1], "header": data[:20]}[cut])
    for read in (read_weights, safetensors_keys):
        with pytest.raises(WeightsError, match=rf"{path.name}: cannot read .*truncated or corrupt"):
            read(path)


def test_file_changed_after_its_header_was_read(tmp_path, monkeypatch):
    from audioldm2_core import loading

    path, other = tmp_path / "w.safetensors", tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(10)}, path)
    save_file({"x": torch.zeros(1000)}, other)
    real = loading.safe_open
    monkeypatch.setattr(loading, "safe_open", lambda _, framework: real(other, framework=framework))
    with pytest.raises(WeightsError, match=r"w\.safetensors: .*truncated or corrupt \(file of \d+ bytes"):
        read_weights(path)


def test_read_weights_maps_the_selected_tensors(tmp_path):
    path = tmp_path / "w.safetensors"
    tensors = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(7).bfloat16(),
        "i64": torch.arange(4),
        "empty": torch.zeros(0, 3),
        "skipped": torch.randn(2),
    }
    save_file(tensors, path)
    state = read_weights(path, select=lambda k: k != "skipped")
    assert sorted(state) == ["bf16", "empty", "f32", "i64"]
    for key, t in state.items():
        assert t.dtype == tensors[key].dtype and torch.equal(t, tensors[key])
    state["f32"].add_(1)  # copy-on-write: the file keeps its values
    assert torch.equal(read_weights(path)["f32"], tensors["f32"])


def test_read_weights_misaligned_tensor(tmp_path):
    """A file written by another tool may put a tensor at an offset that is not a multiple of its item size."""
    header = json.dumps(
        {
            "byte": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
            "x": {"dtype": "F32", "shape": [2, 3], "data_offsets": [1, 25]},
        }
    ).encode()
    header += b" " * (-len(header) % 8)
    x = torch.arange(6, dtype=torch.float32).view(2, 3)
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x07" + x.numpy().tobytes())
    state = read_weights(path)
    assert state["byte"].tolist() == [7] and torch.equal(state["x"], x)


def test_empty_init_is_meta_and_leaves_torch_alone():
    """Modules come out on the meta device without their initialisation, and nothing global changes: another
    thread building a module meanwhile gets it initialised, and so does a tensor placed off the meta device."""
    init_functions = dict(vars(torch.nn.init))
    other: list[torch.Tensor] = []
    with empty_init():
        assert dict(vars(torch.nn.init)) == init_functions
        worker = threading.Thread(target=lambda: other.append(torch.nn.LayerNorm(4).bias.clone()))
        worker.start()
        worker.join()
        layers = [torch.nn.Linear(4, 4), torch.nn.Embedding(5, 4), torch.nn.Conv1d(2, 2, 3)]
        on_cpu = torch.nn.LayerNorm(4, device="cpu")
    assert all(t.is_meta for m in layers for t in m.parameters())
    assert other[0].device.type == "cpu" and torch.equal(other[0], torch.zeros(4))
    assert torch.equal(on_cpu.weight, torch.ones(4))  # initialised: not a meta tensor


def test_empty_init_does_not_import_dynamo():
    # normal_ on the meta device runs a Python reference kernel whose first use imports torch._dynamo (~1 s).
    code = (
        "import sys, torch\nfrom audioldm2_core.loading import empty_init\n"
        "with empty_init():\n    torch.nn.Embedding(10, 4); torch.nn.Linear(4, 4); torch.nn.GroupNorm(2, 4)\n"
        "assert 'torch._dynamo' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_load_strict_assigns_the_files_tensors():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)
            self.register_buffer("scale", torch.ones(2))
            self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    state = {"lin.weight": torch.randn(2, 3), "lin.bias": torch.randn(2), "scale": torch.randn(2)}
    state["steps"] = torch.tensor(5)
    with empty_init():
        block = Block()
    load_strict(block, dict(state), "test")
    assert isinstance(block.lin.weight, torch.nn.Parameter) and block.lin.weight.requires_grad
    assert block.lin.weight.data_ptr() == state["lin.weight"].data_ptr()  # the file's tensor, not a copy
    assert not isinstance(block.scale, torch.nn.Parameter) and "scale" in dict(block.named_buffers())
    assert not block.training

    with empty_init():
        block = Block()
    load_strict(block, dict(state), "test", dtype=torch.float64)
    assert block.lin.weight.dtype == torch.float64 and block.steps.dtype == torch.int64

    with empty_init():
        block = Block()
    with pytest.raises(WeightsError, match=r"test: weights do not match Block: missing keys: scale"):
        load_strict(block, {k: v for k, v in state.items() if k != "scale"}, "test")


def _mapped_mb(path: Path) -> float | None:
    """This process's resident pages of its maps of ``path`` (Linux's smaps), in MB; None elsewhere."""
    smaps = Path("/proc/self/smaps")
    if not smaps.exists():
        return None
    kb, inside = 0, False
    for line in smaps.read_text().splitlines():
        if line[:1] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:  # a map's header line
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            kb += int(line.split()[1])
    return kb / 1024


def test_a_copied_tensor_hands_its_file_pages_back(tmp_path):
    """Loading in another dtype drops the file pages a tensor was read from once its copy exists, so a bfloat16
    load peaks at its copies, not at its copies plus the float32 file. What is dropped reads back the same."""
    path = tmp_path / "w.safetensors"
    tensors = dict(a=torch.randn(2 << 20), small=torch.randn(3), b=torch.randn(1 << 20), i=torch.arange(5))
    save_file(tensors, path)
    state = read_weights(path)
    assert all(torch.equal(state[k], t) for k, t in tensors.items())  # read: its pages are resident
    before = _mapped_mb(path)
    module = torch.nn.Module()
    with empty_init():
        for key, t in tensors.items():
            module.register_buffer(key, torch.empty_like(t))
    load_strict(module, state, "test", dtype=torch.bfloat16)
    after = _mapped_mb(path)
    if before is not None:  # Linux: the 12 MB of float32 were resident, and are not after the copies
        assert before >= 12 and after < 0.1, (before, after)
    for key, t in tensors.items():
        expected = t.bfloat16() if t.is_floating_point() else t
        assert torch.equal(getattr(module, key), expected)
        assert torch.equal(state[key], t)  # the file's view, read again from the file


def test_releasing_pages_leaves_other_memory_alone():
    """Only a file map's pages are ever dropped: a tensor in the process's own memory keeps its values."""
    x = torch.randn(1 << 20)
    kept = x.clone()
    release_pages(x)
    assert torch.equal(x, kept)


def test_speech_checkpoint_pairs_vits_with_its_tokenizer(tiny_gigaspeech, tmp_path):
    """VitsModel goes with VitsTokenizer (and T5 with T5's tokenizer): a mixed model_index.json is refused."""
    import json
    import shutil

    from audioldm2_core.errors import CheckpointError
    from audioldm2_core.loading import open_checkpoint

    assert open_checkpoint(tiny_gigaspeech).is_speech
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_gigaspeech, mixed)
    index = json.loads((mixed / "model_index.json").read_text())
    index["tokenizer_2"] = ["transformers", "T5TokenizerFast"]
    (mixed / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="VitsModel needs VitsTokenizer"):
        open_checkpoint(mixed)
