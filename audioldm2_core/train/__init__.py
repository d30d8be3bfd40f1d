"""Fine-tuning AudioLDM 2: ``audioldm2-train`` (``python -m audioldm2_core.train``), a LoRA of the UNet or the
whole UNet, on the stages the inference path uses.

    data.py       the items (JSON Lines, an audiofolder, a dataset-synthesis manifest), checked
    cache.py      once per item: the clip's VAE posterior and its conditions (``encode_prompt``), kept on disk
    objective.py  the loss, and every random draw of an item, seeded by (seed, step, item)
    loop.py       which items a step takes, one step on one or many processes, the run
    memory.py     what a step keeps for its backward: exact lean rewrites of the UNet; the heap while checkpointing
    state.py      the run folder: settings, atomic checkpoints, metrics, outputs
    monitor.py    progress bar, metrics.jsonl, loss.png, validation audio, TensorBoard
    options.py    ``TrainOptions``: what a run may be, checked
    cli.py        the command line

docs/fine-tuning.md walks through a run; ``lora.py`` reads and writes the LoRA files.
"""
