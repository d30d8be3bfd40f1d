"""The training loop: which items each optimizer step takes, how a step is computed on one or many processes,
and the run from the first step (or the last checkpoint) to the outputs.

Which items. The items are read as an endless stream of epochs, each a permutation of the dataset seeded by
(seed, epoch); step s takes positions [s B, (s + 1) B) of it (B: ``--batch-size``, the global batch). So the
data position is a function of the step alone, and a resumed run takes the same items.

One step, on W processes (torchrun; W = 1 alone): process r takes the batch's positions r, r + W, ...; it runs
them ``--micro-batch-size`` at a time, each item's loss divided by B, gradients accumulating; then the gradients
are summed over the processes (``all_reduce``, as DDP does: gloo on CPUs, NCCL on GPUs), clipped to
``--max-grad-norm``, and AdamW steps at the step's learning rate; the EMA follows. Since every item's draws come
from its own generator (``objective.draw``), one process, W processes and any micro-batch size compute the
same sum: the weights agree to float rounding (the order of the sums differs).

Left out on purpose: training the text encoders, the projection or GPT-2 (the original trained GPT-2 jointly,
by teacher forcing on AudioMAE features, which are not in the hub checkpoints); gradient accumulation across
optimizer steps beyond the global batch; multi-node rendezvous beyond what torchrun's environment gives.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import lora
from ..frontend import Layout
from ..generate import Conditions
from ..pipeline import TEXT_COMPONENTS
from ..schedules import alphas_cumprod
from . import cache, memory, state
from .data import Clip, TrainItem
from .monitor import Monitor, validate
from .objective import draw, ema_decay, item_losses, learning_rate, seed_of
from .options import TrainOptions

__all__ = ["Plan", "Trainer", "epoch_order", "batch_indices", "run"]

BUCKET_BYTES = 64 << 20  # gradients are summed over processes in buckets of this size


@dataclass
class Plan:
    """A run, checked (``train/cli.py``): the options, the items and their clips, and the pipeline (its configs
    read, no weights loaded yet: ``low_memory``, plain modules)."""

    options: TrainOptions
    items: list[TrainItem]
    clips: dict[str, Clip]
    pipe: Any  # AudioLDM2
    frames: int  # mel frames per training crop
    keys: dict[str, str] = field(default_factory=dict)  # item id -> cache key
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def latent_frames(self) -> int:
        return self.frames // self.pipe.vae_config.scale_factor


def epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed_of(seed, "epoch", epoch))
    return torch.randperm(n, generator=g).tolist()


def batch_indices(step: int, batch: int, n: int, seed: int) -> list[int]:
    """The dataset indices of the global batch of step ``step`` (positions [s B, (s + 1) B) of the stream)."""
    orders: dict[int, list[int]] = {}
    out = []
    for position in range(step * batch, (step + 1) * batch):
        epoch = position // n
        if epoch not in orders:
            orders[epoch] = epoch_order(seed, epoch, n)
        out.append(orders[epoch][position % n])
    return out


def _pad(t: Tensor, length: int) -> Tensor:
    """(L, ...) -> (length, ...), zeros after L (masked out)."""
    return torch.nn.functional.pad(t, [0, 0] * (t.ndim - 1) + [0, length - t.shape[0]])


class Trainer:
    """The trained weights, their optimizer and EMA, and one optimizer step."""

    def __init__(self, plan: Plan, unet: nn.Module, params: list[tuple[str, nn.Parameter]], layout: Layout):
        o = plan.options
        self.plan, self.unet, self.layout, self.options = plan, unet, layout, o
        self.names, self.params = [n for n, _ in params], [p for _, p in params]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=o.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=o.weight_decay
        )
        self.device = plan.pipe.device
        self.autocast = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[o.mixed_precision]
        self.scaler = torch.amp.GradScaler(self.device.type) if o.mixed_precision == "fp16" else None
        self.ema = {n: p.detach().clone() for n, p in params} if o.ema is not None else None
        sched = plan.pipe.scheduler_config
        self.abar, self.prediction_type = alphas_cumprod(sched).to(self.device), sched.prediction_type
        self.timesteps = sched.num_train_timesteps
        self.step = 0

    # ------------------------------------------------------------------------------------ the batch

    def micro_batch(self, step: int, positions: list[tuple[int, int]], uncond_batch: bool):
        """Tensors of a micro-batch: z0, noise, t, and its conditions (T5 rows zero-padded to the longest)."""
        o, plan = self.options, self.plan
        vae = plan.pipe.vae_config
        z0, noise, t, t5, mask, loa = [], [], [], [], [], []
        for j, index in positions:
            item = plan.items[index]
            entry = cache.read_entry(o.cache / f"{plan.keys[item.id]}.safetensors")
            g = torch.Generator().manual_seed(seed_of(o.seed, step, j, item.id))
            p = o.cfg_dropout if o.cfg_dropout_style == "inference" else 0.0
            d = draw(entry.mean, entry.logvar, plan.latent_frames, g, vae.scaling_factor, self.timesteps, p,
                     o.noise_offset)  # fmt: skip
            row = 0 if d.unconditional or uncond_batch else 1
            z0.append(d.z0), noise.append(d.noise), t.append(d.t)
            t5.append(entry.t5[row]), mask.append(entry.mask[row])
            loa.append(torch.zeros_like(entry.loa[0]) if uncond_batch else entry.loa[row])
        length = max(x.shape[0] for x in t5)
        cond = Conditions(torch.stack([_pad(x, length) for x in t5]).to(self.device),
                          torch.stack([_pad(x, length) for x in mask]).to(self.device),
                          torch.stack(loa).to(self.device), guided=False)  # fmt: skip
        dev = self.device
        return torch.stack(z0).to(dev), torch.stack(noise).to(dev), torch.tensor(t, device=dev), cond

    def _backward(self, step: int, share: list[tuple[int, int]], batch: int, uncond_batch: bool) -> Tensor:
        """Forward and backward over this process's share, micro-batch by micro-batch: the sum of its items'
        losses (float64, for the log)."""
        total = torch.zeros((), dtype=torch.float64)
        size = self.options.micro_batch_size or max(1, len(share))
        for start in range(0, len(share), size):
            z0, noise, t, cond = self.micro_batch(step, share[start : start + size], uncond_batch)
            losses = item_losses(self.unet, z0, noise, t, cond, self.abar, self.prediction_type,
                                 self.options.snr_gamma, self.autocast)  # fmt: skip
            loss = losses.sum() / batch
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total += losses.detach().double().sum().cpu()
        return total

    # ------------------------------------------------------------------------------------ the step

    def _all_reduce(self, total: Tensor) -> Tensor:
        """Sum the gradients (in buckets) and the loss over the processes."""
        import torch.distributed as dist

        bucket: list[Tensor] = []

        def flush():
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            for g, part in zip(bucket, flat.split([g.numel() for g in bucket]), strict=True):
                g.copy_(part.view_as(g))
            bucket.clear()

        for p in self.params:
            bucket.append(p.grad)
            if sum(g.numel() * g.element_size() for g in bucket) >= BUCKET_BYTES:
                flush()
        if bucket:
            flush()
        total = total.to(self.device)
        dist.all_reduce(total)
        return total.cpu()

    def train_step(self) -> dict[str, float]:
        """Optimizer step ``self.step``: the metrics it logs."""
        o, layout, step = self.options, self.layout, self.step
        start = time.perf_counter()
        indices = batch_indices(step, o.batch_size, len(self.plan.items), o.seed)
        share = [(j, i) for j, i in enumerate(indices) if j % layout.world == layout.rank]
        g = torch.Generator().manual_seed(seed_of(o.seed, step, "batch"))
        uncond_batch = o.cfg_dropout_style == "original" and bool(torch.rand((), generator=g) < o.cfg_dropout)
        self.optimizer.zero_grad(set_to_none=False)
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        total = self._backward(step, share, o.batch_size, uncond_batch)
        if layout.world > 1:
            total = self._all_reduce(total)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        limit = o.max_grad_norm if o.max_grad_norm > 0 else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, limit))
        lr = learning_rate(step, o.lr, o.lr_warmup, o.lr_schedule, o.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.step += 1
        self._update_ema()
        seconds = time.perf_counter() - start
        return dict(step=self.step, loss=float(total) / o.batch_size, lr=lr, grad_norm=norm,
                    items_per_s=o.batch_size / seconds)  # fmt: skip

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        decay = ema_decay(self.step, self.options.ema)
        for name, p in zip(self.names, self.params, strict=True):
            self.ema[name].lerp_(p.detach(), 1.0 - decay)

    # ------------------------------------------------------------------------------ save and resume

    def save(self, folder: Path) -> None:
        trained = dict(zip(self.names, self.params, strict=True))
        optimizer = {"optimizer": self.optimizer.state_dict()}
        if self.scaler is not None:
            optimizer["scaler"] = self.scaler.state_dict()
        extra = {"items_seen": self.step * self.options.batch_size, "world": self.layout.world}
        state.save_checkpoint(
            folder, self.step, trained, self.ema, optimizer, extra, self.options.keep_checkpoints
        )

    @torch.no_grad()
    def resume(self, checkpoint: Path) -> None:
        info, trained, ema, optimizer = state.load_checkpoint(checkpoint)
        for name, p in zip(self.names, self.params, strict=True):
            p.copy_(trained[name])
        self.optimizer.load_state_dict(optimizer["optimizer"])
        if self.scaler is not None and "scaler" in optimizer:
            self.scaler.load_state_dict(optimizer["scaler"])
        if self.ema is not None and ema is not None:
            self.ema = {n: ema[n].to(self.device) for n in self.names}
        self.step = int(info["step"])

    @contextlib.contextmanager
    def ema_weights(self):
        """The EMA's weights in the model for a while (validation, the outputs), the trained ones back after;
        without an EMA, the trained ones."""
        if self.ema is None:
            yield
            return
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for name, p in zip(self.names, self.params, strict=True):
                p.copy_(self.ema[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved, strict=True):
                    p.copy_(s)


def trained_unet(plan: Plan) -> tuple[nn.Module, list[tuple[str, nn.Parameter]]]:
    """The UNet, pinned in the pipeline (never released), with what it trains: a LoRA (fresh, or from
    ``--init-lora``) or every weight."""
    o, pipe = plan.options, plan.pipe
    unet = pipe.unet
    pipe.unet = unet  # assigned: the residency keeps it, never reloads it
    unet.requires_grad_(o.full)
    if not o.full:
        if o.init_lora is not None:
            lora.attach(unet, lora.read_lora(o.init_lora), 1.0, fuse=False)
        else:
            lora.inject(unet, o.lora_rank, o.lora_alpha or float(o.lora_rank), o.lora_targets, o.seed)
    for n, p in unet.named_parameters():
        p.requires_grad_(o.full or ".lora_A." in n or ".lora_B." in n)
    memory.prepare(unet, o.gradient_checkpointing, pipe.device)
    return unet, [(n, p) for n, p in unet.named_parameters() if p.requires_grad]


def _barrier(layout: Layout) -> None:
    if layout.world > 1:
        import torch.distributed as dist

        dist.barrier()


def _encode(plan: Plan, layout: Layout) -> dict[str, tuple[Tensor, ...]]:
    """Fill the cache (this rank's share), encode the validation prompts (rank 0), then release every encoder."""
    o, pipe = plan.options, plan.pipe
    cache.fill(
        pipe, plan.items, plan.keys, o.cache, plan.frames, o.phonemes, layout.rank, layout.world, o.quiet
    )
    prompts = {}
    if layout.rank == 0:
        words = o.validation_transcriptions or (None,) * len(o.validation_prompts)
        for prompt, transcription in zip(o.validation_prompts, words, strict=True):
            prompts[prompt] = cache.encode_conditions(pipe, prompt, transcription, o.phonemes)
    pipe.residency.release(*TEXT_COMPONENTS, "vae_encoder")
    _barrier(layout)
    return prompts


def run(plan: Plan, layout: Layout) -> Path:
    """Train (resuming from the run folder's last checkpoint) and write the outputs; returns the run folder."""
    o, folder = plan.options, plan.options.output
    rank0 = layout.rank == 0
    if rank0:
        folder.mkdir(parents=True, exist_ok=True)
        state.remove_leftovers(folder)
        state.write_settings(folder, plan.settings)
    prompts = _encode(plan, layout)
    unet, params = trained_unet(plan)
    trainer = Trainer(plan, unet, params, layout)
    checkpoint = state.latest_checkpoint(folder)
    if checkpoint is not None:
        trainer.resume(checkpoint)
    monitor = Monitor(folder, o, rank0, trainer.step, layout)
    try:
        while trainer.step < o.steps:
            monitor.step(trainer.train_step())
            if trainer.step % o.save_every == 0 or trainer.step == o.steps:
                if rank0:
                    trainer.save(folder)
                    monitor.plot()
                _barrier(layout)
            if rank0 and o.validate_every and trainer.step % o.validate_every == 0 and trainer.step < o.steps:
                monitor.validation(validate(plan, trainer, prompts, folder, trainer.step))
        if rank0:
            _write_outputs(plan, trainer, folder)
            if prompts and not monitor.validated(trainer.step):  # a rerun of a finished run: not again
                monitor.validation(validate(plan, trainer, prompts, folder, trainer.step))
            monitor.plot()
    finally:
        monitor.close()
    _barrier(layout)
    return folder


def _write_outputs(plan: Plan, trainer: Trainer, folder: Path) -> None:
    """The LoRA file, or with ``--full`` the pipeline folder (the EMA's weights where there is one)."""
    from ..outputs import write_atomic

    o = plan.options
    with trainer.ema_weights():
        if o.full:
            print(state.write_pipeline(folder, plan.pipe.ckpt.root, trainer.unet.state_dict()))
            return
        adapter = lora.adapter_state(trainer.unet, str(folder))
    about = {"model": o.model, "revision": o.revision, "step": trainer.step}
    extra = {"audioldm2_core": json.dumps(about, sort_keys=True)}
    write_atomic(folder / lora.LORA_FILE, lora.save_lora(adapter, o.lora_targets, extra))
    print(folder / lora.LORA_FILE)
