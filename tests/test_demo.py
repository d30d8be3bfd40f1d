"""The web demo: its handler on a tiny checkpoint, the app served on a local port and called through
gradio_client's ``/generate``, and (marked ``browser``) a headless Chromium that loads the page, submits a prompt
and sees audio players and spectrograms appear, with a screenshot kept as the test's artefact."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from audioldm2_core import AudioLDM2, demo

pytest.importorskip("gradio", reason="the demo needs gradio (pip install '.[demo]')")
pytest.importorskip("matplotlib", reason="the demo needs matplotlib (pip install '.[demo]')")


@pytest.fixture(scope="module")
def pipe(tiny_base):
    return AudioLDM2.from_pretrained(tiny_base, device="cpu")


def _check_files(audios: list, images: list, seconds: float) -> None:
    from PIL import Image

    for wav, png in zip(audios, images, strict=True):
        audio, rate = sf.read(wav, dtype="float32")
        assert rate == 16000 and audio.shape == (int(seconds * 16000),) and np.isfinite(audio).all()
        image = Image.open(png)
        assert image.format == "PNG" and image.size == (800, 320)


def test_handler(pipe, tmp_path):
    steps_seen = []
    found = demo.generate(
        pipe, "a dog barking", "low quality", 1.0, 2, "dpmpp-2m", 3.5, 7, 2,
        out_dir=tmp_path, progress=lambda i, n: steps_seen.append((i, n)),
    )  # fmt: skip
    assert steps_seen == [(1, 2), (2, 2)]
    assert len(found) == 2 and found[0].score >= found[1].score  # best first
    _check_files([c.audio for c in found], [c.spectrogram for c in found], 1.0)
    # the same seed, the same best candidate as the pipeline itself
    import torch

    out = pipe("a dog barking", negative_prompt="low quality", audio_length_in_s=1.0, num_inference_steps=2,
               sampler="dpmpp-2m", num_waveforms_per_prompt=2, generator=torch.Generator().manual_seed(7))  # fmt: skip
    assert np.abs(sf.read(found[0].audio, dtype="float32")[0] - out.audios[0]).max() == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (("  ",), "the prompt is empty"),
        (("rain", None, 1.0, 0), "steps must be a whole number from 1 to 500, got 0"),
        (("rain", None, 1.0, 2.5), "steps must be a whole number from 1 to 500, got 2.5"),
        (("rain", None, 1.0, 2, "eulerx"), "unknown sampler 'eulerx'"),  # (euler is a name now)
        (("rain", None, 1.0, 2, "ddim", 3.5, 0, 5), "candidates must be a whole number from 1 to 4, got 5"),
        (("rain", None, 99.0), "length must be from 0"),
    ],
)
def test_handler_refuses_bad_input(pipe, tmp_path, args, message):
    with pytest.raises(ValueError, match=message):
        demo.generate(pipe, *args, out_dir=tmp_path)


@pytest.fixture(scope="module")
def input_wav(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "in.wav"
    sf.write(path, (0.2 * np.random.default_rng(0).standard_normal((2, 13230))).T.astype(np.float32), 22050)
    return path  # 0.6 s, stereo, 22.05 kHz


def test_audio_handler(pipe, input_wav, tmp_path):
    """Each mode through the audio tab's handler: the input's length, progress over the steps run, and the
    same best candidate as the pipeline called directly."""
    import torch

    seen = []
    found = demo.transform(
        pipe, str(input_wav), "a jazz version", "Style transfer", 0.5, "", "low quality", 4, "euler", 3.5, 7, 2,
        out_dir=tmp_path, progress=lambda i, n: seen.append((i, n)),
    )  # fmt: skip
    assert seen == [(1, 2), (2, 2)] and len(found) == 2 and found[0].score >= found[1].score
    _check_files([c.audio for c in found], [c.spectrogram for c in found], 0.6)
    out = pipe("a jazz version", audio=str(input_wav), strength=0.5, negative_prompt="low quality",
               num_inference_steps=4, sampler="euler", num_waveforms_per_prompt=2,
               generator=torch.Generator().manual_seed(7))  # fmt: skip
    assert np.abs(sf.read(found[0].audio, dtype="float32")[0] - out.audios[0]).max() == 0
    phone = tmp_path / "phone.wav"
    sf.write(phone, (0.2 * np.random.default_rng(1).standard_normal(4800)).astype(np.float32), 8000)  # 0.6 s
    for mode, spans, source in [
        ("Inpaint spans", "0.1-0.2, 0.4-0.5", input_wav),
        ("Super-resolution", "", phone),
    ]:
        sub = tmp_path / mode.split()[0]
        sub.mkdir()
        found = demo.transform(pipe, str(source), "rain", mode, 1.0, spans, None, 2, out_dir=sub)
        _check_files([found[0].audio], [found[0].spectrogram], 0.6)
    with pytest.raises(ValueError, match="sample rate is 22050 Hz"):  # nothing missing below 8 kHz
        demo.transform(pipe, str(input_wav), "rain", "Super-resolution", 1.0, "", None, 2, out_dir=tmp_path)


@pytest.mark.parametrize(
    "args, message",
    [
        ((None, "rain"), "upload or record the input audio first"),
        (("IN", " "), "the prompt is empty"),
        (("IN", "rain", "Remix"), "unknown mode 'Remix'"),
        (("IN", "rain", "Inpaint spans", 1.0, " "), "give the spans to regenerate"),
        (("IN", "rain", "Inpaint spans", 1.0, "1 to 2"), "spans '1 to 2': give START-END in seconds"),
        (("IN", "rain", "Style transfer", 0.1, "", None, 4), "runs no step"),
    ],
)
def test_audio_handler_refuses_bad_input(pipe, input_wav, tmp_path, args, message):
    args = tuple(str(input_wav) if a == "IN" else a for a in args)
    with pytest.raises(ValueError, match=message):
        demo.transform(pipe, *args, out_dir=tmp_path)


@pytest.fixture(scope="module")
def served(pipe):
    """The demo served on a free local port: its URL."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = demo.build_app(pipe, steps=2, candidates=2)
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    app.close()


def test_api_through_gradio_client(served, tmp_path):
    from gradio_client import Client

    client = Client(served, verbose=False, download_files=str(tmp_path))
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert list(endpoints) == ["/generate", "/transform"]
    audios, images, scores = client.predict(
        "rain on a tin roof", "low quality", 1.0, 2, "ddim", 3.5, 3, 3, api_name="/generate"
    )
    assert len(audios) == len(images) == len(scores) == 3 and scores == sorted(scores, reverse=True)
    _check_files(audios, images, 1.0)
    with pytest.raises(Exception, match="the prompt is empty"):  # the user's line, not a traceback
        client.predict("", "", 1.0, 2, "ddim", 3.5, 0, 1, api_name="/generate")
    from gradio_client import handle_file

    sf.write(tmp_path / "in.wav", np.full(12000, 0.1, dtype=np.float32), 16000)
    audios, images, scores = client.predict(
        handle_file(str(tmp_path / "in.wav")), "jazz", "Inpaint spans", 1.0, "0.2-0.4", "", 2, "ddim", 3.5, 0, 1,
        api_name="/transform",
    )  # fmt: skip
    _check_files(audios, images, 0.75)


def _chromium() -> str | None:
    """Debian's Chromium, another Chromium or Chrome on the PATH, or AUDIOLDM2_CHROMIUM."""
    candidates = [os.environ.get("AUDIOLDM2_CHROMIUM"), "/usr/bin/chromium"]
    candidates += [shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "chrome")]
    return next((c for c in candidates if c and Path(c).is_file()), None)


@pytest.mark.browser
def test_in_a_browser(served, tmp_path):
    """Load the page, type a prompt, press Generate: two players with spectrograms appear. The screenshot is
    kept in pytest's temp folder (``pytest --basetemp=DIR`` puts it at DIR/test_in_a_browser0/demo.png)."""
    playwright = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install '.[test]')")
    executable = _chromium()
    if executable is None:
        pytest.skip(
            "no Chromium found (/usr/bin/chromium, chromium or google-chrome on PATH, AUDIOLDM2_CHROMIUM)"
        )
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.goto(served, wait_until="domcontentloaded")
            page.get_by_label("Prompt", exact=True).fill("a dog barking in the rain")
            page.get_by_role("button", name="Generate").click()
            second = page.locator("img[src*='candidate2.png']")
            second.wait_for(state="visible", timeout=180_000)
            for rank in (1, 2):
                player = page.locator(f"[data-testid^='audio-player-#{rank} · CLAP score']")
                assert player.count() == 1
                picture = page.locator(f"img[src*='candidate{rank}.png']")
                picture.wait_for(state="visible")
                assert picture.evaluate("img => img.complete && img.naturalWidth") == 800
            # the players fetched and decoded the WAVs: wavesurfer shows their length (the tiny model's 2.56 s)
            page.wait_for_function(
                """() => [1, 2].every(rank => {
                    const d = document.querySelector(`[data-testid^="waveform-#${rank} "] time#duration`);
                    return d && d.textContent.trim() === "0:03";
                })""",
                timeout=60_000,
            )
            page.screenshot(path=tmp_path / "demo.png", full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    print(f"screenshot: {tmp_path / 'demo.png'}")


def test_main_fails_in_one_line(capsys, monkeypatch):
    assert demo.main(["--model", "/no/such/folder"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1]
        == "audioldm2-demo: error: /no/such/folder: no such folder, and not a hub repo id of the form 'owner/name'"
    )
    monkeypatch.setitem(sys.modules, "gradio", None)
    assert demo.main([]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        'audioldm2-demo: error: the demo needs gradio: pip install "audioldm2-core[demo]"'
    )


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_defaults_follow_the_device(pipe, device):
    """On a CPU the controls open at a fast sampler, few steps and one candidate (the page says so); on a GPU at
    diffusers' defaults (200 DDIM steps) and the original demo's three candidates."""
    import types

    import torch

    shown = pipe if device == "cpu" else types.SimpleNamespace(
        ckpt=pipe.ckpt, device=torch.device("cuda"), dtype=torch.float16, default_length=pipe.default_length
    )  # fmt: skip
    app = demo.build_app(shown)
    values = {c.label: getattr(c, "value", None) for c in app.blocks.values() if getattr(c, "label", None)}
    page = " ".join(str(c.value) for c in app.blocks.values() if type(c).__name__ == "Markdown")
    want = demo.DEFAULTS["cpu" if device == "cpu" else "gpu"]
    assert (values["Denoising steps"], values["Candidates"], values["Sampler"]) == want
    assert ("On a CPU the controls start at 25 DPM-Solver++ steps and 1 candidate" in page) == (
        device == "cpu"
    )
    app.close()
