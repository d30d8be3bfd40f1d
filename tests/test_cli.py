"""The command line, through a subprocess as a user runs it: WAVs written, bad input refused in one line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from audioldm2_core.fast import cpu_attention
from tests.helpers import CPU_KERNEL, rel_err

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path | None = None, **env_extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **env_extra}
    return subprocess.run(
        [sys.executable, "-m", "audioldm2_core", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def test_writes_a_wav_of_the_right_length_and_rate(tiny_base, tmp_path):
    out = tmp_path / "dog.wav"
    r = run("a dog barks", "-o", str(out), "--model", str(tiny_base), "--steps", "2", "--length", "1.5",
            "--seed", "0", "--sampler", "dpmpp-2m", "--negative", "noise")  # fmt: skip
    assert r.returncode == 0, r.stderr
    audio, rate = sf.read(out, dtype="float32")
    assert rate == 16000 and audio.shape == (24000,)
    assert r.stdout.strip() == str(out)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the temp file was renamed


def test_same_seed_same_file_and_candidates(tiny_base, tmp_path):
    args = ["rain on a tin roof", "--model", str(tiny_base), "--steps", "2", "--length", "1.0", "--seed", "3"]
    assert run(*args, "-o", str(tmp_path / "a.wav"), "--quiet").returncode == 0
    r = run(*args, "-o", str(tmp_path / "b.wav"), "--candidates", "2", "--all-candidates", "--no-low-memory")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "b.rank1.wav").is_file() and (tmp_path / "b.rank2.wav").is_file()
    best = sf.read(tmp_path / "b.wav")[0]
    assert (best == sf.read(tmp_path / "b.rank1.wav")[0]).all()
    a = sf.read(tmp_path / "a.wav")[0]
    assert a.shape == (16000,) and (a == sf.read(tmp_path / "a.wav")[0]).all()


@pytest.mark.parametrize("name", ["ddim", "dpmpp-2m", "dpmpp-2m-karras", "dpmpp-2m-sde", "dpmpp-2m-sde-karras",
                                  "unipc", "deis", "dpmpp-2s", "euler", "euler-a", "heun", "kdpm2", "kdpm2-a",
                                  "lms", "pndm", "ddpm"])  # fmt: skip
def test_every_sampler_name_is_accepted(name, tmp_path):
    from audioldm2_core.cli import DESCRIPTION, checked
    from audioldm2_core.frontend import ONE, parse

    args = parse(ONE, ["rain", "-o", str(tmp_path / "x.wav"), "--sampler", name], DESCRIPTION)
    request, _, wav, picture = checked(args)
    assert (request.prompt, request.sampler, wav, picture) == ("rain", name, tmp_path / "x.wav", None)


def test_a_new_sampler_end_to_end(tiny_base, tmp_path):
    out = tmp_path / "a.wav"
    r = run("rain", "-o", str(out), "--model", str(tiny_base), "--steps", "2", "--length", "1.0",
            "--seed", "0", "--sampler", "euler-a", "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert sf.read(out)[0].shape == (16000,)


def test_plain_flag(tiny_base, tmp_path):
    """``--plain`` runs the model without the speed layer: the same audio to float32 rounding."""
    args = ["a bell", "--model", str(tiny_base), "--steps", "2", "--length", "1.0", "--seed", "5", "--quiet",
            "--dtype", "float32"]  # fmt: skip
    assert run(*args, "-o", str(tmp_path / "plain.wav"), "--plain").returncode == 0
    assert run(*args, "-o", str(tmp_path / "fast.wav")).returncode == 0
    plain, fast = sf.read(tmp_path / "plain.wav")[0], sf.read(tmp_path / "fast.wav")[0]
    assert plain.shape == fast.shape == (16000,)
    assert ((plain - fast) ** 2).sum() ** 0.5 <= 1e-4 * (plain**2).sum() ** 0.5


def test_cpu_attention_flag(tiny_base, tmp_path):
    """--cpu-attention: the kernel is built (or found built) and used where it applies; the same audio within
    float32 rounding. Without a compiler, or without AVX-512 or AVX2: one line saying what is missing, and
    PyTorch's attention runs (the front ends never fail on the kernel; the API's cpu_attention=True does)."""
    args = ["wind in the trees", "--model", str(tiny_base), "--steps", "2", "--length", "1.0", "--seed", "1",
            "--dtype", "float32"]  # fmt: skip
    assert run(*args, "-o", str(tmp_path / "plain.wav"), "--quiet").returncode == 0
    plain = sf.read(tmp_path / "plain.wav")[0]
    r = run(*args, "-o", str(tmp_path / "kernel.wav"), "--quiet", "--cpu-attention")
    assert r.returncode == 0, r.stderr
    kernel = sf.read(tmp_path / "kernel.wav")[0]
    assert abs(plain - kernel).max() <= 1e-5 * abs(plain).max()
    if not CPU_KERNEL:
        assert r.stderr.splitlines() == [
            "audioldm2: the CPU attention kernel needs AVX-512 or AVX2 (PyTorch reports "
            f"{cpu_attention.isa()} for this CPU); PyTorch's attention runs"
        ]
        return
    assert r.stderr == ""
    r = run(*args, "-o", str(tmp_path / "none.wav"), "--quiet", "--cpu-attention", CXX="/nonexistent/c++",
            XDG_CACHE_HOME=str(tmp_path / "cache"))  # fmt: skip
    assert r.returncode == 0 and "Traceback" not in r.stderr
    assert r.stderr.splitlines() == [
        "audioldm2: the CPU attention kernel could not be built: it needs a C++ compiler and ninja; PyTorch's "
        "attention runs"
    ]
    # an empty cache: the speed layer times its routes again and may pick other exact rewrites, whose float
    # rounding differs: the same audio to the whole-generation tolerance (relative L2 <= 1e-4)
    assert rel_err(sf.read(tmp_path / "none.wav")[0], plain) <= 1e-4


def test_prompts_file(tiny_base, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\nthunder|storm\n\nbirds singing at dawn\n", encoding="utf-8")
    outdir = tmp_path / "out"
    outdir.mkdir()
    r = run("--prompts-file", str(prompts), "-o", str(outdir), "--model", str(tiny_base), "--steps", "1",
            "--length", "1.0", "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in outdir.glob("*.wav")) == ["0002.wav", "storm.wav"]
    assert (outdir / "manifest.jsonl").is_file()  # how each was made (tests/test_synthesis.py)


@pytest.mark.parametrize(
    "args, message",
    [
        (["", "-o", "x.wav"], "the prompt is empty"),
        (["   ", "-o", "x.wav"], "the prompt is empty"),
        (["rain", "--steps", "0"], "--steps: num_inference_steps must be at least 1, got 0"),
        (["rain", "--steps", "-5"], "--steps: num_inference_steps must be at least 1, got -5"),
        (["rain", "--length", "0"], "--length: audio_length_in_s must be in (0, 600.0] s, got 0.0"),
        (["rain", "--length", "-3"], "--length: audio_length_in_s must be in (0, 600.0] s, got -3.0"),
        (["rain", "--sampler", "eulr"], "unknown sampler 'eulr'; choose one of ddim, dpmpp-2m, "),
        (
            ["rain", "--candidates", "0"],
            "--candidates: num_waveforms_per_prompt must be a positive int, got 0",
        ),
        (["rain", "--cuda-graphs"], "--cuda-graphs: cuda_graphs needs a CUDA device, not cpu"),
        (["rain", "-o", "/nonexistent-dir/x.wav"], "output folder /nonexistent-dir does not exist"),
        (["rain", "--model", "/no/such/folder"], "/no/such/folder: no such folder, and not a hub repo id"),
        (["rain", "--model", "nobody/no-such-model"], "nobody/no-such-model: not in the local hub cache"),
        (["rain", "--steps", "two"], "argument --steps: invalid int value: 'two'"),
        ([], "give exactly one of a prompt or --prompts-file"),
    ],
)
def test_bad_input_gives_one_line_and_no_traceback(args, message, tmp_path):
    r = run(*args, cwd=tmp_path)
    assert r.returncode != 0
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert message in last
    assert not list(tmp_path.glob("*.wav"))


def test_unwritable_output_and_bad_prompts_file(tiny_base, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = run("rain", "-o", str(blocker / "x.wav"), "--model", str(tiny_base))
    assert r.returncode != 0 and f"output folder {blocker} does not exist" in r.stderr
    r = run("rain", "-o", str(tmp_path), "--model", str(tiny_base))
    assert r.returncode != 0 and "is a folder; give a .wav file name" in r.stderr
    bad = tmp_path / "p.txt"
    bad.write_text("a|x\nb|x\n")
    r = run("--prompts-file", str(bad), "-o", str(tmp_path), "--model", str(tiny_base))
    assert r.returncode != 0 and "name 'x' is used twice" in r.stderr
    r = run("--prompts-file", str(tmp_path / "missing.txt"), "--model", str(tiny_base))
    assert r.returncode != 0 and "cannot read prompts file" in r.stderr


def test_spectrogram_per_written_wav_and_the_device_line(tiny_base, tmp_path):
    """``--spectrogram x.png``: one picture per written WAV, named like them; the device printed in one line."""
    from PIL import Image

    pytest.importorskip("matplotlib", reason="--spectrogram needs matplotlib")
    out, picture = tmp_path / "b.wav", tmp_path / "pics" / "b.png"
    picture.parent.mkdir()
    r = run("a bell", "-o", str(out), "--model", str(tiny_base), "--steps", "2", "--length", "1.0",
            "--candidates", "2", "--all-candidates", "--spectrogram", str(picture), "--dtype", "float32")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines()[0].startswith("audioldm2: cpu, float32, ")  # AUDIOLDM2_DEVICE=cpu (conftest)
    assert sorted(p.name for p in picture.parent.iterdir()) == ["b.png", "b.rank1.png", "b.rank2.png"]
    assert all(Image.open(p).format == "PNG" for p in picture.parent.iterdir())


def test_spectrogram_folder_with_a_prompts_file(tiny_base, tmp_path, capsys):
    """With ``--prompts-file``, ``--spectrogram`` names a folder: one ID.png per written WAV (in-process)."""
    from audioldm2_core.__main__ import main

    pytest.importorskip("matplotlib", reason="--spectrogram needs matplotlib")
    prompts, pictures, out = tmp_path / "prompts.txt", tmp_path / "pictures", tmp_path / "out"
    prompts.write_text("thunder|storm\nbirds\n", encoding="utf-8")
    pictures.mkdir()
    common = ["--prompts-file", str(prompts), "--model", str(tiny_base), "--steps", "2", "--length", "0.32"]
    assert main([*common, "-o", str(out), "--spectrogram", str(pictures), "--quiet"]) == 0
    assert sorted(p.name for p in pictures.iterdir()) == ["0002.png", "storm.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in pictures.iterdir())
    assert main([*common, "-o", str(tmp_path / "o2"), "--spectrogram", str(tmp_path / "x")]) == 2
    assert "output folder" in capsys.readouterr().err.splitlines()[-1]


def test_device_auto_resolution(monkeypatch):
    """``auto`` / None: CUDA, then MPS, then the CPU; AUDIOLDM2_DEVICE overrides; ``--dtype auto`` follows."""
    import torch

    from audioldm2_core.frontend import resolve_device_and_dtype
    from audioldm2_core.pipeline import resolve_device

    monkeypatch.delenv("AUDIOLDM2_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == resolve_device("auto") == torch.device("cuda")
    assert resolve_device_and_dtype("auto", "auto") == ("cuda", "float16")
    assert resolve_device_and_dtype("auto", "bfloat16") == ("cuda", "bfloat16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device(None) == torch.device("mps")
    assert resolve_device_and_dtype("auto", "auto") == ("mps", "float32")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu") and resolve_device("cuda:1") == torch.device("cuda:1")
    monkeypatch.setenv("AUDIOLDM2_DEVICE", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")


def test_speech_transcription_flags(tiny_ljspeech, tmp_path):
    """A speech checkpoint from the CLI: --transcription with --phonemes (no espeak-ng needed), --max-new-tokens,
    the same audio as the API; its errors in one line."""
    import numpy as np
    import torch

    from audioldm2_core import AudioLDM2

    out = tmp_path / "speech.wav"
    args = ["a man speaks", "--model", str(tiny_ljspeech), "--steps", "2", "--length", "1.0", "--seed", "1",
            "--plain", "--dtype", "float32"]  # fmt: skip
    r = run(*args, "-o", str(out), "--transcription", "həlˈoʊ wˈɜːld", "--phonemes", "--quiet",
            "--max-new-tokens", "8")  # fmt: skip
    assert r.returncode == 0, r.stderr
    got = sf.read(out, dtype="float32")[0]
    pipe = AudioLDM2.from_pretrained(tiny_ljspeech, fast=False)
    want = pipe("a man speaks", transcription="həlˈoʊ wˈɜːld", transcription_is_phonemes=True,
                num_inference_steps=2, audio_length_in_s=1.0, max_new_tokens=8,
                generator=torch.Generator().manual_seed(1)).audios[0]  # fmt: skip
    assert got.shape == (16000,) and np.abs(got - want).max() <= 1e-4 * np.abs(want).max()

    for extra, message in (
        ([], "text-to-speech checkpoint: pass `transcription=`"),
        (["--phonemes"], "--phonemes: transcription_is_phonemes says how to read the transcription"),
    ):
        r = run(*args, "-o", str(tmp_path / "x.wav"), "--quiet", *extra)
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert message in r.stderr and "Traceback" not in r.stderr
    # the phonemiser missing: a stub that fails to import stands in for an uninstalled `phonemizer`
    (tmp_path / "stub").mkdir()
    (tmp_path / "stub" / "phonemizer.py").write_text("raise ImportError('No module named phonemizer')\n")
    r = run(*args, "-o", str(tmp_path / "y.wav"), "--quiet", "--transcription", "hello",
            PYTHONPATH=f"{tmp_path / 'stub'}{os.pathsep}{ROOT}")  # fmt: skip
    assert r.returncode == 1 and 'pip install ".[speech]"' in r.stderr and "--phonemes" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_transcription_for_a_sound_checkpoint(tiny_base, tmp_path):
    r = run("a dog", "--model", str(tiny_base), "--steps", "1", "--length", "1.0", "--quiet",
            "--transcription", "woof", "-o", str(tmp_path / "x.wav"))  # fmt: skip
    assert r.returncode == 1 and "`transcription` is for the text-to-speech checkpoints" in r.stderr


# ------------------------------------------------------------------------------------ audio input


def test_audio_input_examples(tiny_base, tmp_path):
    """The README's examples on a tiny checkpoint: style transfer keeps the input's length, --inpaint
    (several spans) keeps the rest, --super-resolution on an 8 kHz file, --length overrides."""
    import numpy as np

    rng = np.random.default_rng(0)
    sf.write(tmp_path / "in.wav", (0.2 * rng.standard_normal((15435, 2))).astype(np.float32), 22050)  # 0.7 s
    sf.write(tmp_path / "phone.wav", (0.2 * rng.standard_normal(4000)).astype(np.float32), 8000)
    common = ["--model", str(tiny_base), "--steps", "2", "--seed", "0", "--plain", "--dtype", "float32"]
    r = run("jazz version", "--audio", str(tmp_path / "in.wav"), "--strength", "0.6", "-o",
            str(tmp_path / "out.wav"), *common)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert sf.read(tmp_path / "out.wav")[0].shape == (11200,)  # 0.7 s at 16 kHz
    # the other modes in process (the same main(), without a second interpreter's start-up)
    from audioldm2_core.cli import main

    fill = [
        "a bell",
        "--audio",
        str(tmp_path / "in.wav"),
        "--inpaint",
        "0.1-0.2,0.3-0.35",
        "--inpaint",
        "0.5-0.6",
    ]
    assert main([*fill, "--length", "1.0", "-o", str(tmp_path / "fill.wav"), "--quiet", *common]) == 0
    assert sf.read(tmp_path / "fill.wav")[0].shape == (16000,)
    wide = [
        "speech",
        "--audio",
        str(tmp_path / "phone.wav"),
        "--super-resolution",
        "-o",
        str(tmp_path / "w.wav"),
    ]
    assert main([*wide, "--quiet", *common]) == 0
    assert sf.read(tmp_path / "w.wav")[0].shape == (8000,)


def test_audio_flags_to_pipeline_arguments(tmp_path):
    from audioldm2_core.cli import DESCRIPTION, edit_from
    from audioldm2_core.frontend import ONE, parse
    from audioldm2_core.request import AudioEdit

    def options(*flags):
        return edit_from(parse(ONE, ["x", "-o", str(tmp_path / "x.wav"), *flags], DESCRIPTION))

    wav = str(tmp_path / "in.wav")
    assert options() is None
    assert options("--audio", wav) == AudioEdit(Path(wav))
    assert options("--audio", wav).resolved_strength == 0.6
    got = options("--audio", wav, "--inpaint", "3.5-5.0", "--inpaint", "1-2,6-7", "--inpaint-band", "0-500")
    assert got.spans_s == ((3.5, 5.0), (1.0, 2.0), (6.0, 7.0)) and got.resolved_strength == 1.0
    assert got.bands_hz == ((0.0, 500.0),)
    got = options("--audio", wav, "--super-resolution", "3000", "--strength", "0.8")
    assert got.super_resolution and got.cutoff_hz == 3000 and got.resolved_strength == 0.8
    assert options("--audio", wav, "--super-resolution").cutoff_hz is None


def _wav(samples, rate=16000, subtype="FLOAT"):
    import numpy as np

    return lambda p: sf.write(p, np.asarray(samples, dtype=np.float64), rate, subtype=subtype)


@pytest.mark.parametrize(
    "make, flags, message",
    [
        (None, [], "missing.wav does not exist"),
        (lambda p: p.write_text("not audio"), [], "cannot read audio file"),  # a text file named .wav
        (_wav([]), [], "is empty (0 samples)"),
        (_wav([0.0, float("nan")]), [], "contains NaN or infinite samples"),
        (_wav([0.0] * 60200, rate=100), [], "s long; at most 600"),
        (lambda p: p.mkdir(), [], "does not exist (a folder)"),
        (_wav([0.0] * 800), ["--strength", "0.1", "--steps", "4"], "runs no step"),
        (_wav([0.0] * 800), ["--inpaint", "3"], "--inpaint '3': give START-END in seconds"),
        (_wav([0.0] * 800), ["--super-resolution", "high"], "give a cutoff in Hz"),
    ],
)
def test_bad_audio_input_is_one_line(make, flags, message, tmp_path, capsys):
    """Checked before any model loads (in process: the same main() the command runs)."""
    from audioldm2_core.cli import main

    path = tmp_path / ("missing.wav" if make is None else "in.wav")
    if make is not None:
        make(path)
    code = main(["x", "--audio", str(path), "-o", str(tmp_path / "o.wav"), "--model", "/no/model", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0] and "Traceback" not in err[0]


def test_audio_flags_need_audio(capsys, tmp_path):
    from audioldm2_core.cli import main

    assert main(["x", "-o", str(tmp_path / "o.wav"), "--inpaint", "1-2", "--strength", "0.5"]) == 2
    assert "--strength, --inpaint: only with an input, --audio WAV" in capsys.readouterr().err


def test_unreachable_hub_is_three_lines(tmp_path, monkeypatch, capsys):
    """The real hub client against a closed local port (its five retries' sleeps skipped): the device line, one
    line saying it retries (not the client's ten warnings), and the error; exit 1, no traceback."""
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _http

    from audioldm2_core.__main__ import main

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(hf_api.api, "endpoint", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(_http.time, "sleep", lambda s: None)
    code = main(["rain", "--model", "nobody/unreachable", "-o", str(tmp_path / "x.wav")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 3, err
    assert err[0].startswith("audioldm2: cpu, ") and "retrying" in err[1]
    assert err[2].startswith("audioldm2: error: nobody/unreachable: cannot reach the Hugging Face hub"), err[
        2
    ]


@pytest.mark.parametrize(
    "args, line",
    [
        (
            ["--prompts-file", "x.jsonl", "--audio", "in.wav"],
            "--audio: with one prompt only (audioldm2 PROMPT",
        ),
        (
            ["--prompts-file", "x.jsonl", "--inpaint", "1-2", "--strength", "1"],
            "--inpaint, --strength: with one",
        ),
        (["rain", "--shard", "1/2"], "--shard: with --prompts-file only, not with a prompt"),
        (["rain", "--batch-size", "4"], "--batch-size: with --prompts-file only"),
    ],
)
def test_a_flag_of_the_other_command_is_one_line(args, line, tmp_path, capsys):
    """Each command parses its own flags: one that applies only to the other is refused before anything is
    read or loaded, in one line, exit 2 (a prompts file used to ignore --audio silently)."""
    from audioldm2_core.__main__ import main

    with pytest.raises(SystemExit) as stop:
        main([*args, "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and line in err[0], err
    assert not list(tmp_path.iterdir())
