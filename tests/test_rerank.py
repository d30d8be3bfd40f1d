"""Re-ranking: scores equal the reference's ``logits_per_text`` (diffusers ``score_waveforms`` run for real),
and the ranking keeps each prompt's own candidates where the reference ranks across the batch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from audioldm2_core.audio import clap_features, resample
from audioldm2_core.clap_audio import load_clap_audio
from audioldm2_core.clap_text import load_clap_text
from audioldm2_core.config import feature_extractor_config
from audioldm2_core.loading import open_checkpoint
from audioldm2_core.rerank import rank_within_prompts, score
from tests.checkpoints import write_component
from tests.helpers import rel_err
from tests.test_audio import hub_dict, reference_extractor
from tests.test_clap_audio import build_reference_clap


def reference_score_waveforms(text_encoder, feature_extractor, input_ids, attention_mask, audio, n: int):
    """diffusers' ``AudioLDM2Pipeline.score_waveforms`` itself, on stand-ins for the pipeline's attributes
    (the tokenizer returns the given ids); returns its output audio and the logits_per_text it ranked by."""
    from diffusers import AudioLDM2Pipeline
    from transformers import BatchEncoding

    seen = {}

    def encoder(**inputs):
        out = text_encoder(**inputs)
        seen["logits"] = out.logits_per_text.detach().clone()
        return out

    pipe = SimpleNamespace(
        tokenizer=lambda text, **kw: BatchEncoding(
            {"input_ids": input_ids, "attention_mask": attention_mask}
        ),
        feature_extractor=feature_extractor,
        text_encoder=encoder,
        vocoder=SimpleNamespace(config=SimpleNamespace(sampling_rate=16000)),
    )
    prompts = [f"prompt {i}" for i in range(input_ids.shape[0])]
    with torch.no_grad():
        out = AudioLDM2Pipeline.score_waveforms(pipe, prompts, audio, n, device="cpu", dtype=torch.float32)
    return out, seen["logits"]


def test_constructed_case_keeps_each_prompts_own_candidates():
    """Prompt 1's first candidate matches prompt 0 better than any of prompt 0's own: the reference hands
    it to prompt 0 (and twice over, to both prompts); ours ranks within each group. Rows 4 and 5 tie."""
    P, N = 2, 3
    text = torch.eye(4)[:P]  # (P, D) unit vectors
    audio_embeds = F.normalize(
        torch.tensor(
            [
                [0.5, 0.0, 0.8, 0.0],  # prompt 0's candidates: cos with e0 = 0.53, 0.30, 0.10
                [0.3, 0.0, 0.0, 0.95],
                [0.1, 0.0, 0.9, 0.3],
                [1.0, 1.0, 0.0, 0.0],  # prompt 1's: cos with e0 = 0.71 (best for prompt 0 too), e1 = 0.71
                [0.0, 0.4, 0.9, 0.0],  # rows 4 and 5 identical: a tie
                [0.0, 0.4, 0.9, 0.0],
            ]
        ),
        dim=-1,
    )
    log_scale = torch.tensor(2.5)
    waveforms = torch.arange(P * N, dtype=torch.float32)[:, None].repeat(1, 160)  # row i is all i

    def text_encoder(**inputs):  # a ClapModel whose embeddings are the ones above
        return SimpleNamespace(logits_per_text=text @ audio_embeds.t() * log_scale.exp())

    def feature_extractor(audio, **kwargs):  # the stand-in encoder does not look at the features
        return SimpleNamespace(input_features=torch.zeros(len(audio), 1, 1, 1))

    feature_extractor.sampling_rate = 16000  # = the vocoder's rate: librosa.resample returns its input
    ids = torch.zeros(P, 3, dtype=torch.long)
    ref_audio, ref_logits = reference_score_waveforms(
        text_encoder, feature_extractor, ids, torch.ones_like(ids), waveforms, N
    )
    ref_rows = ref_audio[:, 0].long().view(P, N)
    assert ref_rows.tolist() == [[3, 0, 1], [3, 4, 5]]  # the reference's cross-batch fault: row 3 twice

    logits = score(text, audio_embeds, log_scale)
    assert torch.equal(logits, ref_logits)
    ranking = rank_within_prompts(logits, N)
    assert ranking.order.tolist() == [[0, 1, 2], [3, 4, 5]]  # own candidates; tie 4/5 in generation order
    assert torch.equal(ranking.scores, logits.gather(1, ranking.order))
    assert bool((ranking.scores[:, :-1] >= ranking.scores[:, 1:]).all())
    reordered = waveforms[ranking.order.reshape(-1)]
    assert reordered[:, 0].tolist() == [0, 1, 2, 3, 4, 5]


def test_single_prompt_ranking_equals_the_reference():
    """With one prompt there is nothing to cross: our order is the reference's argsort."""
    g = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(1, 8, generator=g), dim=-1)
    audio = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    logits = score(text, audio, torch.tensor(1.7))
    want = torch.argsort(logits, dim=1, descending=True)[:, :5]
    assert torch.equal(rank_within_prompts(logits, 5).order, want)


def test_shape_errors():
    with pytest.raises(ValueError, match="candidates"):
        rank_within_prompts(torch.zeros(2, 5), 2)
    with pytest.raises(ValueError, match="candidates"):
        rank_within_prompts(torch.zeros(2, 0), 0)


def test_scores_equal_the_reference_pipelines_logits(tmp_path):
    """The whole re-ranking path against diffusers' score_waveforms on a tiny ClapModel: librosa resampling
    and ClapFeatureExtractor there, ``resample`` + ``clap_features`` + our two CLAP encoders here."""
    P, N = 2, 2
    ref = build_reference_clap(seed=3)
    ckpt = open_checkpoint(write_component(tmp_path, "text_encoder", ref))
    g = torch.Generator().manual_seed(4)
    waveforms = 0.3 * torch.randn(P * N, 16000, generator=g)  # 1 s at 16 kHz, so repeat-padded at 48 kHz
    input_ids = torch.randint(3, 100, (P, 7), generator=g)
    input_ids[:, 0], input_ids[1, 5:] = 0, 1  # <s> first; prompt 1 padded (pad id 1) to prompt 0's length
    attention_mask = (input_ids != 1).long()
    d = hub_dict()
    ref_audio, ref_logits = reference_score_waveforms(
        ref, reference_extractor(d), input_ids, attention_mask, waveforms, N
    )

    audio_model, text_model = load_clap_audio(ckpt), load_clap_text(ckpt)
    with torch.no_grad():
        features = clap_features(resample(waveforms, 16000, 48000), feature_extractor_config(d))
        logits = score(
            text_model(input_ids, attention_mask), audio_model(features), audio_model.logit_scale_t
        )
    assert logits.shape == ref_logits.shape == (P, P * N)
    assert rel_err(logits, ref_logits) <= 1e-5

    ranking = rank_within_prompts(logits, N)
    own = ref_logits.view(P, P, N)[torch.arange(P), torch.arange(P)]
    want = torch.argsort(own, dim=1, descending=True) + N * torch.arange(P)[:, None]
    assert torch.equal(ranking.order, want)
    # where the reference's picks for a prompt are its own candidates, its output audio is ours
    for p in range(P):
        ref_rows = ref_audio[p * N : (p + 1) * N]
        ours = waveforms[ranking.order[p]]
        if torch.equal(ref_rows, ours):
            continue
        assert not all(any(torch.equal(r, w) for w in waveforms[p * N : (p + 1) * N]) for r in ref_rows)
