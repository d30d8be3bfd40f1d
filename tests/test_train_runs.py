"""Fine-tuning runs as a user starts them, in subprocesses: the same weights from one process, torchrun
--nproc_per_node 2 (gloo) and micro-batches of one; kill -9 mid-run and mid-checkpoint then rerun; a full
fine-tune's pipeline folder in diffusers; a speech checkpoint on transcriptions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from audioldm2_core import AudioLDM2
from audioldm2_core.train import cache, cli
from tests.helpers import rel_err
from tests.test_train import SHORT, items_file, lora_weights, train, write_clips
from weights_tools.reference import reference_pipeline

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--batch-size", "4", "--lr", "1e-3", "--save-every", "2"]  # 4 items: a batch is the dataset

# Runs a training command with a SIGKILL at a chosen moment: "step N" before optimizer step N + 1 runs, or
# "checkpoint N" after the first file of checkpoint N is written (its folder still hidden).
KILLER = """
import os, signal, sys
from audioldm2_core.train import loop, state
mode, at = sys.argv[1], int(sys.argv[2])
if mode == "step":
    real_step = loop.Trainer.train_step
    def train_step(self):
        if self.step == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_step(self)
    loop.Trainer.train_step = train_step
else:
    real_write = state.write_durable
    def write_durable(path, data):
        real_write(path, data)
        if path.parent.name == f".checkpoint-{at}":
            os.kill(os.getpid(), signal.SIGKILL)
    state.write_durable = write_durable
from audioldm2_core.train.cli import main
sys.exit(main(sys.argv[3:]))
"""


def metrics(folder: Path) -> list[dict]:
    return [r for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def run(args: list[str], *prefix: str, timeout: int = 600) -> subprocess.CompletedProcess:
    # one thread a process (torchrun's own default): a tiny model's step is no faster on two, and two threads
    # wait on each other for seconds a step when another process holds a core
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*prefix, *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def setup(tiny_base, tmp_path_factory):
    """(clips' items with fixed ids, a cache already filled for them, the common flags)."""
    folder = tmp_path_factory.mktemp("runs")
    clips = write_clips(folder / "clips")
    data = items_file(clips, folder / "items.jsonl")
    store = folder / "cache"
    flags = ["--model", str(tiny_base), "--data", str(data), "--cache-dir", str(store), *SHORT, *RUN]
    args = cli.parse([*flags, "-o", str(folder / "warm")])
    plan = cli.checked(cli.options_from(args), cli.layout_from_env(None, {}))
    cache.fill(plan.pipe, plan.items, plan.keys, store, plan.frames, False)
    return data, store, flags


def test_one_process_torchrun_and_micro_batches_give_the_same_weights(setup, tmp_path):
    """The same command: one process, one process with micro-batches of one, and ``torchrun --nproc_per_node 2``
    on the CPU (gloo; each process a share of every batch, gradients summed): the same LoRA to float rounding."""
    _, _, flags = setup
    steps = ["--steps", "3", "--ema", "0.9"]
    whole = run([*flags, *steps, "-o", str(tmp_path / "whole")], sys.executable, "-m", "audioldm2_core.train")
    assert whole.returncode == 0, whole.stderr
    one = run([*flags, *steps, "-o", str(tmp_path / "one"), "--micro-batch-size", "1"], sys.executable, "-m",
              "audioldm2_core.train")  # fmt: skip
    assert one.returncode == 0, one.stderr
    two = run([*flags, *steps, "-o", str(tmp_path / "two")], sys.executable, "-m", "torch.distributed.run",
              "--standalone", "--nproc_per_node", "2", "-m", "audioldm2_core.train")  # fmt: skip
    assert two.returncode == 0, two.stderr
    want, want_log = lora_weights(tmp_path / "whole"), metrics(tmp_path / "whole")
    for other in ("one", "two"):
        got, log = lora_weights(tmp_path / other), metrics(tmp_path / other)
        # every step's loss: the same sum, in another order
        assert [r["step"] for r in log] == [1, 2, 3]
        assert all(abs(a["loss"] - b["loss"]) <= 1e-6 * b["loss"] for a, b in zip(log, want_log, strict=True))
        assert abs(log[0]["grad_norm"] - want_log[0]["grad_norm"]) <= 1e-5 * want_log[0]["grad_norm"]
        # The weights: AdamW divides each element's gradient by its own running size, so an element whose gradient
        # sums to nearly zero carries its relative rounding error into the weight (3e-4 here after 3 steps).
        assert got.keys() == want.keys()
        flat = lambda s: torch.cat([s[k].flatten() for k in sorted(want)])  # noqa: E731
        assert rel_err(flat(got), flat(want)) <= 1e-3, other
    state = json.loads((tmp_path / "two" / "checkpoint-3" / "state.json").read_text())
    assert state["world"] == 2 and state["items_seen"] == 12


def test_kill_mid_run_and_mid_checkpoint_then_rerun(setup, tmp_path):
    """kill -9 between checkpoints, rerun; kill -9 while a checkpoint is being written, rerun; rerun to the end:
    the weights of a run never interrupted, bit for bit, and every step logged once."""
    _, _, flags = setup
    args = [*flags, "--steps", "5", "--ema", "0.9"]
    plain = [sys.executable, "-m", "audioldm2_core.train"]
    assert run([*args, "-o", str(tmp_path / "whole")], *plain).returncode == 0
    out = ["-o", str(tmp_path / "killed")]
    killer = [sys.executable, "-c", KILLER]
    r = run([*args, *out], *killer, "step", "3")
    assert r.returncode == -9 and (tmp_path / "killed" / "checkpoint-2").is_dir(), r.stderr
    r = run([*args, *out], *killer, "checkpoint", "4")  # resumes from 2, dies writing 4
    assert r.returncode == -9 and (tmp_path / "killed" / ".checkpoint-4").is_dir(), r.stderr
    assert not (tmp_path / "killed" / "checkpoint-4").exists()
    r = run([*args, *out], *plain)
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in (tmp_path / "killed").iterdir())
    assert not [n for n in names if n.startswith(".")] and "checkpoint-5" in names
    want, got = lora_weights(tmp_path / "whole"), lora_weights(tmp_path / "killed")
    assert all(torch.equal(got[k], want[k]) for k in want)
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4, 5]


def test_full_fine_tune_pipeline_in_diffusers_and_here(setup, tiny_base, tmp_path):
    """``--full``: run/pipeline/ is a whole pipeline folder; diffusers' ``AudioLDM2Pipeline.from_pretrained`` and
    ``AudioLDM2.from_pretrained`` load it and give the same audio (<= 1e-4); only the UNet changed."""
    data, store, flags = setup
    run_dir = tmp_path / "full"
    assert train(tiny_base, data, run_dir, store, *RUN, "--full", "--steps", "2", "--lr", "1e-2") == 0
    folder = run_dir / "pipeline"
    kw = dict(num_inference_steps=3, audio_length_in_s=0.64, negative_prompt="noise")
    want = reference_pipeline.__wrapped__(str(folder))(
        "a beep", generator=torch.Generator().manual_seed(0), **kw
    )
    got = AudioLDM2.from_pretrained(folder)("a beep", generator=torch.Generator().manual_seed(0), **kw)
    assert rel_err(got.audios, want.audios) <= 1e-4
    base = AudioLDM2.from_pretrained(tiny_base)("a beep", generator=torch.Generator().manual_seed(0), **kw)
    assert rel_err(got.audios, base.audios) > 1e-4
    new, old = (
        load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"),
        load_file(tiny_base / "unet" / "diffusion_pytorch_model.safetensors"),
    )
    assert new.keys() == old.keys() and any(not torch.equal(new[k], old[k]) for k in old)
    for component in ("vae", "text_encoder_2", "language_model"):
        for f in (tiny_base / component).iterdir():
            assert (folder / component / f.name).read_bytes() == f.read_bytes()


def test_speech_fine_tuning_with_transcriptions(tiny_ljspeech, tmp_path):
    """A speech checkpoint trains on items with a transcription (IPA here: no espeak-ng); its cached conditions
    are the pipeline's for prompt and transcription; the LoRA loads into that pipeline. Without a
    transcription: one line, exit 2."""
    clips = write_clips(tmp_path / "clips")
    words = ["həlˈoʊ", "wˈɜːld", "ðə kˈæt", "ə dˈɑːɡ"]
    lines = [
        json.loads(line) | {"transcription": w}
        for line, w in zip(clips.read_text().splitlines(), words, strict=True)
    ]
    data = clips.parent / "speech.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    store, out = tmp_path / "cache", tmp_path / "run"
    assert train(tiny_ljspeech, data, out, store, "--steps", "2", "--batch-size", "2", "--phonemes") == 0
    pipe = AudioLDM2.from_pretrained(tiny_ljspeech, fast=False, low_memory=True)
    with torch.no_grad():
        t5, mask, loa = pipe.encode_prompt(
            lines[0]["prompt"], transcription=words[0], transcription_is_phonemes=True
        )
    entries = [cache.read_entry(p) for p in store.glob("*.safetensors")]
    assert sum(torch.equal(e.loa, loa) and torch.equal(e.t5, t5) for e in entries) == 1
    assert loa.shape[1] == 512  # the speech checkpoints' GPT-2 states
    pipe.load_lora(out)
    assert train(tiny_ljspeech, clips, tmp_path / "r2", store, "--steps", "1") == 2
    assert not (tmp_path / "r2").exists()
