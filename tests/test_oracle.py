"""The parity oracle itself: diffusers' pipeline runs end to end on a reference-made tiny checkpoint."""

from __future__ import annotations

import torch

from tests.oracle import run_reference


def test_reference_pipeline_runs_end_to_end(tiny_base):
    out = run_reference(tiny_base, "a dog barks in the rain", num_inference_steps=3, audio_length_in_s=1.0)
    b = 2  # classifier-free guidance: [negative, positive]
    assert out["generated_prompt_embeds"].shape == (b, 8, 32)  # max_new_tokens GPT-2 states of width 32
    assert out["prompt_embeds"].shape[0] == b and out["prompt_embeds"].shape[2] == 48  # T5 width
    assert out["attention_mask"].shape == out["prompt_embeds"].shape[:2]
    assert out["initial_latents"].shape == (1, 8, 25, 16)  # 100 mel frames / 4, 64 mel bins / 4
    assert out["latents"].shape == (1, 8, 25, 16)
    assert out["mel"].shape == (1, 1, 100, 64)
    assert out["audio"].shape == (1, 16000) and out["audio"].dtype == torch.float32
    assert torch.isfinite(out["audio"]).all() and out["audio"].abs().max() > 0
    assert out["timesteps"].tolist() == [667, 334, 1]  # leading spacing, steps_offset 1


def test_reference_is_deterministic_for_a_seed(tiny_base):
    kw = dict(num_inference_steps=2, audio_length_in_s=1.0, guidance_scale=1.0)
    a = run_reference(tiny_base, "rain", seed=3, **kw)["audio"]
    b = run_reference(tiny_base, "rain", seed=3, **kw)["audio"]
    assert torch.equal(a, b)
