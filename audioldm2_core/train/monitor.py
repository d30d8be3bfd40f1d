"""What a person watching a run sees: a progress bar, ``metrics.jsonl``, ``loss.png``, the validation audio and
TensorBoard's logs (``--report-to tensorboard``). Rank 0 only writes.

Validation (every ``--validate-every`` steps and at the end): each ``--validation-prompt`` generated with seed k
(its place in the list) by a fast sampler (``--validation-sampler``, DPM-Solver++ 2M, ``--validation-steps``
25) with the EMA's weights where there is one, from conditions encoded once before training (the text encoders
are not kept for it), into ``run/validation/step-<n>/<k>.wav`` and ``<k>.png``, with its CLAP score (the
pipeline's re-ranking score: text-audio similarity) in the metrics.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from ..frontend import Layout
from ..outputs import write_atomic, write_wav
from .options import TrainOptions
from .state import MetricsLog

__all__ = ["Monitor", "validate", "plot_loss"]


class Monitor:
    """The progress bar and the logs of a run, from ``start`` (the step it resumes from)."""

    def __init__(self, folder: Path, options: TrainOptions, rank0: bool, start: int, layout: Layout):
        from tqdm import tqdm

        self.folder, self.rank0 = folder, rank0
        self.log = MetricsLog(folder, start) if rank0 else None
        self.bar = tqdm(total=options.steps, initial=start, unit="step", desc="training", file=sys.stderr,
                        disable=options.quiet or not rank0, dynamic_ncols=True)  # fmt: skip
        self.board = None
        if rank0 and options.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(folder / "tensorboard"), purge_step=start + 1)

    def step(self, metrics: dict[str, float]) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", items_s=f"{metrics['items_per_s']:.2f}")
        if self.log is not None:
            self.log.append(metrics)
        if self.board is not None:
            for key in ("loss", "lr", "grad_norm", "items_per_s"):
                self.board.add_scalar(f"train/{key}", metrics[key], metrics["step"])

    def validation(self, record: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.append(record)
        if self.board is not None and record.get("clap_score") is not None:
            self.board.add_scalar("validation/clap_score", record["clap_score"], record["step"])

    def validated(self, step: int) -> bool:
        """Whether the log has a validation of ``step`` already."""
        return self.log is not None and any(
            r.get("step") == step and "validation" in r for r in self.log.records()
        )

    def plot(self) -> None:
        if self.log is not None:
            plot_loss(self.log.records(), self.folder / "loss.png")

    def close(self) -> None:
        self.bar.close()
        if self.board is not None:
            self.board.close()


def plot_loss(records: list[dict[str, Any]], path: Path) -> None:
    """The loss per step and its running mean over 1% of the run (at least 10 steps), written atomically; nothing
    without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    import io

    steps = [r["step"] for r in records if "loss" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    if not steps:
        return
    window = max(10, len(steps) // 100)
    mean = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
            for i in range(len(losses))]  # fmt: skip
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(steps, losses, lw=0.5, alpha=0.4, label="loss")
    ax.plot(steps, mean, lw=1.5, label=f"mean of {window}")
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_yscale("log"), ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def validate(plan, trainer, prompts: dict[str, tuple[torch.Tensor, ...]], folder: Path, step: int) -> dict:
    """Generate each validation prompt (see the module docstring): the metrics record."""
    o, pipe = plan.options, plan.pipe
    out = folder / "validation" / f"step-{step}"
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with trainer.ema_weights():
        for k, (prompt, (t5, mask, loa)) in enumerate(prompts.items()):
            audio = pipe(prompt_embeds=t5[1:], attention_mask=mask[1:], generated_prompt_embeds=loa[1:],
                         negative_prompt_embeds=t5[:1], negative_attention_mask=mask[:1],
                         negative_generated_prompt_embeds=loa[:1], audio_length_in_s=plan.frames * pipe.seconds_per_frame,
                         num_inference_steps=o.validation_steps, guidance_scale=o.validation_guidance,
                         sampler=o.validation_sampler, generator=torch.Generator().manual_seed(k),
                         output_type="pt", rerank=False).audios  # fmt: skip
            with torch.inference_mode():
                score = float(pipe.score_waveforms([prompt], audio, 1)[1][0, 0])
            write_wav(out / f"{k}.wav", audio[0].float().cpu().numpy(), pipe.sample_rate)
            _picture(out / f"{k}.png", audio[0].float().cpu().numpy(), pipe.sample_rate, prompt)
            results.append({"prompt": prompt, "file": f"validation/step-{step}/{k}.wav", "clap_score": score})
    mean = sum(r["clap_score"] for r in results) / len(results) if results else None
    return {"step": step, "clap_score": mean, "validation": results}


def _picture(path: Path, audio, sample_rate: int, title: str) -> None:
    try:
        from ..frontend import save_spectrogram

        save_spectrogram(path, audio, sample_rate, title)
    except ImportError:  # matplotlib is optional: the WAV is there
        pass
