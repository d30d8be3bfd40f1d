"""Fine-tuning (``audioldm2_core.train``): the objective against diffusers' UNet with the same PEFT LoRA, the
datasets, bad inputs in one line, and whole runs on the tiny checkpoint (in this process; the multi-process and
kill -9 runs are in test_train_runs.py)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from audioldm2_core import AudioLDM2, lora
from audioldm2_core.generate import Conditions
from audioldm2_core.schedules import alphas_cumprod
from audioldm2_core.train import cache, cli, memory, objective
from audioldm2_core.train.data import read_items
from audioldm2_core.train.options import TrainOptions
from tests.helpers import rel_err
from weights_tools.reference import reference_pipeline

CAPTIONS = ("a low hum", "a short beep", "a whistle in stereo", "a soft tone")
SHORT = ["--length", "0.32", "--quiet"]  # 8 latent frames per crop: a fast tiny step


def write_clips(folder: Path) -> Path:
    """Four short clips at three rates, one stereo, and their items.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for k, (rate, seconds) in enumerate([(16000, 0.4), (22050, 0.3), (44100, 0.6), (16000, 0.5)]):
        t = np.arange(int(rate * seconds)) / rate
        x = 0.3 * np.sin(2 * np.pi * (200 + 150 * k) * t) + 0.05 * rng.standard_normal(t.shape)
        sf.write(folder / f"c{k}.wav", np.stack([x, 0.5 * x], 1) if k == 2 else x, rate)
        lines.append(json.dumps({"audio": f"c{k}.wav", "prompt": CAPTIONS[k]}))
    (folder / "items.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "items.jsonl"


@pytest.fixture(scope="session")
def clips(tmp_path_factory) -> Path:
    return write_clips(tmp_path_factory.mktemp("clips"))


@pytest.fixture(scope="session")
def train_cache(tmp_path_factory) -> Path:
    """One cache for the session's runs: its entries are keyed by content, so runs share what they can."""
    return tmp_path_factory.mktemp("train-cache")


def items_file(clips: Path, path: Path, keep: int = 4, **captions: str) -> Path:
    """``clips``' items (the first ``keep``) in another folder, their paths absolute; ``captions``: id -> new one."""
    lines = []
    for line in clips.read_text().splitlines()[:keep]:
        item = json.loads(line)
        item["prompt"] = captions.get(item["audio"].removesuffix(".wav"), item["prompt"])
        item["id"], item["audio"] = (
            item["audio"],
            str(clips.parent / item["audio"]),
        )  # the id: not the tmp path
        lines.append(json.dumps(item) + "\n")
    path.write_text("".join(lines))
    return path


def train(model: Path, data: Path, out: Path, cache_dir: Path, *flags: str) -> int:
    return cli.main(["--model", str(model), "--data", str(data), "-o", str(out), "--cache-dir", str(cache_dir),
                     *SHORT, *flags])  # fmt: skip


def lora_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / lora.LORA_FILE)


# -------------------------------------------------------------------------------- the objective


def step_inputs(unet_cfg, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lm, t5_dim = unet_cfg.cross_attention_dims[0][1:3]
    z0, noise = torch.randn(2, 8, 8, 16, generator=g), torch.randn(2, 8, 8, 16, generator=g)
    t5, loa = torch.randn(2, 6, t5_dim, generator=g), torch.randn(2, 8, lm, generator=g)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    return z0, noise, torch.tensor([17, 904]), t5, mask, loa


def diffusers_step(unet, scheduler, z0, noise, t, t5, mask, loa) -> torch.Tensor:
    """diffusers' training step (train_text_to_image_lora.py): add_noise, the UNet, MSE against the noise."""
    noisy = scheduler.add_noise(z0, noise, t)
    pred = unet(
        noisy, t, encoder_hidden_states=loa, encoder_hidden_states_1=t5, encoder_attention_mask_1=mask
    )
    loss = torch.nn.functional.mse_loss(pred.sample.float(), noise.float(), reduction="mean")
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("prepared", [False, True], ids=["plain", "as-trained"])
@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_one_step_equals_diffusers(tiny_base, full, prepared):
    """One step's loss (<= 1e-5) and the gradients of every trained parameter (<= 1e-4) equal those of
    diffusers' UNet with the same PEFT LoRA (or none, fine-tuning every weight) on the same z0, noise, t and
    conditions: for the plain modules and as the trainer prepares them (``memory.prepare``: the lean ones)."""
    from diffusers import DDPMScheduler
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict

    ours = AudioLDM2.from_pretrained(tiny_base, fast=False, low_memory=True).unet
    ref_pipe = reference_pipeline.__wrapped__(str(tiny_base))
    ref = ref_pipe.unet
    if not full:
        lora.inject(ours, 4, 4.0, lora.DEFAULT_TARGETS, seed=0)
        config = LoraConfig(
            r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=list(lora.DEFAULT_TARGETS)
        )
        inject_adapter_in_model(config, ref)
        state = get_peft_model_state_dict(ours)
        g = torch.Generator().manual_seed(1)  # B is zero at init, which would leave A without a gradient
        state = {k: torch.randn(v.shape, generator=g) * 0.1 if "lora_B" in k else v for k, v in state.items()}
        set_peft_model_state_dict(ours, state), set_peft_model_state_dict(ref, state)
    for model in (ours, ref):
        for name, p in model.named_parameters():
            p.requires_grad_(full or "lora_" in name)
    if prepared:
        assert memory.keep_less(ours) > 0
    z0, noise, t, t5, mask, loa = step_inputs(ours.cfg)
    scheduler = DDPMScheduler.from_config(ref_pipe.scheduler.config)
    want = diffusers_step(ref, scheduler, z0, noise, t, t5, mask, loa)
    abar = alphas_cumprod(AudioLDM2.from_pretrained(tiny_base, low_memory=True).scheduler_config)
    losses = objective.item_losses(ours, z0, noise, t, Conditions(t5, mask, loa, False), abar, "epsilon")
    losses.mean().backward()
    assert rel_err(losses.mean().detach(), want) <= 1e-5
    got = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert got.keys() == ref_grads.keys() and len(got) == (
        len(dict(ours.named_parameters())) if full else 768
    )
    flat = lambda grads: torch.cat([grads[k].flatten() for k in sorted(grads)])  # noqa: E731
    assert rel_err(flat(got), flat(ref_grads)) <= 1e-4


def test_targets_noise_and_weights_are_diffusers(tiny_base):
    """z_t as ``add_noise``, v as ``get_velocity``, Min-SNR weights as diffusers' scripts compute them."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    pipe = AudioLDM2.from_pretrained(tiny_base, low_memory=True)
    scheduler = DDPMScheduler.from_config(reference_pipeline(str(tiny_base)).scheduler.config)
    abar = alphas_cumprod(pipe.scheduler_config)
    assert torch.equal(abar, scheduler.alphas_cumprod)
    z0, noise, t, *_ = step_inputs(pipe.unet_config)
    assert torch.equal(objective.noised(z0, noise, t, abar), scheduler.add_noise(z0, noise, t))
    v = objective.target(z0, noise, t, abar, "v_prediction")
    assert torch.equal(v, scheduler.get_velocity(z0, noise, t))
    snr = compute_snr(scheduler, t)
    for kind, want in (("epsilon", torch.minimum(snr, torch.full_like(snr, 5.0)) / snr),
                       ("v_prediction", torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + 1))):  # fmt: skip
        assert rel_err(objective.snr_weight(t, abar, 5.0, kind), want) <= 1e-6


def test_draws_schedule_and_ema():
    """An item's draws depend on its generator only; the posterior's noise is the VAE's own sample; the
    learning rate and the EMA decay as documented."""
    mean, logvar = torch.randn(8, 12, 16), torch.randn(8, 12, 16) - 3
    a = objective.draw(mean, logvar, 8, torch.Generator().manual_seed(3), 0.5, 1000, 0.5, noise_offset=0.1)
    b = objective.draw(mean, logvar, 8, torch.Generator().manual_seed(3), 0.5, 1000, 0.5, noise_offset=0.1)
    assert (
        torch.equal(a.z0, b.z0)
        and torch.equal(a.noise, b.noise)
        and (a.t, a.unconditional) == (b.t, b.unconditional)
    )
    g = torch.Generator().manual_seed(3)
    start = int(torch.randint(0, 5, (1,), generator=g))
    torch.rand((), generator=g)
    e = torch.randn((1, 8, 8, 16), generator=g)[0]
    crop = slice(start, start + 8)
    assert torch.equal(a.z0, 0.5 * (mean[:, crop] + torch.exp(0.5 * logvar[:, crop]) * e))
    lr = [objective.learning_rate(s, 1.0, 4, "cosine", 12) for s in range(12)]
    assert lr[:4] == [0.25, 0.5, 0.75, 1.0] and lr[4] == 1.0 and abs(lr[8] - 0.5) < 1e-12 and lr[11] > 0
    assert objective.learning_rate(100, 2.0, 4, "constant", 12) == 2.0
    assert [objective.ema_decay(n, 0.9) for n in (1, 2, 3, 100)] == [0.0, 2 / 11, 3 / 12, 0.9]


def test_the_logged_loss_is_the_objective_by_hand(tiny_base, clips, train_cache, tmp_path):
    """A run's first logged loss, computed here by hand from the cached posteriors and conditions: each item of
    step 0's batch draws from its own generator, seeded by (seed, step, place, id), its crop, its dropout, its
    posterior sample, t and eps, in that order; z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps; the loss is the
    batch's mean of mean((unet(z_t, t, c) - eps)^2) (a fresh LoRA's B is zero: the base UNet). Under bf16
    autocast on the CPU the same draws give the same loss to bfloat16's rounding."""
    from audioldm2_core.train.loop import batch_indices

    flags = ["--steps", "1", "--batch-size", "3", "--seed", "7", "--cfg-dropout", "0.5"]
    first = lambda run: json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["loss"]  # noqa: E731
    assert train(tiny_base, clips, tmp_path / "run", train_cache, *flags) == 0
    assert train(tiny_base, clips, tmp_path / "bf16", train_cache, *flags, "--mixed-precision", "bf16") == 0
    args = cli.parse(["--model", str(tiny_base), "--data", str(clips), "-o", str(tmp_path / "x"), "--cache-dir",
                      str(train_cache), *SHORT, *flags])  # fmt: skip
    plan = cli.checked(cli.options_from(args), cli.layout_from_env(None, {}))
    unet, abar, frames = plan.pipe.unet, alphas_cumprod(plan.pipe.scheduler_config), plan.latent_frames
    scale = json.loads((tiny_base / "vae" / "config.json").read_text())["scaling_factor"]
    losses, drops = [], []
    for j, index in enumerate(batch_indices(0, 3, len(plan.items), 7)):
        item = plan.items[index]
        e = cache.read_entry(train_cache / f"{plan.keys[item.id]}.safetensors")
        g = torch.Generator().manual_seed(objective.seed_of(7, 0, j, item.id))
        start = int(torch.randint(0, e.mean.shape[1] - frames + 1, (1,), generator=g))
        row = 0 if float(torch.rand((), generator=g)) < 0.5 else 1  # rows [unconditional, conditional]
        mean, logvar = e.mean[:, start : start + frames], e.logvar[:, start : start + frames]
        z0 = scale * (mean + torch.exp(0.5 * logvar) * torch.randn((1, *mean.shape), generator=g)[0])
        t = int(torch.randint(0, 1000, (1,), generator=g))
        eps = torch.randn(z0.shape, generator=g)
        zt = abar[t] ** 0.5 * z0 + (1 - abar[t]) ** 0.5 * eps
        with torch.no_grad():
            pred = unet(
                zt[None], torch.tensor([t]), e.loa[row : row + 1], e.t5[row : row + 1], e.mask[row : row + 1]
            )
        losses.append(float(((pred[0] - eps) ** 2).mean()))
        drops.append(row == 0)
    want = sum(losses) / 3
    assert abs(first(tmp_path / "run") - want) <= 1e-5 * want, (first(tmp_path / "run"), losses)
    assert abs(first(tmp_path / "bf16") - want) <= 3e-2 * want
    # seed 7 drops some items' conditions and keeps others': both rows are checked
    assert len(set(drops)) == 2


# ---------------------------------------------------------------------------------- the datasets


def test_three_layouts_read_the_same_items(clips, tmp_path):
    """JSON Lines, an audiofolder (metadata.csv, or metadata.jsonl with a named caption column), and a
    dataset-synthesis folder; ids default to the clip's path, #2 for its next caption."""
    items = read_items(clips)
    assert [(it.id, it.prompt) for it in items] == [(f"c{k}.wav", c) for k, c in enumerate(CAPTIONS)]
    assert items[0].audio == clips.parent / "c0.wav" and items[0].where == f"{clips}:1"
    folder = clips.parent
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    rows = ["file_name,text,transcription"] + [f"{folder}/c{k}.wav,{c}," for k, c in enumerate(CAPTIONS)]
    (csv_dir / "metadata.csv").write_text("\n".join(rows + [f"{folder}/c0.wav,again,"]) + "\n")
    from_csv = read_items(csv_dir)
    assert [it.prompt for it in from_csv] == [*CAPTIONS, "again"] and from_csv[4].id.endswith("c0.wav#2")
    assert all(it.transcription is None for it in from_csv)
    jsonl_dir = tmp_path / "jsonl"
    jsonl_dir.mkdir()
    lines = [
        json.dumps({"file_name": f"{folder}/c{k}.wav", "description": c}) for k, c in enumerate(CAPTIONS)
    ]
    (jsonl_dir / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    assert [it.prompt for it in read_items(jsonl_dir, "description")] == list(CAPTIONS)
    synth = tmp_path / "synth"
    synth.mkdir()
    records = [{"id": f"x{k}", "prompt": c, "file": f"{folder}/c{k}.wav", "sha256": "-", "seed": k}
               for k, c in enumerate(CAPTIONS)]  # fmt: skip
    (synth / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert [(it.id, it.audio.name) for it in read_items(synth)] == [(f"x{k}", f"c{k}.wav") for k in range(4)]


def bad_inputs(clips: Path, tmp: Path, tiny_large: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (flags, what the line says)."""
    (tmp / "missing.jsonl").write_text(json.dumps({"audio": "nope.wav", "prompt": "x"}) + "\n")
    (tmp / "junk.wav").write_bytes(b"RIFF not really a wave file")
    (tmp / "junk.jsonl").write_text(json.dumps({"audio": "junk.wav", "prompt": "x"}) + "\n")
    (tmp / "malformed.jsonl").write_text('{"audio": "a.wav", "prompt": "x"\n')
    (tmp / "empty.jsonl").write_text("\n\n")
    (tmp / "nocaption.jsonl").write_text(json.dumps({"audio": str(clips.parent / "c0.wav")}) + "\n")
    (tmp / "afile").write_text("x")
    (tmp / "long.wav").parent.mkdir(exist_ok=True)
    sf.write(tmp / "long.wav", np.zeros(16000 * 3), 16000)
    (tmp / "long.jsonl").write_text(json.dumps({"audio": "long.wav", "prompt": "x"}) + "\n")
    large = lora.adapter_state(
        _with_lora(AudioLDM2.from_pretrained(tiny_large, low_memory=True, fast=False).unet)
    )
    from audioldm2_core.outputs import write_atomic

    write_atomic(tmp / "large.safetensors", lora.save_lora(large, lora.DEFAULT_TARGETS))
    data = ["--data", str(clips)]
    return {
        "missing clip": (["--data", str(tmp / "missing.jsonl")], "missing.jsonl:1: clip"),
        "unreadable clip": (["--data", str(tmp / "junk.jsonl")], "junk.wav cannot be read"),
        "malformed line": (["--data", str(tmp / "malformed.jsonl")], "malformed.jsonl:1: not valid JSON"),
        "empty dataset": (["--data", str(tmp / "empty.jsonl")], "no items (an empty dataset)"),
        "missing caption": (["--data", str(tmp / "nocaption.jsonl")], "no 'prompt' (the clip's caption)"),
        "too long": (["--data", str(tmp / "long.jsonl")], "the model takes at most 2.56 s"),
        "rank 0": ([*data, "--lora-rank", "0"], "--lora-rank: lora_rank must be at least 1, got 0"),
        "output a file": ([*data, "-o", str(tmp / "afile")], "is a file; give a folder"),
        "output nowhere": ([*data, "-o", str(tmp / "no" / "such" / "run")], "does not exist"),
        "lora of another model": (
            [*data, "--init-lora", str(tmp / "large.safetensors")],
            "matches no module of this UNet (a LoRA for another model?)",
        ),  # fmt: skip
        "no such lora": ([*data, "--init-lora", str(tmp / "no.safetensors")], "--init-lora: LoRA"),
        "bad option": ([*data, "--cfg-dropout", "1.5"], "--cfg-dropout: cfg_dropout must be in [0, 1)"),
        "bad length": ([*data, "--length", "9"], "--length: length must be in"),
    }


def _with_lora(unet):
    lora.inject(unet, 2, 2.0, lora.DEFAULT_TARGETS, 0)
    return unet


def test_bad_inputs_are_one_line_and_write_nothing(tiny_base, tiny_large, clips, tmp_path, capsys):
    """Each: exit 2, one line on stderr naming the problem, no traceback, no run folder and no cache made."""
    for name, (flags, message) in bad_inputs(clips, tmp_path, tiny_large).items():
        out, cache_dir = tmp_path / f"run-{name}", tmp_path / f"cache-{name}"
        args = ["--model", str(tiny_base), "-o", str(out), "--cache-dir", str(cache_dir), "--quiet"]
        code = cli.main(args + flags)
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, (name, err)
        assert message in err and "Traceback" not in err, (name, err)
        assert not out.exists() and not cache_dir.exists(), name
    # the clips are checked before the model is opened: a bad clip is named even where no model is
    code = cli.main(["--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "junk.jsonl"), "-o",
                     str(tmp_path / "run"), "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "junk.wav cannot be read" in err and len(err.strip().splitlines()) == 1, err


def test_a_missing_package_is_one_line(tiny_base, clips, tmp_path, capsys, monkeypatch):
    """Without peft (a LoRA run) or tensorboard (``--report-to tensorboard``): one line saying how to install it,
    exit 2, before the model is opened and with nothing written."""
    for package, flags in (("peft", []), ("tensorboard", ["--report-to", "tensorboard"])):
        with monkeypatch.context() as m:
            m.setitem(sys.modules, package, None)  # import fails
            out = tmp_path / f"run-{package}"
            code = cli.main(["--model", str(tmp_path / "no-model"), "--data", str(clips), "-o", str(out), "--quiet",
                             *flags])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and "pip install" in err, err
        assert package in err and "unexpected" not in err and not out.exists(), err


# ------------------------------------------------------------------------------------- whole runs


def test_a_lora_run_its_outputs_and_a_rerun(tiny_base, clips, train_cache, tmp_path, capsys):
    """A short LoRA run: the LoRA file (diffusers' format, loadable by the pipeline), checkpoints, metrics,
    loss.png, validation audio with its CLAP score; rerunning into the folder with another setting is refused
    naming it; asking for more steps (constant schedule) continues from the last checkpoint."""
    run = tmp_path / "run"
    flags = ["--steps", "3", "--batch-size", "2", "--save-every", "2", "--validation-prompt", "a beep",
             "--validation-steps", "2", "--validate-every", "2", "--lr", "1e-3"]  # fmt: skip
    assert train(tiny_base, clips, run, train_cache, *flags) == 0
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoint-2", "checkpoint-3", "loss.png", "metrics.jsonl", lora.LORA_FILE, "settings.json", "validation"
    ]  # fmt: skip
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 2, 3, 3]
    assert all(np.isfinite(r["loss"]) and r["lr"] == 1e-3 for r in records if "loss" in r)
    assert (
        isinstance(records[2]["clap_score"], float)
        and records[2]["validation"][0]["file"] == "validation/step-2/0.wav"
    )
    assert (run / "validation" / "step-3" / "0.wav").is_file() and (
        run / "validation" / "step-3" / "0.png"
    ).is_file()
    pipe = AudioLDM2.from_pretrained(tiny_base)
    generate = lambda: pipe("a beep", num_inference_steps=2, audio_length_in_s=0.64,  # noqa: E731
                            generator=torch.Generator().manual_seed(0)).audios  # fmt: skip
    base = generate()
    pipe.load_lora(run)  # the run folder itself
    tuned = generate()
    pipe.unload_lora()
    assert rel_err(tuned, base) > 1e-4 and np.array_equal(generate(), base), rel_err(tuned, base)
    assert len(lora.read_lora(run).down) == 384  # the tiny UNet: 48 transformers x 2 attentions x 4 linears
    capsys.readouterr()
    assert train(tiny_base, clips, run, train_cache, *flags[:-1], "2e-3") == 2
    assert "--lr: " in capsys.readouterr().err
    first = lora_weights(run)
    assert train(tiny_base, clips, run, train_cache, *flags[2:], "--steps", "4") == 0
    assert (run / "checkpoint-4").is_dir() and not (run / "checkpoint-2").exists()  # two kept
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()][-2:] == [4, 4]
    assert any(not torch.equal(first[k], v) for k, v in lora_weights(run).items())


def test_loss_goes_down(tiny_base, clips, train_cache, tmp_path):
    """On two clips, 30 steps of a LoRA at a tiny model's learning rate: the loss of fixed draws (the same t,
    noise and latent sample before and after) falls."""
    data = items_file(clips, tmp_path / "two.jsonl", keep=2)
    run = tmp_path / "run"
    flags = [
        "--steps",
        "30",
        "--batch-size",
        "2",
        "--lr",
        "1e-1",
        "--lora-rank",
        "8",
        "--cfg-dropout",
        "0",
        "--save-every",
        "30",
    ]
    assert train(tiny_base, data, run, train_cache, *flags) == 0
    plan = cli.checked(cli.options_from(cli.parse(["--model", str(tiny_base), "--data", str(data), "-o",
                                                   str(tmp_path / "x"), "--cache-dir", str(train_cache), *SHORT])),
                       cli.layout_from_env(None, {}))  # fmt: skip
    pipe = plan.pipe
    abar = alphas_cumprod(pipe.scheduler_config)

    def loss(unet) -> float:
        total = 0.0
        for k, item in enumerate(plan.items):
            entry = cache.read_entry(train_cache / f"{plan.keys[item.id]}.safetensors")
            for t in range(50, 1000, 100):
                d = objective.draw(entry.mean, entry.logvar, plan.latent_frames, torch.Generator().manual_seed(t + k),
                                   0.411, 1000, 0.0)  # fmt: skip
                cond = Conditions(entry.t5[1:], entry.mask[1:], entry.loa[1:], False)
                with torch.no_grad():
                    total += float(objective.item_losses(unet, d.z0[None], d.noise[None], torch.tensor([t]), cond,
                                                         abar, "epsilon")[0])  # fmt: skip
        return total

    base = copy.deepcopy(pipe.unet)
    before = loss(base)
    lora.attach(base, lora.read_lora(run), fuse=True)
    after = loss(base)
    assert after < 0.95 * before, (before, after)


def test_cache_is_reused_and_keyed_by_content(tiny_base, clips, tmp_path, monkeypatch):
    """A second run encodes nothing; a changed caption re-encodes that item only; the cached conditions are the
    pipeline's own for the prompt with guidance (``encode_prompt``), rows [unconditional, conditional]."""
    calls = []
    real = cache.encode_item
    monkeypatch.setattr(
        cache, "encode_item", lambda pipe, item, *a: calls.append(item.id) or real(pipe, item, *a)
    )
    store = tmp_path / "cache"
    flags = ["--steps", "1", "--batch-size", "1"]
    assert train(tiny_base, clips, tmp_path / "a", store, *flags) == 0
    assert sorted(calls) == [f"c{k}.wav" for k in range(4)]
    assert train(tiny_base, clips, tmp_path / "b", store, *flags) == 0
    assert len(calls) == 4
    changed = items_file(clips, tmp_path / "changed.jsonl", c3="a loud tone")
    assert train(tiny_base, changed, tmp_path / "c", store, *flags) == 0
    assert calls[4:] == ["c3.wav"]
    pipe = AudioLDM2.from_pretrained(tiny_base, low_memory=True, fast=False)  # as the trainer loads it
    with torch.no_grad():
        encoded = {p: pipe.encode_prompt(p) for p in (*CAPTIONS, "a loud tone")}
    entries = [cache.read_entry(path) for path in sorted(store.glob("*.safetensors"))]
    assert len(entries) == 5
    for entry in entries:
        same = [
            p
            for p, (t5, mask, loa) in encoded.items()
            if torch.equal(loa, entry.loa) and torch.equal(t5, entry.t5)
        ]
        assert len(same) == 1 and entry.mask.shape[0] == 2 and entry.mean.shape[0] == 8


def test_cfg_dropout_styles(tiny_base, clips, train_cache, tmp_path):
    """ "inference": per item, the rows encode_prompt made for the empty negative prompt; "original": per batch,
    zeros for GPT-2's states (and T5 of "")."""
    from audioldm2_core.train.loop import Trainer, trained_unet

    def conditions(*flags: str) -> Conditions:
        args = cli.parse(["--model", str(tiny_base), "--data", str(clips), "-o", str(tmp_path / "r"), "--cache-dir",
                          str(train_cache), *SHORT, *flags])  # fmt: skip
        plan = cli.checked(cli.options_from(args), cli.layout_from_env(None, {}))
        cache.fill(plan.pipe, plan.items, plan.keys, train_cache, plan.frames, False)
        unet, params = trained_unet(plan)
        trainer = Trainer(plan, unet, params, cli.layout_from_env(None, {}))
        style = plan.options.cfg_dropout_style == "original"
        return trainer.micro_batch(0, list(enumerate(range(4))), style)[3], plan

    cond, plan = conditions("--cfg-dropout", "0")
    entries = [cache.read_entry(train_cache / f"{plan.keys[it.id]}.safetensors") for it in plan.items]
    assert all(torch.equal(cond.loa[k], e.loa[1]) for k, e in enumerate(entries))
    cond, _ = conditions("--cfg-dropout", "0.99")
    assert all(torch.equal(cond.loa[k], e.loa[0]) for k, e in enumerate(entries))
    length = entries[0].t5.shape[1]
    assert torch.equal(cond.t5[0, :length], entries[0].t5[0])
    cond, _ = conditions("--cfg-dropout", "0.99", "--cfg-dropout-style", "original")
    assert not cond.loa.any() and torch.equal(cond.t5[0, :length], entries[0].t5[0])


def test_options_check():
    base = dict(data=Path("x"), output=Path("y"))
    TrainOptions(**base).check()
    for bad, field in ((dict(steps=0), "steps"), (dict(lr=0.0), "lr"), (dict(ema=1.0), "ema"),
                       (dict(lr_schedule="linear"), "lr_schedule"), (dict(full=True, init_lora=Path("l")), "init_lora"),
                       (dict(validate_every=5), "validate_every"), (dict(lora_targets=()), "lora_targets")):  # fmt: skip
        with pytest.raises(ValueError) as e:
            TrainOptions(**base, **bad).check()
        assert e.value.field == field
    assert (
        "steps" not in TrainOptions(**base).settings()
        and "steps" in TrainOptions(**base, lr_schedule="cosine", lr_warmup=1).settings()
    )
