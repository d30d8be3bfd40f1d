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
from audioldm2_core.errors import CheckpointError
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
    assert errors.explain(ValueError("steps must be at least 1\nmore detail")) == "steps must be at least 1"
    assert errors.explain(KeyError("a bug")) is None


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


def test_cli_spectrogram_without_matplotlib(monkeypatch, capsys, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    for name in [m for m in sys.modules if m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    code, err = _main(capsys, "rain", "-o", str(tmp_path / "x.wav"), "--spectrogram", str(tmp_path / "x.png"))
    assert code == 2
    _one_line(err, 'spectrograms need matplotlib: pip install "audioldm2-core[spectrogram]"')
    assert not Path(tmp_path / "x.wav").exists()
