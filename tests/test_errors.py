"""Each failure a new user can meet gives one clear line and a non-zero exit, no traceback (``--debug`` shows
it): the errors are injected (the hub's download functions, the pipeline, the writers monkeypatched), so no
network is needed, and the CLI runs in this process."""

from __future__ import annotations

import errno
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants

from audioldm2_core import cli, errors, pipeline
from audioldm2_core.errors import CheckpointError, UsageError
from audioldm2_core.loading import hub_snapshot

REPO = "someone/some-model"


def _hub_error(name: str, message: str = "401 Client Error"):
    """One of huggingface_hub's HTTP errors, without a response object (its type differs across versions)."""
    cls = getattr(huggingface_hub.errors, name)
    e = cls.__new__(cls)
    Exception.__init__(e, message)
    return e


def _wrapped(outer: BaseException, inner: BaseException) -> BaseException:
    """``outer`` as raised by ``raise outer from inner``."""
    outer.__cause__ = inner
    return outer


def _client_error(library: str, name: str, message: str):
    """An error of an HTTP client huggingface_hub uses: httpx2 (2.x), httpx (1.x), requests (0.x)."""
    module = pytest.importorskip(
        library, reason=f"{library} (a huggingface_hub client) is not installed here"
    )
    return getattr(module, name)(message)


def _httpx2(name: str, message: str):
    return _client_error("httpx2", name, message)


def _httpx(name: str, message: str):
    return _client_error("httpx", name, message)


def _requests(name: str, message: str):
    return _client_error("requests.exceptions", name, message)


def _lenf(message: str = "An error happened while trying to locate the files on the Hub"):
    return huggingface_hub.errors.LocalEntryNotFoundError(message)


UNREACHABLE = f"{REPO}: cannot reach the Hugging Face hub"
# (what the hub's functions raise, the start of the line the user sees)
HUB_FAILURES = {
    "hub 2.x ConnectError": (
        lambda: _httpx2("ConnectError", "[Errno -2] Name or service not known"),
        UNREACHABLE,
    ),
    "hub 2.x timeout": (lambda: _httpx2("ConnectTimeout", "timed out"), UNREACHABLE),
    "hub 1.x ConnectError": (
        lambda: _httpx("ConnectError", "[Errno -3] Temporary failure in name resolution"),
        UNREACHABLE,
    ),
    "hub 1.x read timeout": (lambda: _httpx("ReadTimeout", "The read operation timed out"), UNREACHABLE),
    "hub 0.x requests": (lambda: _requests("ConnectionError", "Max retries exceeded"), UNREACHABLE),
    "hub 0.x requests timeout": (lambda: _requests("ReadTimeout", "Read timed out."), UNREACHABLE),
    "OSError wrapping ConnectError": (
        lambda: _wrapped(
            OSError("We couldn't connect to 'https://huggingface.co'"), _httpx("ConnectError", "refused")
        ),
        UNREACHABLE,
    ),
    "LocalEntryNotFoundError from a timeout": (
        lambda: _wrapped(_lenf(), _httpx("ConnectTimeout", "timed out")),
        UNREACHABLE,
    ),
    "a bare socket timeout": (lambda: TimeoutError("timed out"), UNREACHABLE),
    "LocalEntryNotFoundError": (lambda: _lenf(), f"{REPO}: not in the local hub cache"),
    "OfflineModeIsEnabled": (
        lambda: huggingface_hub.errors.OfflineModeIsEnabled("HF_HUB_OFFLINE=1"),
        f"{REPO}: not in the local hub cache",
    ),
    "gated": (lambda: _hub_error("GatedRepoError", "403 Client Error"), f"{REPO}: the repository is gated"),
    "missing": (lambda: _hub_error("RepositoryNotFoundError"), f"{REPO}: no such repository on the hub"),
    "missing revision": (lambda: _hub_error("RevisionNotFoundError", "404"), f"{REPO}: no such revision"),
    "disk full while downloading": (
        lambda: OSError(errno.ENOSPC, "No space left on device", "/cache/blobs/abc.incomplete"),
        f"{REPO}: no space left on the disk writing /cache/blobs/abc.incomplete while downloading",
    ),
    "disk full, wrapped": (
        lambda: _wrapped(RuntimeError("download failed"), OSError(errno.ENOSPC, "No space left on device")),
        f"{REPO}: no space left on the disk while downloading",
    ),
    "server error": (
        lambda: _hub_error("HfHubHTTPError", "500 Server Error"),
        f"{REPO}: download failed: 500",
    ),
}


@pytest.fixture
def hub_raises(monkeypatch):
    """Make the hub's listing and download functions raise the given error (the listing only online)."""

    def install(make_error, where: str = "list"):
        def fail(*args, **kwargs):
            raise make_error()

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(
            huggingface_hub, "list_repo_files", fail if where == "list" else lambda *a, **k: []
        )
        monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)

    return install


@pytest.mark.parametrize("case", list(HUB_FAILURES))
def test_hub_failures_are_one_checkpoint_error(case, hub_raises):
    make_error, line = HUB_FAILURES[case]
    hub_raises(make_error)
    with pytest.raises(CheckpointError) as info:
        hub_snapshot(REPO)
    assert str(info.value).startswith(line), str(info.value)
    assert "\n" not in str(info.value)
    hub_raises(make_error, where="download")  # the same from the download itself
    with pytest.raises(CheckpointError, match="^" + line.split(":")[0]):
        hub_snapshot(REPO)


def test_gated_names_the_page_and_login(hub_raises):
    hub_raises(lambda: _hub_error("GatedRepoError", "403"))
    with pytest.raises(CheckpointError, match=rf"https://huggingface.co/{REPO}, then log in .*HF_TOKEN"):
        hub_snapshot(REPO)


def test_offline_mode_says_so(hub_raises, monkeypatch):
    hub_raises(_lenf, where="download")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="not in the local hub cache .* HF_HUB_OFFLINE is set"):
        hub_snapshot(REPO)


def test_unrecognised_errors_pass_through(hub_raises):
    hub_raises(lambda: KeyError("a bug"))
    with pytest.raises(KeyError):
        hub_snapshot(REPO)


def test_explain_outside_the_hub():
    assert errors.explain(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")) == (
        f"out of GPU memory: {errors.OOM_ADVICE}"
    )
    assert errors.explain(RuntimeError("MPS backend out of memory (MPS allocated: 9 GB)")).startswith(
        "out of memory"
    )
    assert errors.explain(RuntimeError("DefaultCPUAllocator: can't allocate memory: 80 GB")).startswith(
        "out of memory"
    )
    full = OSError(errno.ENOSPC, "No space left on device", "/out/dog.wav")
    assert (
        errors.explain(full)
        == "no space left on the disk writing /out/dog.wav; free some space or write elsewhere"
    )
    assert errors.explain(PermissionError(errno.EACCES, "Permission denied", "/out/dog.wav")) == (
        "/out/dog.wav: Permission denied"
    )
    assert errors.explain(UsageError("steps must be at least 1\nmore detail")) == "steps must be at least 1"
    for bug in (ValueError("x"), TypeError("x"), KeyError("a bug"), RuntimeError("x"), ImportError("x")):
        assert errors.explain(bug) is None, bug  # a bare builtin from inside is a bug, not a user's failure


# ------------------------------------------------------------------------------- through the command line


def _main(capsys, *args: str) -> tuple[int, str]:
    code = cli.main(list(args))
    return code, capsys.readouterr().err


def _one_line(err: str, line: str) -> None:
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("audioldm2: error: ") and line in last, err


@pytest.mark.parametrize("case", ["hub 2.x ConnectError", "hub 1.x read timeout", "gated", "missing",
                                  "disk full while downloading", "OfflineModeIsEnabled"])  # fmt: skip
def test_cli_hub_failures(case, hub_raises, capsys, tmp_path):
    make_error, line = HUB_FAILURES[case]
    hub_raises(make_error)
    code, err = _main(capsys, "rain", "--model", REPO, "-o", str(tmp_path / "x.wav"))
    assert code == 1
    _one_line(err, line)
    code, err = _main(capsys, "rain", "--model", REPO, "-o", str(tmp_path / "x.wav"), "--debug")
    assert code == 1 and "Traceback" in err and line in err.strip().splitlines()[-1]
    assert not list(tmp_path.iterdir())


class _FakePipe:
    """Stands in for a loaded pipeline: returns audio, or raises the error it was given."""

    sample_rate = 16000

    def __init__(self, error: BaseException | None = None):
        self.error = error

    def __call__(self, *args, num_waveforms_per_prompt=1, **kwargs):
        if self.error is not None:
            raise self.error
        audios = torch.zeros(num_waveforms_per_prompt, 1600).numpy()
        return pipeline.AudioOutput(audios=audios, sample_rate=16000)


@pytest.fixture
def fake_pipe(monkeypatch):
    def install(error: BaseException | None = None):
        monkeypatch.setattr(
            pipeline.AudioLDM2, "from_pretrained", classmethod(lambda cls, *a, **k: _FakePipe(error))
        )

    return install


def test_cli_cuda_out_of_memory(fake_pipe, capsys, tmp_path):
    fake_pipe(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB"))
    code, err = _main(capsys, "rain", "-o", str(tmp_path / "x.wav"), "--quiet")
    assert code == 1
    _one_line(
        err,
        "out of GPU memory: try --low-memory, fewer candidates, shorter audio (--length), or --dtype float16",
    )


def test_cli_disk_full_while_writing(fake_pipe, monkeypatch, capsys, tmp_path):
    import soundfile

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    fake_pipe()
    monkeypatch.setattr(soundfile, "write", full)
    out = tmp_path / "x.wav"
    code, err = _main(capsys, "rain", "-o", str(out), "--quiet")
    assert code == 1
    _one_line(err, f"no space left on the disk writing {out}")
    assert not list(tmp_path.iterdir())  # the temp file is gone too


def test_cli_output_that_cannot_be_written(fake_pipe, capsys, tmp_path):
    fake_pipe()
    (tmp_path / "x.rank1.wav").mkdir()  # in the way of a candidate's file, found only when writing it
    code, err = _main(
        capsys, "rain", "-o", str(tmp_path / "x.wav"), "--quiet", "--candidates", "2", "--all-candidates"
    )
    assert code == 1
    _one_line(err, f"{tmp_path / 'x.rank1.wav'}: Is a directory")
    code, err = _main(capsys, "rain", "-o", str(tmp_path / "file.wav" / "x.wav"), "--quiet")
    assert code == 2
    _one_line(err, "does not exist")
    (tmp_path / "pic").mkdir()
    code, err = _main(capsys, "rain", "-o", str(tmp_path / "y.wav"), "--spectrogram", str(tmp_path / "pic"))
    assert code == 2
    _one_line(err, "is a folder; give a .png file name")
    assert not (tmp_path / "y.wav").exists()


def test_cli_unexpected_error_points_to_debug(fake_pipe, capsys, tmp_path):
    fake_pipe(KeyError("a bug"))
    code, err = _main(capsys, "rain", "-o", str(tmp_path / "x.wav"), "--quiet")
    assert code == 1
    _one_line(err, "KeyError: 'a bug' (unexpected; --debug shows the traceback)")


def test_a_bug_while_checking_the_arguments_exits_1(monkeypatch, capsys, tmp_path):
    """Exit 2 is a user's mistake in the arguments; a bug met while checking them is a bug: exit 1."""
    from audioldm2_core import request

    def broken(self):
        raise KeyError("a bug")

    code, err = _main(capsys, "rain", "-o", str(tmp_path / "x.wav"), "--steps", "0")
    assert code == 2  # a user's mistake
    monkeypatch.setattr(request.GenerationRequest, "check", broken)
    code, err = _main(capsys, "rain", "-o", str(tmp_path / "x.wav"), "--quiet")
    assert code == 1
    _one_line(err, "KeyError: 'a bug' (unexpected; --debug shows the traceback)")


def test_cli_spectrogram_without_matplotlib(monkeypatch, capsys, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    for name in [m for m in sys.modules if m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    code, err = _main(capsys, "rain", "-o", str(tmp_path / "x.wav"), "--spectrogram", str(tmp_path / "x.png"))
    assert code == 2
    _one_line(err, 'spectrograms need matplotlib: pip install "audioldm2-core[spectrogram]"')
    assert not Path(tmp_path / "x.wav").exists()


# ------------------------------------------------------------------ an internal error, at a few depths
# A bug raises a bare builtin somewhere inside; each front end shows it as one: its type, its message and a
# pointer to --debug (which adds the traceback), never as if the user had made a mistake.

BUG = "(unexpected; --debug shows the traceback)"
# Two steps of one second, without the speed layer (--plain: its first timings take seconds on a busy machine;
# where the bug is raised is what matters here).
QUICK = ["--steps", "2", "--length", "1.0", "--quiet", "--plain"]


def _inject(monkeypatch, owner, name: str, error: BaseException) -> str:
    """``owner.name`` raises ``error``; the line a front end should show for it."""

    def raise_(*args, **kwargs):
        raise error

    monkeypatch.setattr(owner, name, raise_)
    return f"{type(error).__name__}: {error} {BUG}"


def _depths():
    from audioldm2_core import conditioning, loading, samplers, unet, vae, vocoder

    return {  # the UNet's call, not its forward: the speed layer's UNet (a subclass) has a forward of its own
        "loader": (loading.Checkpoint, "read_weights", KeyError("model.safetensors")),
        "prompt encoding": (
            conditioning,
            "encode_prompt",
            TypeError("'NoneType' object is not subscriptable"),
        ),
        "UNet forward": (unet.AudioLDM2UNet, "__call__", KeyError("down_blocks.9")),
        "sampler step": (samplers, "_done", RuntimeError("step 1 of 0")),
        "VAE decode": (
            vae.AutoencoderKLDecoder,
            "decode",
            AttributeError("'Tensor' has no attribute 'sample'"),
        ),
        "vocoder": (vocoder.SpeechT5HifiGan, "forward", TypeError("conv1d() got an unexpected 'pad'")),
    }


def _last(err: str, prog: str, line: str) -> None:
    assert err.strip().splitlines()[-1] == f"{prog}: error: {line}", err


@pytest.mark.parametrize(
    "depth", ["loader", "prompt encoding", "UNet forward", "sampler step", "VAE decode", "vocoder"]
)
def test_cli_internal_error_is_shown_as_a_bug(depth, tiny_base, monkeypatch, capsys, tmp_path):
    line = _inject(monkeypatch, *_depths()[depth])
    out = tmp_path / "x.wav"
    args = ["rain", "--model", str(tiny_base), "-o", str(out), *QUICK]
    code, err = _main(capsys, *args)
    assert code == 1 and "Traceback" not in err
    _last(err, "audioldm2", line)
    assert not out.exists()
    if depth == "UNet forward":  # --debug adds the traceback (once: each run is a generation)
        code, err = _main(capsys, *args, "--debug")
        assert code == 1 and "Traceback" in err
        _last(err, "audioldm2", line)


@pytest.mark.parametrize("depth", ["loader", "UNet forward", "vocoder", "manifest write"])
def test_prompts_file_internal_error_is_shown_as_a_bug(depth, tiny_base, monkeypatch, capsys, tmp_path):
    from audioldm2_core import manifest, synthesis

    where = (
        (manifest.RankLog, "append", KeyError("sha256")) if depth == "manifest write" else _depths()[depth]
    )
    line = _inject(monkeypatch, *where)
    items = tmp_path / "items.jsonl"
    items.write_text('{"id": "a", "prompt": "rain"}\n')
    args = ["--prompts-file", str(items), "-o", str(tmp_path / "out"), "--model", str(tiny_base), *QUICK]
    for debug in ([], ["--debug"]) if depth == "vocoder" else ([],):
        code = synthesis.main(args + debug)
        err = capsys.readouterr().err
        assert code == 1 and ("Traceback" in err) == bool(debug), err
        _last(err, "audioldm2", line)
        assert not list((tmp_path / "out").glob("manifest*"))  # nothing done, nothing written


@pytest.mark.parametrize("depth", ["prompt encoding", "UNet forward", "VAE decode"])
def test_demo_handler_internal_error_is_shown_as_a_bug(depth, tiny_base, monkeypatch, capsys):
    gr = pytest.importorskip("gradio", reason="the demo needs gradio (pip install '.[demo]')")
    pytest.importorskip("matplotlib", reason="the demo needs matplotlib (pip install '.[demo]')")
    from audioldm2_core import demo

    pipe = pipeline.AudioLDM2.from_pretrained(tiny_base, device="cpu", fast=False)
    handler = next(f.fn for f in demo.build_app(pipe, steps=2).fns.values() if f.api_name == "generate")

    def press(prompt: str) -> str:
        """The Generate button with ``prompt``: the line shown in the browser."""
        with pytest.raises(gr.Error) as info:
            handler(prompt, "", 1.0, 2, "ddim", 3.5, 0, 1, progress=lambda *a, **k: None)
        return info.value.message

    assert press("") == "the prompt is empty"  # a user's mistake: its line, no traceback in the log
    assert "Traceback" not in capsys.readouterr().err
    line = _inject(monkeypatch, *_depths()[depth])
    assert press("rain") == line
    assert "Traceback" in capsys.readouterr().err  # the bug's traceback in the server's log


def test_demo_start_internal_error_is_shown_as_a_bug(tiny_base, monkeypatch, capsys):
    pytest.importorskip("gradio", reason="the demo needs gradio (pip install '.[demo]')")
    pytest.importorskip("matplotlib", reason="the demo needs matplotlib (pip install '.[demo]')")
    from audioldm2_core import demo

    line = _inject(monkeypatch, pipeline, "vae_config", TypeError("'int' object is not iterable"))
    for debug in ([], ["--debug"]):
        code = demo.main(["--model", str(tiny_base), *debug])
        err = capsys.readouterr().err
        assert code == 1 and ("Traceback" in err) == bool(debug), err
        _last(err, "audioldm2-demo", line)


@pytest.mark.parametrize("front", ["cli", "prompts file"])
def test_users_errors_keep_their_line(front, tmp_path, capsys):
    """Beside the bugs above: a user's mistake is its own line, not "unexpected", in both front ends."""
    from audioldm2_core import synthesis

    items = tmp_path / "items.jsonl"
    items.write_text('{"id": "a", "prompt": "rain"}\n')
    main, head = (
        (cli.main, ["rain", "-o", str(tmp_path / "x.wav")])
        if front == "cli"
        else (synthesis.main, ["--prompts-file", str(items), "-o", str(tmp_path / "out")])
    )
    missing = tmp_path / "no-model"
    cases = [  # (flags, exit status, the line)
        (
            ["--model", str(missing)],
            1,
            f"{missing}: no such folder, and not a hub repo id of the form 'owner/name'",
        ),
        (["--length", "-3"], 2, "--length: audio_length_in_s must be in (0, 600.0] s, got -3.0"),
    ]
    for flags, status, line in cases:
        code = main([*head, *flags, "--quiet"])
        err = capsys.readouterr().err
        assert code == status and "Traceback" not in err and BUG not in err, err
        _last(err, "audioldm2", line)


def test_demo_start_user_error_keeps_its_line(tmp_path, capsys):
    pytest.importorskip("gradio", reason="the demo needs gradio (pip install '.[demo]')")
    pytest.importorskip("matplotlib", reason="the demo needs matplotlib (pip install '.[demo]')")
    from audioldm2_core import demo

    missing = tmp_path / "no-model"
    code = demo.main(["--model", str(missing)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and BUG not in err, err
    _last(err, "audioldm2-demo", f"{missing}: no such folder, and not a hub repo id of the form 'owner/name'")


# ------------------------------------------------------------------ users' failures that are not ours to raise


def test_explain_our_types_and_the_libraries_users_meet():
    from huggingface_hub.errors import HFValidationError

    hint = 'the demo needs gradio: pip install "audioldm2-core[demo]"'
    assert errors.explain(errors.MissingDependencyError(hint)) == hint
    assert isinstance(errors.MissingDependencyError(hint), ImportError)
    assert isinstance(errors.UnavailableError("x"), RuntimeError)
    from audioldm2_core.tokenization import PhonemizerMissingError

    assert issubclass(PhonemizerMissingError, errors.MissingDependencyError)
    assert errors.explain(RuntimeError("the CPU is on fire")) is None
    invalid = HFValidationError("Repo id must use alphanumeric chars or '-', '_', '.': 'a--b/c'.")
    assert errors.explain(invalid, repo_id="a--b/c") == f"a--b/c: {invalid}"


def test_a_device_this_machine_does_not_have(monkeypatch, capsys, tmp_path):
    from audioldm2_core.pipeline import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="cuda:1: no CUDA device on this machine"):
        check_device(torch.device("cuda:1"))
    code, err = _main(capsys, "rain", "--device", "cuda:1", "-o", str(tmp_path / "x.wav"))
    assert code == 2
    _one_line(err, "--device: cuda:1: no CUDA device on this machine")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device(torch.device("cuda:1"))
    with pytest.raises(
        UsageError, match=r"cuda:2: no such CUDA device \(this machine has cuda:0 to cuda:1\)"
    ):
        check_device(torch.device("cuda:2"))


def test_an_unreadable_tokenizer_is_a_checkpoint_error(tiny_base, tmp_path):
    import shutil

    from audioldm2_core.tokenization import tokenizer_from_folder

    folder = tmp_path / "tokenizer"
    shutil.copytree(Path(tiny_base) / "tokenizer", folder)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": 7}')
    with pytest.raises(CheckpointError, match=rf"^{folder}/tokenizer.json: cannot read it as a tokenizer"):
        tokenizer_from_folder(folder, "RobertaTokenizer")


def test_the_attention_kernel_refuses_in_our_types(monkeypatch):
    """The kernel's refusals a user meets (a CPU it is not written for, a bad AUDIOLDM2_CPU_ATTENTION, a
    bad ``select`` or ``compile``) are ours, each with its line; the front ends catch the first to fall back."""
    from audioldm2_core import fast
    from audioldm2_core.fast import cpu_attention

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    monkeypatch.setattr(cpu_attention, "_built", False)
    with pytest.raises(errors.UnavailableError) as info:
        cpu_attention.build()
    assert errors.explain(info.value).startswith("the CPU attention kernel needs AVX-512 or AVX2")
    monkeypatch.setenv("AUDIOLDM2_CPU_ATTENTION", "maybe")
    with pytest.raises(UsageError) as info:
        cpu_attention.chosen(None)
    assert errors.explain(info.value) == "AUDIOLDM2_CPU_ATTENTION='maybe': expected 1 or 0"
    with pytest.raises(UsageError, match="unknown rewrites"):
        fast.optimize(torch.nn.Linear(2, 2), select=["no-such-rewrite"])
    with pytest.raises(errors.UsageTypeError, match="compile must be a bool or a dict"):
        fast.compile_options("yes")
