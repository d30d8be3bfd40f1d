"""Which rewrites a model gets: ``decide``, per rewrite and dtype, once per machine.

A rewrite is *supported* when this machine offers what it needs (its record's dtypes and capabilities:
``rewrites``) and its probe runs and matches the plain computation on a representative input (a CPU without
AVX-512 BF16 fails oneDNN's bfloat16 matmul, and keeps the plain op). A rewrite that changes kernels or memory
layouts *pays* when it is at least 1% faster on that input, timed here (the median ratio over interleaved
rounds, ``_time``); one that only removes work (folded-attention, shared-guidance) pays wherever it applies,
which its module checks per call (the fold only where H L < C + L). One whose gain depends on the shape
(winograd-conv: up to 1.5x for wide channels on small maps, a loss on narrow ones over long maps; gemm-conv:
1.2-1.8x on the UNet's deepest 32 x 2 maps, a loss on larger ones) is timed per input shape where it first
meets one (phase-upsampling likewise: the UNet's narrow maps and the VAE's wide ones differ; cpu-attention
too, for a model that chose the kernel: ~2x PyTorch's kernel on AVX-512, 0.93-0.96x on AVX2), long maps at a
capped height (attention at a capped token count) that then serves every longer length (``plan.probe_rows``).

Decisions are facts about the machine, not about a model: kept for the process (``functools.cache``) and, when
timed, on disk under a key of the CPU, the instruction-set settings, the thread count, torch's version and the
speed layer's code; one timed while other work competed for the CPU (``_busy``) is timed again on a quiet
machine.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import loading
from . import cpu_attention
from .plan import Plan
from .rewrites import REWRITES


@dataclass(frozen=True)
class Decision:
    supported: bool
    pays: bool | None  # None: not timed
    reason: str

    @property
    def on(self) -> bool:
        """Whether ``optimize`` turns the rewrite on by this decision: supported, and not timed slower."""
        return self.supported and self.pays is not False


def _time(
    fn: Callable[[], object],
    plain: Callable[[], object],
    rounds: int,
    seconds: float,
    max_rounds: int,
    clear: tuple[int, float] | None = None,
) -> tuple[float, float, float]:
    """Interleaved rounds, each calling both, at least ``rounds`` and until ``seconds`` have passed (at most
    ``max_rounds``): (fast's median time, plain's median time (s), the median over rounds of plain / fast
    within a round). The paired ratio is the decision: it cancels the drift of this machine's speed between
    rounds and this VM's occasional fast outliers (the ratio of the two calls' minimum times read 0.97-1.25x
    over five runs of the VAE probe, the paired median 1.11-1.24x; oneDNN's bfloat16 linears, 1-2% faster,
    read 1.01-1.04x over 15 rounds and 1.014-1.023x over 60). Stops early when the answer is plain:
    - after two rounds when the fast call is plainly slower (1.5x): a clear loss needs no more rounds;
    - with ``clear`` = (n, m), after n rounds whose every ratio lies beyond 1 + m, or every one below 1 - m:
      more rounds could move the median, not its side of the 1% threshold (a first run on a new machine
      spends most of its probes' time on such answers);
    - after three once ``5 * seconds`` have passed (slow calls: bfloat16 on a CPU without it runs oneDNN's
      reference kernels)."""
    times: tuple[list[float], list[float]] = ([], [])
    start = time.perf_counter()
    for r in range(max_rounds):
        for f, acc in zip((fn, plain), times, strict=True):
            t0 = time.perf_counter()
            f()
            acc.append(time.perf_counter() - t0)
        ratios = [p / q for q, p in zip(*times, strict=True)]
        ratio = statistics.median(ratios)
        elapsed = time.perf_counter() - start
        loss = r >= 1 and ratio < 1 / 1.5
        plain_answer = (
            clear is not None
            and r + 1 >= clear[0]
            and (min(ratios) > 1 + clear[1] or max(ratios) < 1 - clear[1])
        )
        done = r + 1 >= rounds and elapsed >= seconds
        slow = r >= 2 and elapsed >= 5 * seconds
        if loss or plain_answer or done or slow:
            break
    return statistics.median(times[0]), statistics.median(times[1]), ratio


def _code_key(source: str) -> str:
    """A Python file's code as the decisions depend on it: its syntax tree without docstrings (comments are not
    in it), so that an upgrade which only changes the prose keeps every machine's decisions."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


# The speed layer's files that no decision depends on: the entry points, torch.compile's wrapping
_NOT_DECIDING = ("__init__.py", "compile.py")


def _code_files() -> list[Path]:
    """The source files the decisions depend on, in a fixed order: the speed layer's modules (the rewrites,
    their probes, the plan they read, this file) by name, then the C++ kernel's source."""
    here = Path(__file__).parent
    modules = sorted(p for p in here.glob("*.py") if p.name not in _NOT_DECIDING)
    return [*modules, *sorted((here / "csrc").glob("*.cpp"))]


@functools.cache
def _this_code() -> str:
    """The code of ``_code_files``, each Python file's without its prose (``_code_key``)."""
    with loading.gc_paused():  # their ~10k nodes would set off a full collection over torch's objects: 80 ms
        return "\0".join(
            f"{p.name}\0{_code_key(p.read_text()) if p.suffix == '.py' else p.read_text()}"
            for p in _code_files()
        )


def _machine_key() -> str:
    """What a timing depends on: the CPU (model and flags), the instruction sets PyTorch and oneDNN may use,
    the thread count, torch's version, and the speed layer's code (the rewrites and their probes)."""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = "".join(
                sorted({line for line in f if line.startswith(("model name", "flags", "vendor_id"))})
            )
    except OSError:  # not Linux
        cpu = f"{platform.machine()} {platform.processor()}"
    env = sorted(
        (k, v) for k, v in os.environ.items() if k.startswith(("ONEDNN_", "DNNL_", "ATEN_", "MKL_", "OMP_"))
    )
    parts = [cpu, repr(env), torch.__version__, str(torch.get_num_threads()), _this_code()]
    parts.append(torch.backends.cpu.get_cpu_capability())
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _decisions_file() -> Path:
    return cpu_attention.cache_root() / f"fast-decisions-{_machine_key()}.json"


@functools.cache
def decide(
    name: str, dtype: torch.dtype, timed: bool = True, shape: tuple[int, ...] | None = None
) -> Decision:
    """Whether rewrite ``name`` is supported on this CPU in ``dtype`` (it runs, and matches the plain
    computation on a representative input) and, when ``timed``, whether it pays there (>= 1% faster: the
    median ratio over interleaved rounds, ``_time``). Probed once per machine (~0.2-1.6 s a rewrite): a timed
    decision is kept in ``~/.cache/audioldm2_core/`` under a key of the CPU, the instruction-set settings, the
    thread count, torch's version and the speed layer's code (not its docstrings or comments), so that later
    processes load in milliseconds (delete the file to measure again).
    One timed while other work competed for the CPU is used until it can be timed again on a quiet machine.
    ``shape``: for a rewrite with a shape probe, the decision for that input shape (always timed)."""
    key = f"{name}|{str(dtype).removeprefix('torch.')}"
    if shape is not None:
        key += "|" + ",".join(map(str, shape))
    path = _decisions_file() if timed else None
    stored = _read_json(path).get(key) if path is not None else None
    # A decision timed on a busy machine is used until one can be timed on a quiet one.
    if isinstance(stored, dict) and (not stored.pop("busy", False) or _busy()):
        return Decision(**stored)
    _busy()  # the probe's own window starts here
    decision = _probe(name, dtype, timed, shape)
    if path is not None:
        _write_json(path, {**_read_json(path), key: {**dataclasses.asdict(decision), "busy": _busy()}})
    return decision


def stored(name: str, dtype: torch.dtype) -> bool:
    """Whether this machine's timed decision for rewrite ``name`` in ``dtype`` is on disk already."""
    return f"{name}|{str(dtype).removeprefix('torch.')}" in _read_json(_decisions_file())


_TICK = 1 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01  # /proc/stat's unit, seconds


def _clocks() -> tuple[float, float, float] | None:
    """(wall clock, all CPUs' busy time since boot, this process's CPU time), in seconds; None without
    ``/proc/stat`` (not Linux). Busy time counts user, nice, system, interrupt and steal time (a VM's vCPU
    given to other guests is competition too); it is kept in clock ticks, whole 1/100 s per CPU."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    return time.monotonic(), (user + nice + system + irq + softirq + steal) * _TICK, time.process_time()


# The busy answer and the clocks of the last look: a look covers the time since the previous one.
_LOOK: dict = {"clocks": _clocks(), "busy": False}


def _busy(min_window: float = 0.25) -> bool:
    """Whether other work competed for the CPU since the last look (import, or the previous call): other
    processes kept more of the CPUs busy than this process's threads leave free, by a quarter of a CPU. Our
    own work is not competition. (The 1-minute load average, used before, counted it: on a machine with as
    many cores as threads it rose to the core count during a generation, and decisions probed then were
    stored as busy and probed again by the next process.) A window shorter than ``min_window`` is too short
    for clock ticks to tell: the last answer stands and the window goes on. Without ``/proc/stat``: the
    load average above the core count, as before."""
    cpus = os.cpu_count() or 1
    now, then = _clocks(), _LOOK["clocks"]
    if now is None or then is None:
        try:
            return os.getloadavg()[0] > cpus
        except (OSError, AttributeError):  # not available (Windows has no os.getloadavg)
            return False
    wall = now[0] - then[0]
    if wall < min_window:
        return _LOOK["busy"]
    others = (now[1] - then[1]) - (now[2] - then[2]) - cpus * _TICK  # less a tick per CPU
    free = max(0, cpus - torch.get_num_threads())
    _LOOK.update(clocks=now, busy=others / wall > free + 0.25)
    return _LOOK["busy"]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    """Atomically (a whole file or none, for concurrent processes); an unwritable cache is only a slower start."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass


def _probe(name: str, dtype: torch.dtype, timed: bool, shape: tuple[int, ...] | None = None) -> Decision:
    rewrite = REWRITES[name]
    unmet = rewrite.unmet(dtype)
    if unmet is not None:
        return Decision(False, None, unmet)
    if rewrite.probe is None and shape is None:  # a capability, used where a model chooses it
        found = "; ".join(c.found() for c in rewrite.needs)
        return Decision(True, None, f"{found}: where a model opts in (cpu_attention=True), timed per shape")
    # the fast twin's plan: this rewrite on, and those it builds on where they are on here
    on = {b for b in rewrite.builds_on if decide(b, dtype, timed=timed).on}
    plan = Plan(dtype, frozenset({name, *on}))
    with torch.inference_mode():
        plain, fast = rewrite.probe(plan) if shape is None else rewrite.shape_probe(plan, shape)
        try:
            t0 = time.perf_counter()
            expected = plain()
            t1 = time.perf_counter()
            got = fast()
            first = min(t1 - t0, time.perf_counter() - t1)  # the first calls: the check and a warm-up
        except RuntimeError as e:  # e.g. oneDNN's bfloat16 matmul on a CPU without AVX-512 BF16
            return Decision(False, None, f"unsupported here: {str(e).splitlines()[0][:100]}")
        # in float32 (float64 for float64): the difference of two close floats is exact, and a norm's
        # rounding is far below the 1e-5 asked (double copies of a VAE-sized probe's outputs took ~50 ms)
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        expected = expected.to(wide)
        err = ((got.to(wide) - expected).norm() / expected.norm()).item()
        if not err <= (1e-5 if dtype in (torch.float32, torch.float64) else 1e-2):
            return Decision(False, None, f"differs from the plain computation by {err:.1e} here")
        if not (timed and (rewrite.timed or shape is not None)):
            why = "not timed"
            if timed:
                why = "timed per shape" if rewrite.shape_probe else "fewer multiply-adds where it applies"
            return Decision(True, None, f"supported (error {err:.1e}); {why}")
        # a whole rewrite's probe decides for every layer: 0.5 s and at least 7 rounds (~0.2-0.7 s where
        # every round is 5% or more on one side; a short call runs 15 or more rounds by 0.5 s, a long one,
        # steadier by itself, 7: 15 made the VAE's 0.2 s rounds take 3 s on a first run held to AVX2, and
        # its answer, near 1, still differed between runs); per-shape probes run once per layer shape, a
        # loss or a gain of 10% or more at most shapes: a few rounds, two where both are 15% or more on
        # one side, one where the calls are long (50 ms or more: the VAE's full-size maps, up to 0.5 s a
        # round) and 30% or more on one side (one round of short calls varies too much for that)
        if shape is None:
            t_fast, t_plain, ratio = _time(fast, plain, 7, 0.5, max_rounds=200, clear=(5, 0.05))
        else:
            clear = (1, 0.3) if first >= 0.05 else (2, 0.15)
            t_fast, t_plain, ratio = _time(fast, plain, 3, 0.1, max_rounds=15, clear=clear)
    return Decision(
        True, ratio >= 1.01, f"{t_plain * 1e3:.2f} -> {t_fast * 1e3:.2f} ms on its probe ({ratio:.2f}x)"
    )
