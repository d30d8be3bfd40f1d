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

import math
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import MissingDependencyError, UsageError, explain
from .frontend import (
    DEMO,
    device_line,
    error_line,
    fail,
    load_options,
    load_pipeline,
    parse,
    parse_ranges,
    resolve_device_and_dtype,
    speed_lines,
)
from .request import SAMPLERS, AudioEdit, GenerationRequest

__all__ = ["Candidate", "generate", "transform", "build_app", "main", "MAX_CANDIDATES", "MODES"]

SAMPLERS_SHORT = {"dpmpp-2m": "DPM-Solver++", "ddim": "DDIM"}
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
    """A whole number from a control (Gradio gives floats), within the page's bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{name} must be a whole number, got {value!r}")
    if value != int(value) or not low <= value <= high:
        raise UsageError(f"{name} must be a whole number from {low} to {high}, got {value}")
    return int(value)


def _request(
    prompt, negative_prompt, length, steps, sampler, guidance, candidates, edit=None
) -> GenerationRequest:
    """The controls' values as a checked request, within the page's bounds (``MAX_*``)."""
    steps = _whole(steps, "steps", 1, MAX_STEPS)
    candidates = _whole(candidates, "candidates", 1, MAX_CANDIDATES)
    if length is not None and not (isinstance(length, (int, float)) and 0 <= length <= MAX_LENGTH_S):
        raise UsageError(f"length must be from 0 (the model's default) to {MAX_LENGTH_S} s, got {length!r}")
    request = GenerationRequest(
        prompt.strip() if isinstance(prompt, str) else prompt, float(length) if length else None, steps,
        float(guidance) if isinstance(guidance, int | float) else guidance, (negative_prompt or "").strip() or None, candidates, sampler=sampler,
        rerank=True,  # the score is shown even for one candidate
        edit=edit, text_required=True,
    )  # fmt: skip
    request.check()
    return request


def _run(pipe, request: GenerationRequest, seed, out_dir, progress: Callable[[int, int], None] | None):
    """Generate, reporting the steps that run; write the candidates."""
    import torch

    seed = _whole(seed, "seed", 0, 2**63 - 1)
    steps = request.num_inference_steps
    done = (
        request.edit.start_index(steps) if request.edit is not None else 0
    )  # the steps before the first run
    out = pipe(
        **request.arguments(),
        generator=torch.Generator().manual_seed(seed),
        callback=(lambda i, t, x: progress(i + 1 - done, steps - done)) if progress is not None else None,
    )
    return _write_candidates(out, out_dir)


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
    is called after each denoising step. Bad input raises ``UsageError`` (a ValueError) for the user."""
    request = _request(prompt, negative_prompt, length, steps, sampler, guidance, candidates)
    return _run(pipe, request, seed, out_dir, progress)


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
    if audio is None or (isinstance(audio, str) and not audio):
        raise UsageError("upload or record the input audio first")
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "Inpaint spans" and not (spans or "").strip():
        raise UsageError("give the spans to regenerate, in seconds: 1-2, 3.5-5")
    spans_s = tuple(parse_ranges([spans], "spans", "seconds")) if mode == "Inpaint spans" else ()
    edit = AudioEdit(str(audio), None, float(strength), spans_s, super_resolution=mode == "Super-resolution")
    request = _request(prompt, negative_prompt, None, steps, sampler, guidance, candidates, edit)
    return _run(pipe, request, seed, out_dir, progress)


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


def _lay_out(audios, images, scores):
    """An endpoint's result -> the players: one group per candidate, the others hidden."""
    import gradio as gr

    audios, images, scores = audios or [], images or [], scores or []
    groups, players, pictures = [], [], []
    for i in range(MAX_CANDIDATES):
        shown = i < len(audios)
        label = f"#{i + 1}" + (f" · CLAP score {scores[i]:.3f}" if shown and scores[i] is not None else "")
        groups.append(gr.update(visible=shown))
        players.append(gr.update(value=audios[i] if shown else None, label=label))
        pictures.append(gr.update(value=images[i] if shown else None))
    return *groups, *players, *pictures


def _results():
    """One tab's output column: a player and a spectrogram per candidate, and the endpoint's hidden outputs
    (read by ``_lay_out`` and returned to API clients)."""
    import gradio as gr

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


def _controls(steps: int, candidates: int, sampler: str):
    """The generation controls both tabs share: negative prompt, steps, sampler, guidance, seed, candidates."""
    import gradio as gr

    return [
        gr.Textbox(label="Negative prompt", value="Low quality."),
        gr.Slider(1, MAX_STEPS, value=steps, step=1, label="Denoising steps"),
        gr.Dropdown(list(SAMPLERS), value=sampler, label="Sampler"),
        gr.Slider(1.0, 10.0, value=3.5, step=0.1, label="Guidance scale"),
        gr.Number(value=0, precision=0, minimum=0, label="Seed"),
        gr.Slider(1, MAX_CANDIDATES, value=candidates, step=1, label="Candidates"),
    ]


def _text_tab(default_length: float, controls):
    """The "Text to audio" tab: (inputs, button and prompt (the triggers), shown outputs, hidden outputs)."""
    import gradio as gr

    with gr.Row():
        with gr.Column():
            prompt = gr.Textbox(label="Prompt", lines=2, placeholder="A dog barking in the rain")
            length = gr.Slider(1.0, MAX_LENGTH_S, value=default_length, step=0.01, label="Length (s)")
            negative, *rest = controls()
            button = gr.Button("Generate", variant="primary")
        with gr.Column():
            shown, hidden = _results()
    gr.Examples([[p, n] for p, n in EXAMPLES], inputs=[prompt, negative])
    return [prompt, negative, length, *rest], [button.click, prompt.submit], shown, hidden


def _audio_tab(controls):
    """The "Audio to audio" tab, as ``_text_tab``."""
    import gradio as gr

    with gr.Row():
        with gr.Column():
            source = gr.Audio(label="Input audio", sources=["upload", "microphone"], type="filepath")
            prompt = gr.Textbox(label="Target prompt", lines=2, placeholder="A jazz version")
            mode = gr.Radio(list(MODES), value="Style transfer", label="Mode",
                            info="; ".join(f"{k}: {v}" for k, v in MODES.items()))  # fmt: skip
            strength = gr.Slider(0.05, 1.0, value=0.6, step=0.05,
                                 label="Strength (1: from noise; 1 suits inpainting and super-resolution)")  # fmt: skip
            spans = gr.Textbox(label="Spans to regenerate (s), for inpainting", placeholder="1-2, 3.5-5")
            rest = controls()
            button = gr.Button("Transform", variant="primary")
        with gr.Column():
            shown, hidden = _results()
    return [source, prompt, mode, strength, spans, *rest], [button.click], shown, hidden


# The controls' first values by device: on a GPU diffusers' defaults (200 DDIM steps) and the original demo's 3
# candidates; on a CPU, where those take ~25 minutes at 10 s, a fast sampler, fewer steps and one candidate.
DEFAULTS = {"gpu": (200, 3, "ddim"), "cpu": (25, 1, "dpmpp-2m")}


def build_app(pipe, title: str = "AudioLDM 2", *, steps: int | None = None, candidates: int | None = None,
              sampler: str | None = None):  # fmt: skip
    """The Gradio ``Blocks`` of the demo around a loaded :class:`~audioldm2_core.AudioLDM2`, queued with a
    concurrency of one. ``steps``, ``candidates``, ``sampler``: the controls' first values (None: ``DEFAULTS``
    for the pipeline's device). ``app.launch()`` serves it."""
    import gradio as gr

    kind = "cpu" if pipe.device.type == "cpu" else "gpu"
    first_steps, first_candidates, first_sampler = DEFAULTS[kind]
    steps = first_steps if steps is None else steps
    candidates = first_candidates if candidates is None else candidates
    sampler = first_sampler if sampler is None else sampler

    outputs = _Outputs()

    def answer(handler, *args, progress):
        """Run a handler; one line in the browser on failure (a bug's traceback in the server's log too)."""
        try:
            found = handler(pipe, *args, out_dir=outputs.new(),
                            progress=lambda i, n: progress((i, n), desc="denoising", unit="steps"))  # fmt: skip
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

    with gr.Blocks(title=title, delete_cache=(3600, 3600)) as app:
        gr.Markdown(
            f"# {title}\nText to audio and audio editing with [AudioLDM 2](https://arxiv.org/abs/2308.05734) "
            f"(`{pipe.ckpt.source}` on {pipe.device}, {str(pipe.dtype).removeprefix('torch.')}). "
            "Several candidates are ranked by their CLAP score, best first."
            + (
                f" On a CPU the controls start at {steps} {SAMPLERS_SHORT.get(sampler, sampler)} steps and "
                f"{candidates} candidate{'s' if candidates > 1 else ''}, for speed; diffusers' defaults are 200 DDIM "
                "steps."
                if kind == "cpu"
                else ""
            )
        )
        with gr.Tabs():
            with gr.Tab("Text to audio"):
                text = _text_tab(round(pipe.default_length, 2), lambda: _controls(steps, candidates, sampler))
            with gr.Tab("Audio to audio"):
                sound = _audio_tab(lambda: _controls(steps, candidates, sampler))
        for handler, (ins, triggers, shown, hidden), name in [
            (run, text, "generate"),
            (run_audio, sound, "transform"),
        ]:
            event = gr.on(
                triggers, handler, ins, hidden, api_name=name, concurrency_limit=1, concurrency_id="model"
            )
            event.success(_lay_out, hidden, shown, api_visibility="private")  # a failed run keeps the players
    return app.queue(default_concurrency_limit=1)


DESCRIPTION = "A web demo of AudioLDM 2 on Gradio."


def main(argv: list[str] | None = None) -> int:
    args = parse(DEMO, argv, DESCRIPTION)
    try:
        try:
            import gradio  # noqa: F401
        except ImportError as e:
            raise MissingDependencyError('the demo needs gradio: pip install "audioldm2-core[demo]"') from e
        from .spectrogram import require_matplotlib

        require_matplotlib()
        device, dtype = resolve_device_and_dtype(args.device, args.dtype)
        options = load_options(args, device, dtype, low_memory=bool(args.low_memory))
        print(f"audioldm2-demo: {device_line(options, args.dtype)}", file=sys.stderr)
        pipe = load_pipeline("audioldm2-demo", speed_lines("audioldm2-demo", options, quiet=False))
        app = build_app(pipe)
        app.launch(server_name=args.host, server_port=args.port, share=args.share)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        return fail("audioldm2-demo", e, args.debug, 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
