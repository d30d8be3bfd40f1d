"""Web demo on Gradio: ``audioldm2-demo --model cvssp/audioldm2`` (``pip install "audioldm2-core[demo]"``).

    prompt, negative prompt, length, steps, sampler, guidance, seed, candidates
      --generate--> the pipeline (one request at a time, a progress bar following the denoising steps)
                --> per candidate, best first: a WAV, its log-mel spectrogram PNG, its CLAP score

The page: a "Text to audio" tab with the inputs, a Generate button and examples, and one audio player with
its spectrogram and score per candidate. The same inputs, in the same order, are the API endpoint
``/generate`` (``gradio_client.Client(url).predict(prompt, negative, length, steps, sampler, guidance, seed,
candidates, api_name="/generate")``), which returns the WAV files, the spectrogram PNGs (lists, best
first) and the scores. The button runs that same endpoint, then a second step only lays its result out in
the players, so the page and the API cannot drift apart. Generation is queued with a concurrency of one:
concurrent users wait their turn instead of running the model at once.

``generate`` is the handler without Gradio (the tests call it directly); ``build_app`` makes the page around a
loaded pipeline; ``main`` is the command. Failures reach the browser as one line (``errors.explain``), and at
start, as the CLI's, one line and a non-zero exit (``--debug`` adds the traceback).

The "Audio to audio" tab: an uploaded or recorded input, a prompt and a mode (style transfer, inpainting of
time spans, super-resolution) with its strength, and the same controls and players; its endpoint is
``/transform`` (``predict(audio_file, prompt, mode, strength, spans, negative, steps, sampler, guidance, seed,
candidates, api_name="/transform")``, the audio as ``gradio_client.handle_file(path)``), its handler without
Gradio ``transform``.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .samplers import SAMPLERS

__all__ = ["Candidate", "generate", "transform", "build_app", "main", "MAX_CANDIDATES", "MODES"]

MAX_CANDIDATES = 4  # the page has this many players; the API refuses more
MAX_LENGTH_S = 30.0
MAX_STEPS = 500
EXAMPLES = [  # (prompt, negative prompt): the original AudioLDM 2 demo's and the diffusers docs' prompts
    ("The sound of a hammer hitting a wooden surface.", "Low quality."),
    ("Techno music with a strong, upbeat tempo and high melodic riffs.", "Low quality."),
    ("A dog barking in the rain, distant thunder.", "Low quality."),
    ("Birds singing in a forest at dawn, a stream nearby.", "Low quality."),
    ("A jazz trio: upright bass, brushed drums and a soft piano.", "Low quality, distortion."),
]


@dataclass(frozen=True)
class Candidate:
    """One generated waveform, as files."""

    audio: Path  # float32 WAV at the model's rate
    spectrogram: Path  # PNG: log mel, time (s) x frequency (Hz)
    score: float | None  # CLAP text-audio score (the reference's logits_per_text); higher matches better


def _whole(value, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if value != int(value) or not low <= value <= high:
        raise ValueError(f"{name} must be a whole number from {low} to {high}, got {value}")
    return int(value)


def generate(
    pipe,
    prompt: str,
    negative_prompt: str | None = None,
    length: float | None = None,
    steps: int = 200,
    sampler: str = "ddim",
    guidance: float = 3.5,
    seed: int = 0,
    candidates: int = 1,
    *,
    out_dir: str | Path,
    progress: Callable[[int, int], None] | None = None,
) -> list[Candidate]:
    """Generate ``candidates`` waveforms for ``prompt`` and write each as a WAV and a spectrogram PNG in
    ``out_dir``, best CLAP score first. ``length`` None or 0: the model's default. ``progress(step, steps)``
    is called after each denoising step. Bad input raises ValueError with a message for the user."""
    import torch

    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty")
    steps = _whole(steps, "steps", 1, MAX_STEPS)
    seed = _whole(seed, "seed", 0, 2**63 - 1)
    candidates = _whole(candidates, "candidates", 1, MAX_CANDIDATES)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if length is not None and not (isinstance(length, (int, float)) and 0 <= length <= MAX_LENGTH_S):
        raise ValueError(f"length must be from 0 (the model's default) to {MAX_LENGTH_S} s, got {length!r}")
    out = pipe(
        prompt.strip(),
        negative_prompt=(negative_prompt or "").strip() or None,
        audio_length_in_s=float(length) if length else None,
        num_inference_steps=steps,
        sampler=sampler,
        guidance_scale=float(guidance),
        num_waveforms_per_prompt=candidates,
        generator=torch.Generator().manual_seed(seed),
        rerank=True,  # the score is shown even for one candidate
        callback=(lambda i, t, x: progress(i + 1, steps)) if progress is not None else None,
    )
    return _write_candidates(out, out_dir)


MODES = {  # the audio tab's modes -> what they regenerate
    "Style transfer": "the whole input, from its noised latents (SDEdit)",
    "Inpaint spans": "the given time spans; the rest is kept",
    "Super-resolution": "the band above half the input's own sample rate; the rest is kept",
}


def transform(
    pipe,
    audio: str | Path | None,
    prompt: str,
    mode: str = "Style transfer",
    strength: float = 0.6,
    spans: str = "",
    negative_prompt: str | None = None,
    steps: int = 200,
    sampler: str = "ddim",
    guidance: float = 3.5,
    seed: int = 0,
    candidates: int = 1,
    *,
    out_dir: str | Path,
    progress: Callable[[int, int], None] | None = None,
) -> list[Candidate]:
    """The audio tab's handler: edit the audio file ``audio`` toward ``prompt`` in ``mode`` (a key of ``MODES``)
    and write the candidates as ``generate`` does. ``spans``: for "Inpaint spans", seconds as ``1-2, 3.5-5``.
    ``strength`` in (0, 1] (inpainting and super-resolution are best at 1: from noise where regenerated)."""
    import torch

    from .cli import parse_ranges

    if audio is None or (isinstance(audio, str) and not audio):
        raise ValueError("upload or record the input audio first")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    steps = _whole(steps, "steps", 1, MAX_STEPS)
    seed = _whole(seed, "seed", 0, 2**63 - 1)
    candidates = _whole(candidates, "candidates", 1, MAX_CANDIDATES)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if mode == "Inpaint spans" and not (spans or "").strip():
        raise ValueError("give the spans to regenerate, in seconds: 1-2, 3.5-5")
    spans_s = parse_ranges([spans], "spans", "seconds") if mode == "Inpaint spans" else None
    from .editing import start_index

    done = start_index(steps, float(strength))  # the steps before the first one run
    out = pipe(
        prompt.strip(),
        audio=str(audio),
        strength=float(strength),
        inpaint_spans_s=spans_s,
        super_resolution=mode == "Super-resolution",
        negative_prompt=(negative_prompt or "").strip() or None,
        num_inference_steps=steps,
        sampler=sampler,
        guidance_scale=float(guidance),
        num_waveforms_per_prompt=candidates,
        generator=torch.Generator().manual_seed(seed),
        rerank=True,
        callback=(lambda i, t, x: progress(i + 1 - done, steps - done)) if progress is not None else None,
    )
    return _write_candidates(out, out_dir)


def _write_candidates(out, out_dir: str | Path) -> list[Candidate]:
    """Each waveform of a pipeline output as a WAV and a spectrogram PNG in ``out_dir``, best first."""
    from .outputs import write_wav
    from .spectrogram import save_spectrogram

    out_dir = Path(out_dir)
    scores = out.scores[0].tolist() if out.scores is not None else [None] * len(out.audios)
    result = []
    for rank, (audio, score) in enumerate(zip(out.audios, scores, strict=True), 1):
        wav, png = out_dir / f"candidate{rank}.wav", out_dir / f"candidate{rank}.png"
        write_wav(wav, np.asarray(audio), out.sample_rate)
        save_spectrogram(
            png,
            audio,
            out.sample_rate,
            title=f"#{rank}" + (f"  CLAP {score:.3f}" if score is not None else ""),
        )
        result.append(Candidate(wav, png, score))
    return result


class _Outputs:
    """Per-request output folders under one temp folder, the oldest removed once Gradio has copied them into
    its own cache (it does so before the response is sent), so a long-running demo does not fill the disk."""

    def __init__(self, keep: int = 8):
        self.root = Path(tempfile.mkdtemp(prefix="audioldm2-demo-"))
        self.keep = keep
        self.count = 0

    def new(self) -> Path:
        self.count += 1
        folder = self.root / f"{self.count:06d}"
        folder.mkdir()
        for old in sorted(self.root.iterdir())[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return folder


def _default_length(pipe) -> float:
    return round(pipe.unet_config.sample_size * pipe.vae_config.scale_factor * pipe._upsample_factor(), 2)


def build_app(pipe, title: str = "AudioLDM 2", *, steps: int = 200, candidates: int = 3):
    """The Gradio ``Blocks`` of the demo around a loaded :class:`~audioldm2_core.AudioLDM2`, queued with a
    concurrency of one. ``steps``, ``candidates``: the controls' initial values (diffusers' 200 steps, the
    original demo's 3 candidates). ``app.launch()`` serves it."""
    import gradio as gr

    from .cli import error_line
    from .errors import explain

    outputs = _Outputs()
    default_length = _default_length(pipe)

    initial_steps, initial_candidates = steps, candidates

    def answer(handler, *args, progress):
        """Run a handler; one line in the browser on failure (a bug's traceback in the server's log too)."""
        try:
            found = handler(
                pipe, *args, out_dir=outputs.new(),
                progress=lambda i, n: progress((i, n), desc="denoising", unit="steps"),
            )  # fmt: skip
        except Exception as e:
            if explain(e) is None:
                traceback.print_exc()
            raise gr.Error(error_line(e)) from e
        return [str(c.audio) for c in found], [str(c.spectrogram) for c in found], [c.score for c in found]

    def run(prompt, negative, length, steps, sampler, guidance, seed, candidates, progress=gr.Progress()):  # noqa: B008
        progress(0, desc="encoding the prompt")
        return answer(generate, prompt, negative, length, steps, sampler, guidance, seed, candidates,
                      progress=progress)  # fmt: skip

    def run_audio(audio, prompt, mode, strength, spans, negative, steps, sampler, guidance, seed, candidates,
                  progress=gr.Progress()):  # noqa: B008  # fmt: skip
        progress(0, desc="encoding the prompt and the audio")
        return answer(transform, audio, prompt, mode, strength, spans, negative, steps, sampler, guidance,
                      seed, candidates, progress=progress)  # fmt: skip

    def lay_out(audios, images, scores):
        """The endpoint's result -> the players: one group per candidate, the others hidden."""
        audios, images, scores = audios or [], images or [], scores or []
        groups, players, pictures = [], [], []
        for i in range(MAX_CANDIDATES):
            shown = i < len(audios)
            label = f"#{i + 1}" + (
                f" · CLAP score {scores[i]:.3f}" if shown and scores[i] is not None else ""
            )
            groups.append(gr.update(visible=shown))
            players.append(gr.update(value=audios[i] if shown else None, label=label))
            pictures.append(gr.update(value=images[i] if shown else None))
        return *groups, *players, *pictures

    def results():
        """One tab's output column: a player and a spectrogram per candidate, and the endpoint's hidden
        outputs (read by lay_out and returned to API clients)."""
        groups, players, pictures = [], [], []
        for i in range(MAX_CANDIDATES):
            with gr.Group(visible=i == 0) as group:
                players.append(gr.Audio(label=f"#{i + 1}", type="filepath", interactive=False))
                pictures.append(gr.Image(label="log-mel spectrogram", type="filepath", interactive=False))
            groups.append(group)
        hidden = [
            gr.File(file_count="multiple", visible=False, label="audio"),
            gr.File(file_count="multiple", visible=False, label="spectrograms"),
            gr.JSON(visible=False, label="scores"),
        ]
        return [*groups, *players, *pictures], hidden

    def controls():
        """The generation controls both tabs share: negative prompt, steps, sampler, guidance, seed, candidates."""
        return [
            gr.Textbox(label="Negative prompt", value="Low quality."),
            gr.Slider(1, MAX_STEPS, value=initial_steps, step=1, label="Denoising steps"),
            gr.Dropdown(list(SAMPLERS), value="ddim", label="Sampler"),
            gr.Slider(1.0, 10.0, value=3.5, step=0.1, label="Guidance scale"),
            gr.Number(value=0, precision=0, minimum=0, label="Seed"),
            gr.Slider(1, MAX_CANDIDATES, value=initial_candidates, step=1, label="Candidates"),
        ]

    with gr.Blocks(title=title, delete_cache=(3600, 3600)) as app:
        gr.Markdown(
            f"# {title}\nText to audio and audio editing with [AudioLDM 2](https://arxiv.org/abs/2308.05734) "
            f"(`{pipe.ckpt.source}` on {pipe.device}, {str(pipe.dtype).removeprefix('torch.')}). "
            "Several candidates are ranked by their CLAP score, best first."
        )
        with gr.Tabs():
            with gr.Tab("Text to audio"):
                with gr.Row():
                    with gr.Column():
                        prompt = gr.Textbox(label="Prompt", lines=2, placeholder="A dog barking in the rain")
                        length = gr.Slider(
                            1.0, MAX_LENGTH_S, value=default_length, step=0.01, label="Length (s)"
                        )
                        negative, *rest = controls()
                        button = gr.Button("Generate", variant="primary")
                    with gr.Column():
                        shown, hidden = results()
                inputs = [prompt, negative, length, *rest]
                gr.Examples([[p, n] for p, n in EXAMPLES], inputs=[prompt, negative])
            with gr.Tab("Audio to audio"):
                with gr.Row():
                    with gr.Column():
                        source = gr.Audio(
                            label="Input audio", sources=["upload", "microphone"], type="filepath"
                        )
                        audio_prompt = gr.Textbox(
                            label="Target prompt", lines=2, placeholder="A jazz version"
                        )
                        mode = gr.Radio(list(MODES), value="Style transfer", label="Mode",
                                        info="; ".join(f"{k}: {v}" for k, v in MODES.items()))  # fmt: skip
                        strength = gr.Slider(
                            0.05,
                            1.0,
                            value=0.6,
                            step=0.05,
                            label="Strength (1: from noise; 1 suits inpainting and super-resolution)",
                        )
                        spans = gr.Textbox(
                            label="Spans to regenerate (s), for inpainting", placeholder="1-2, 3.5-5"
                        )
                        audio_controls = controls()
                        audio_button = gr.Button("Transform", variant="primary")
                    with gr.Column():
                        audio_shown, audio_hidden = results()
                audio_inputs = [source, audio_prompt, mode, strength, spans, *audio_controls]
        for trigger, handler, ins, outs, name in [
            ([button.click, prompt.submit], run, inputs, (shown, hidden), "generate"),
            ([audio_button.click], run_audio, audio_inputs, (audio_shown, audio_hidden), "transform"),
        ]:
            event = gr.on(trigger, handler, ins, outs[1], api_name=name, concurrency_limit=1,
                          concurrency_id="model")  # fmt: skip
            event.success(
                lay_out, outs[1], outs[0], api_visibility="private"
            )  # a failed run keeps the players
    return app.queue(default_concurrency_limit=1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from .cli import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="audioldm2-demo", description="A web demo of AudioLDM 2 on Gradio.")
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="hub repo id or local folder (default: %(default)s)"
    )
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of --model")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on; 0.0.0.0 for every interface")
    p.add_argument("--port", type=int, default=7860, help="port to serve on (default: %(default)s)")
    p.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then the CPU), cpu, cuda, mps")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="compute dtype; auto: float16 on CUDA, float32 elsewhere",
    )
    p.add_argument("--low-memory", action="store_true", help="load each component only while it runs")
    p.add_argument("--debug", action="store_true", help="on an error at start, show the traceback too")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from .cli import device_line, error_line, resolve_device_and_dtype

    args = parse_args(argv)
    try:
        try:
            import gradio  # noqa: F401
        except ImportError as e:
            raise ImportError('the demo needs gradio: pip install "audioldm2-core[demo]"') from e
        from .pipeline import AudioLDM2
        from .spectrogram import require_matplotlib

        require_matplotlib()
        device, dtype = resolve_device_and_dtype(args.device, args.dtype)
        print(f"audioldm2-demo: {device_line(device, dtype)}", file=sys.stderr)
        pipe = AudioLDM2.from_pretrained(
            args.model, revision=args.revision, device=device, dtype=dtype, low_memory=args.low_memory
        )
        app = build_app(pipe)
        app.launch(server_name=args.host, server_port=args.port, share=args.share)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if args.debug:
            traceback.print_exception(e)
        print(f"audioldm2-demo: error: {error_line(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
