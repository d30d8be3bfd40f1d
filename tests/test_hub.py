"""The real checkpoints against diffusers' own pinned numbers: ``AudioLDM2PipelineSlowTests`` of diffusers'
``tests/pipelines/audioldm2/test_audioldm2.py``, run on this stack with the same inputs, compared with the same
expected audio slices at the same tolerance (1e-3).

Marked ``hub`` and left out of the default run: ``pytest -m hub`` fetches ``cvssp/audioldm2`` and
``cvssp/audioldm2-large`` (the files this stack reads, into the hub cache) and generates on the GPU if there
is one, else the CPU. Without the hub, a checkpoint already in the hub cache is used; otherwise the test
skips and says why.

Their inputs (``get_inputs``): the prompt below; latents ``np.random.RandomState(0).standard_normal((1, 8,
128, 16))`` cast to float32, i.e. 128 latent frames = 5.12 s; a CPU generator seeded 0 (DDIM with eta 0 and
LMS draw no noise, so it is never read); guidance 2.5; 3 steps unless the test says otherwise. Their audio is
81952 samples: the vocoder's whole output for those latents, cut at the default length (10.24 s), which
it does not reach. Here the length is the latents' 5.12 s, so the output is cut at 81920 samples; the
vocoder output is the same, and every pinned slice lies within both.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from audioldm2_core import AudioLDM2
from audioldm2_core.loading import Checkpoint, open_checkpoint

pytestmark = pytest.mark.hub

PROMPT = "A hammer hitting a wooden surface"
LENGTH_S = 5.12  # the length of their latents: 128 frames x 4 mel frames x 10 ms
TOL = 1e-3


@functools.lru_cache(maxsize=1)
def _unreachable() -> str | None:
    """Why the hub cannot be reached (offline mode, no connection), or None when it answers."""
    import huggingface_hub
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        huggingface_hub.get_session().head(constants.ENDPOINT, timeout=10)
    except Exception as e:  # whichever HTTP client this huggingface_hub uses, and its errors
        return f"{type(e).__name__}: {e}"
    return None


def checkpoint(repo: str) -> Checkpoint:
    """The real checkpoint as a user's call fetches it; without the hub, from the hub cache, or a skip."""
    reason = _unreachable()
    if reason is None:
        return open_checkpoint(repo)
    import huggingface_hub

    try:
        folder = huggingface_hub.snapshot_download(repo, local_files_only=True)
    except Exception:
        pytest.skip(
            f"{repo}: the Hugging Face hub cannot be reached ({reason}) and it is not in the hub cache"
        )
    return open_checkpoint(folder)


def generate(repo: str, steps: int = 3, sampler: str = "ddim") -> np.ndarray:
    """Their ``get_inputs`` on this stack: the audio of the first (only) prompt."""
    latents = np.random.RandomState(0).standard_normal((1, 8, 128, 16))
    latents = torch.from_numpy(latents).to(dtype=torch.float32)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = AudioLDM2(checkpoint(repo), device=device)
    assert pipe.latent_shape(LENGTH_S) == tuple(latents.shape)
    audio = pipe(
        PROMPT,
        latents=latents.to(device),
        generator=torch.Generator(device="cpu").manual_seed(0),
        num_inference_steps=steps,
        guidance_scale=2.5,
        audio_length_in_s=LENGTH_S,
        sampler=sampler,
    ).audios[0]
    assert audio.ndim == 1 and len(audio) == int(LENGTH_S * 16000)  # theirs: 81952, see the module docstring
    return audio


def test_audioldm2():
    audio = generate("cvssp/audioldm2", steps=25)
    expected = np.array([0.0791, 0.0666, 0.1158, 0.1227, 0.1171, -0.2880, -0.1940, -0.0283, -0.0126, 0.1127])
    assert np.abs(audio[17275:17285] - expected).max() < TOL


def test_audioldm2_lms():
    # LMSDiscreteScheduler.from_config(the checkpoint's scheduler config): our "lms"
    audio = generate("cvssp/audioldm2", sampler="lms")
    expected = np.array(
        [-0.1318, -0.0577, 0.0446, -0.0573, 0.0659, 0.1074, -0.2600, 0.0080, -0.2190, -0.4301]
    )
    assert np.abs(audio[31390:31400] - expected).max() < TOL


def test_audioldm2_large():
    audio = generate("cvssp/audioldm2-large")
    expected = np.array(
        [-0.1829, -0.1461, 0.0759, -0.1493, -0.1396, 0.5783, 0.3001, -0.3038, -0.0639, -0.2244]
    )
    assert np.abs(audio[8825:8835] - expected).max() < TOL
