"""One clear line for each failure a new user can meet: ``explain(error)``.

Used by the command line (``audioldm2``, ``audioldm2-demo``: the line, a non-zero exit, no traceback unless
``--debug``), by the demo (the line in the browser) and by ``loading.hub_errors`` (hub failures become a
``CheckpointError`` carrying the line, for API users too). What it recognises, in this order:

- out of memory: ``torch.OutOfMemoryError`` (CUDA, and MPS's RuntimeError), ``MemoryError``, with advice;
- a full disk: ``OSError`` ENOSPC anywhere in the exception's chain (downloading into the hub cache, or
  writing an output);
- the hub: gated or missing repos and revisions (huggingface_hub's errors), offline mode, and an unreachable
  hub. huggingface_hub 0.x raises ``requests`` errors, 1.x ``httpx`` ones, 2.x ``httpx2`` ones, often
  wrapped in ``LocalEntryNotFoundError`` (an ``OSError``) or another library's ``OSError``: the chain is
  searched for a connection error or a timeout by the class's library and name, not by importing the HTTP
  client;
- this project's own failures (``AudioLDM2Error``: bad input, unusable checkpoints, a missing optional
  package, a feature this machine cannot run): the message's first line;
- any other ``OSError`` (a path that cannot be written or read): the path and the system's reason.

Anything else, a bare ``ValueError``, ``TypeError``, ``KeyError``, ``RuntimeError`` or ``ImportError`` from
inside included, is a bug, not a user's failure: ``explain`` returns None and the caller shows it as one
(``frontend.error_line``) and keeps the traceback. A library that raises a builtin for a user's mistake is
wrapped where it is called, in one of the types below.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator

__all__ = [
    "AudioLDM2Error",
    "UsageError",
    "UsageTypeError",
    "CheckpointError",
    "WeightsError",
    "ConfigError",
    "UnsupportedConfigError",
    "MissingDependencyError",
    "PhonemizerMissingError",
    "UnavailableError",
    "explain",
    "OOM_ADVICE",
]


class AudioLDM2Error(Exception):
    """A failure the user can act on: its message's first line is what they are shown."""


class UsageError(AudioLDM2Error, ValueError):
    """A request, argument or input that cannot be run as given (a ValueError, as diffusers raises).
    ``field``: the argument it is about, as the Python API names it (a front end names its flag instead)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class UsageTypeError(UsageError, TypeError):
    """An argument of the wrong type (a TypeError too, as Python's own)."""


class CheckpointError(AudioLDM2Error, ValueError):
    """A checkpoint that cannot be found, read or used."""


class WeightsError(CheckpointError):
    """A weight file that is unreadable or does not match the module it should fill."""


class ConfigError(CheckpointError):
    """A config file that cannot be read as the component it claims to be."""


class UnsupportedConfigError(ConfigError):
    """A config setting that is valid for the reference library but not implemented here."""


class MissingDependencyError(AudioLDM2Error, ImportError):
    """An optional package (or program) a feature needs is not installed; the message says how to install it."""


class PhonemizerMissingError(MissingDependencyError):
    """Phonemisation was needed (a speech checkpoint's transcription) but phonemizer or espeak-ng is missing."""


class UnavailableError(AudioLDM2Error, RuntimeError):
    """A feature asked for that this machine cannot run (a kernel without its instruction set or compiler)."""


OOM_ADVICE = "try --low-memory, fewer candidates, shorter audio (--length), or --dtype float16 on a GPU"

# Connection failures and timeouts of the HTTP clients huggingface_hub has used (requests in 0.x, httpx in
# 1.x, httpx2 in 2.x, and their transports), recognised by library and class name anywhere in the class's MRO.
_HTTP_LIBRARIES = {"requests", "urllib3", "httpx", "httpx2", "httpcore", "httpcore2"}
_NETWORK_CLASSES = {
    "TransportError",  # httpx: every failure to get a response (connect, read, proxy, timeout)
    "NetworkError",
    "TimeoutException",
    "ConnectError",
    "ConnectionError",  # requests
    "Timeout",
    "ConnectTimeout",
    "ReadTimeout",
    "ProxyError",
    "NewConnectionError",  # urllib3
    "MaxRetryError",
}


def _chain(error: BaseException) -> Iterator[BaseException]:
    """The error, then what caused it (``raise ... from``), then what it was raised while handling."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen and len(seen) < 32:
        seen.add(id(e))
        yield e
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)


def _is_network(e: BaseException) -> bool:
    if isinstance(e, (ConnectionError, TimeoutError, socket.gaierror, socket.herror)):
        return True
    return any(
        c.__module__.split(".")[0] in _HTTP_LIBRARIES and c.__name__ in _NETWORK_CLASSES
        for c in type(e).__mro__
    )


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0].strip() if lines else type(e).__name__


def _named(e: BaseException, *names: str) -> bool:
    return any(c.__name__ in names for c in type(e).__mro__)


def _hub(error: BaseException, repo_id: str | None, revision: str | None) -> str | None:
    """The hub's failures: a gated, missing or private repo, a missing revision, offline, unreachable."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - a dependency
        return None
    repo = repo_id or "the model"
    chain = list(_chain(error))
    for e in chain:  # the repo's own errors first: they are the most specific
        if _named(e, "GatedRepoError"):
            url = f"https://huggingface.co/{repo_id}" if repo_id else "its page on huggingface.co"
            return (
                f"{repo}: the repository is gated: accept its conditions at {url}, then log in "
                "(hf auth login, or set HF_TOKEN)"
            )
        if _named(e, "RepositoryNotFoundError"):
            return f"{repo}: no such repository on the hub (if it is private, log in: hf auth login, or set HF_TOKEN)"
        if _named(e, "HFValidationError"):  # a repo id or revision the hub's rules refuse (a ValueError)
            return f"{repo}: {_first_line(e)}"
        if _named(e, "RevisionNotFoundError"):
            return f"{repo}: no revision {revision!r} on the hub" if revision else f"{repo}: no such revision"
    cache = constants.HF_HUB_CACHE
    if constants.HF_HUB_OFFLINE or any(_named(e, "OfflineModeIsEnabled") for e in chain):
        if any(_named(e, "LocalEntryNotFoundError", "OfflineModeIsEnabled") for e in chain):
            return f"{repo}: not in the local hub cache ({cache}) and HF_HUB_OFFLINE is set, so it is not downloaded"
    network = next((e for e in chain if _is_network(e)), None)
    if network is not None:
        return (
            f"{repo}: cannot reach the Hugging Face hub ({type(network).__name__}: {_first_line(network)}) "
            f"and it is not in the local cache ({cache}); check the network connection or proxy"
        )
    if any(_named(e, "LocalEntryNotFoundError") for e in chain):
        return f"{repo}: not in the local hub cache ({cache}) and the hub cannot be reached"
    if _named(error, "HfHubHTTPError"):
        return f"{repo}: download failed: {_first_line(error)}"
    return None


def explain(error: BaseException, repo_id: str | None = None, revision: str | None = None) -> str | None:
    """The one line to show a user for ``error``, or None where it is not a failure a user can act on.

    ``repo_id`` / ``revision``: the hub repo being fetched, when the error comes from fetching it.
    """
    import torch

    if isinstance(error, AudioLDM2Error):  # already a line for the user (hub_errors made it from its cause)
        return _first_line(error)
    message = str(error)
    if isinstance(error, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):  # CUDA's
        return f"out of GPU memory: {OOM_ADVICE}"
    if isinstance(error, MemoryError) or (
        isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)
    ):  # the CPU allocator's, MPS's
        return f"out of memory: {OOM_ADVICE}"
    full = next((e for e in _chain(error) if isinstance(e, OSError) and e.errno == errno.ENOSPC), None)
    if full is not None:
        where = f" writing {full.filename}" if full.filename else ""
        if repo_id is not None:
            from huggingface_hub import constants

            return (
                f"{repo_id}: no space left on the disk{where} while downloading into the hub cache "
                f"({constants.HF_HUB_CACHE}); free some space, or set HF_HOME to a folder on a larger disk"
            )
        return f"no space left on the disk{where}; free some space or write elsewhere"
    hub = _hub(error, repo_id, revision)
    if hub is not None:
        return hub
    if isinstance(error, OSError):
        if error.filename is not None and error.strerror:
            return f"{error.filename}: {error.strerror}"
        return _first_line(error)
    return None
