"""Throughput of dataset synthesis (``audioldm2 --prompts-file``): items per hour at batch sizes 1, 2, 4 in one
process, and 1 vs 2 processes under ``torchrun`` (issue 19).

    python benchmarks/synthesis_bench.py --tiny                          # tiny random checkpoint, a minute
    python benchmarks/synthesis_bench.py --items 8 --steps 20            # the full-size random checkpoint

Each configuration is the real command line, run as a user runs it, into a fresh output folder, on the same
item file (``--items`` distinct prompts, one length and one set of settings, so every batch is full): one
process with ``--threads`` torch threads at ``--batch-size`` 1, 2, 4; then, for the scaling from 1 to 2
processes, one process with ``threads // 2`` threads and ``torchrun --standalone --nproc_per_node 2`` with
``threads // 2`` threads each (the same cores, split), both at batch 1. Batch sizes that do not divide
``--items`` leave one short batch.

Throughput is read from the manifests: each line's ``seconds`` is its batch's time (encode, denoise, decode,
write) over the batch size, so a rank's generating time is the sum over its lines, and the run's is the
slowest rank's. "items/h" = 3600 * items / that time; "steady" leaves out each rank's first batch, which also
pays first-call costs (the speed layer's probes, the allocator). "wall" is the whole command, process start,
imports and loading included. The last column is the largest relative L2 distance between a configuration's
WAV and the one-process batch-1 WAV of the same item: float32 rounding of batched kernels, the issue's bar
is 1e-5.

Weights as ``bench.py`` (``--tiny``, ``--large``, ``--checkpoint``, ``--cache-dir``): the random-weight
checkpoint with the real architecture is built once under ``benchmarks/.cache/``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "a dog barking in the rain", "techno music with a strong upbeat tempo", "birds singing at dawn",
    "a car engine starting", "waves on a beach", "a choir singing in a cathedral", "footsteps on gravel",
    "a jazz trio playing softly", "thunder rolling in the distance", "a cat meowing", "church bells ringing",
    "typing on a keyboard", "a helicopter flying overhead", "rain on a tin roof", "a crowd cheering",
    "an old clock ticking",
]  # fmt: skip


def make_items(path: Path, n: int) -> Path:
    lines = [json.dumps({"id": f"item{i:03d}", "prompt": PROMPTS[i % len(PROMPTS)]}) for i in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_config(args, ckpt: Path, items: Path, out: Path, batch: int, procs: int, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    cli = ["--prompts-file", str(items), "-o", str(out), "--model", str(ckpt), "--steps", str(args.steps),
           "--length", str(args.length), "--sampler", args.sampler, "--seed", "0", "--batch-size", str(batch),
           "--dtype", args.dtype, "--device", args.device, "--quiet"]  # fmt: skip
    if procs == 1:
        cmd = [sys.executable, "-m", "audioldm2_core", *cli]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               "-m", "audioldm2_core", *cli]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    per_rank = []
    for log in sorted(out.glob("manifest.rank*.jsonl")):
        recs = [json.loads(line) for line in log.read_text().splitlines()]
        first = recs[0]["batch_size"] if recs else 0
        per_rank.append(
            (sum(r["seconds"] for r in recs), sum(r["seconds"] for r in recs[first:]), len(recs), first)
        )
    n = sum(r[2] for r in per_rank)
    total = max(r[0] for r in per_rank)
    steady_items = sum(r[2] - r[3] for r in per_rank)
    steady = max(r[1] for r in per_rank)
    return {
        "batch": batch,
        "procs": procs,
        "threads": threads,
        "items": n,
        "wall_s": wall,
        "items_per_h": 3600 * n / total,
        "steady_items_per_h": 3600 * steady_items / steady if steady > 0 and steady_items else float("nan"),
    }


def max_distance(ref: Path, out: Path) -> float:
    import numpy as np
    import soundfile as sf

    worst = 0.0
    for wav in sorted(ref.glob("*.wav")):
        a, b = sf.read(wav, dtype="float32")[0], sf.read(out / wav.name, dtype="float32")[0]
        worst = max(worst, float(np.linalg.norm(a - b) / np.linalg.norm(a)))
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=8, help="items per configuration (default 8)")
    p.add_argument("--steps", type=int, default=20, help="sampler steps (default 20)")
    p.add_argument("--length", type=float, default=10.24, help="seconds of audio per item (default 10.24)")
    p.add_argument("--sampler", default="dpmpp-2m", help="sampler (default dpmpp-2m)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="torch device; 'cuda' puts each rank on cuda:LOCAL_RANK")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores to use (default: all)")
    p.add_argument("--batch-sizes", default="1,2,4", help="one-process batch sizes (default 1,2,4)")
    p.add_argument("--procs", type=int, default=2, help="processes of the torchrun row (default 2)")
    p.add_argument("--tiny", action="store_true", help="tiny random checkpoint")
    p.add_argument("--large", action="store_true", help="the cvssp/audioldm2-large UNet")
    p.add_argument("--checkpoint", help="a pipeline folder instead of the built random checkpoint")
    p.add_argument("--cache-dir", help="where bench.py builds its checkpoint")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT))
    import bench

    ckpt = bench.resolve_checkpoint(args)
    rows = []
    with tempfile.TemporaryDirectory(prefix="synthesis-bench-") as tmp:
        tmp = Path(tmp)
        items = make_items(tmp / "items.jsonl", args.items)
        split = max(1, args.threads // args.procs)  # threads per process when the cores are split
        configs = [(int(b), 1, args.threads) for b in args.batch_sizes.split(",")]
        configs += [(1, 1, split), (1, args.procs, split)]  # scaling: one process on its share, then all
        ref = None
        for k, (batch, procs, threads) in enumerate(configs):
            out = tmp / f"{k}-b{batch}-p{procs}-t{threads}"  # a fresh folder each (a reused one resumes)
            row = run_config(args, ckpt, items, out, batch, procs, threads)
            ref = ref or out
            row["max_rel_l2_vs_first"] = max_distance(ref, out)
            rows.append(row)
            print(f"batch {batch}, {procs} x {threads}: {row['items_per_h']:.0f} items/h", file=sys.stderr)
    print(f"# synthesis throughput: {bench.weights_description(args, ckpt)}")
    print(f"CPU: {bench.cpu_description()}; {args.threads} threads in all; {args.dtype} on {args.device}")
    print(f"{args.items} items of {args.length} s, {args.steps} {args.sampler} steps, guidance 3.5\n")
    print(
        "| processes x threads | batch | items/h | items/h (steady) | wall (s) | max rel. L2 vs first row |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['procs']} x {r['threads']} | {r['batch']} | {r['items_per_h']:.0f} | "
              f"{r['steady_items_per_h']:.0f} | {r['wall_s']:.1f} | {r['max_rel_l2_vs_first']:.1e} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
