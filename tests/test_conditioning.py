"""encode_prompt parity with diffusers' AudioLDM2Pipeline.encode_prompt on the tiny checkpoint."""

from __future__ import annotations

import logging

import pytest
import torch

from audioldm2_core.conditioning import encode_prompt, load_text_stack
from audioldm2_core.loading import open_checkpoint
from tests.helpers import rel_err
from tests.oracle import reference_pipeline

TOL = 1e-5

LONG = (
    "A long, slow ambient piece with rain, distant thunder and a soft piano. " * 60
)  # > 512 and > 128 tokens

CASES = {
    "single_cfg": dict(prompt="A dog barking in the distance.", do_classifier_free_guidance=True),
    "single_no_cfg": dict(prompt="A dog barking in the distance.", do_classifier_free_guidance=False),
    "single_negative": dict(
        prompt="Techno music", negative_prompt="Low quality.", do_classifier_free_guidance=True
    ),
    "batch_negative_n2": dict(
        prompt=["The sound of a hammer hitting a wooden surface.", "piano", "", "雨の音 🎹 café"],
        negative_prompt=["low quality", "noise", "bad, muffled, distorted recording of a crowd", ""],
        num_waveforms_per_prompt=2,
        do_classifier_free_guidance=True,
    ),
    "batch_no_negative_n2": dict(
        prompt=["a cat meowing", "Heavy metal guitar riff with double bass drums and a screaming singer"],
        num_waveforms_per_prompt=2,
        do_classifier_free_guidance=True,
    ),
    "batch_no_cfg_n2": dict(
        prompt=["a cat meowing", "  ", "birds chirping at dawn near a river"],
        num_waveforms_per_prompt=2,
        do_classifier_free_guidance=False,
    ),
    # the negative prompt is longer than the prompt: its T5 tokens are cut to the prompt's length
    "negative_longer": dict(
        prompt=["rain", "wind"],
        negative_prompt=["a very long negative prompt about many unwanted things " * 3, "hiss"],
        do_classifier_free_guidance=True,
    ),
    "long_prompts": dict(
        prompt=[LONG, "short"], negative_prompt=["x", LONG], do_classifier_free_guidance=True
    ),
    "max_new_tokens_3": dict(prompt=["a", "b c"], do_classifier_free_guidance=True, max_new_tokens=3),
}


@pytest.fixture(scope="module")
def stacks(tiny_base):
    return load_text_stack(open_checkpoint(tiny_base)), reference_pipeline(str(tiny_base))


def reference(pipe, **kwargs):
    kwargs.setdefault("num_waveforms_per_prompt", 1)
    with torch.no_grad():
        return pipe.encode_prompt(device="cpu", **kwargs)


def assert_parity(ours, ref):
    (e, m, g), (re, rm, rg) = ours, ref
    assert e.shape == re.shape and g.shape == rg.shape and e.dtype == re.dtype and g.dtype == rg.dtype
    assert m.dtype == rm.dtype and torch.equal(m, rm), "attention masks differ"
    assert rel_err(e, re) <= TOL, f"prompt_embeds rel err {rel_err(e, re):.2e}"
    assert rel_err(g, rg) <= TOL, f"generated_prompt_embeds rel err {rel_err(g, rg):.2e}"


@pytest.mark.parametrize("case", list(CASES))
def test_parity(stacks, case):
    stack, pipe = stacks
    kwargs = dict(CASES[case])
    ref = reference(pipe, **kwargs)
    ours = encode_prompt(stack, device="cpu", **kwargs)
    assert_parity(ours, ref)
    b = 1 if isinstance(kwargs["prompt"], str) else len(kwargs["prompt"])
    rows = b * kwargs.get("num_waveforms_per_prompt", 1) * (2 if kwargs["do_classifier_free_guidance"] else 1)
    assert ours[0].shape[0] == rows and ours[2].shape[1] == kwargs.get("max_new_tokens", 8)


def halves(out):
    """A CFG output [negative, positive] -> (negative triple, positive triple)."""
    n = out[0].shape[0] // 2
    return tuple(t[:n] for t in out), tuple(t[n:] for t in out)


def test_precomputed_everything(stacks):
    """Precomputed positive and negative tensors: only repeated and concatenated (exactly as diffusers)."""
    stack, pipe = stacks
    (ne, nm, ng), (pe, pm, pg) = halves(
        reference(pipe, **CASES["batch_negative_n2"] | {"num_waveforms_per_prompt": 1})
    )
    kwargs = dict(
        prompt=None,
        prompt_embeds=pe,
        generated_prompt_embeds=pg,
        attention_mask=pm,
        negative_prompt_embeds=ne,
        negative_generated_prompt_embeds=ng,
        negative_attention_mask=nm,
        num_waveforms_per_prompt=3,
        do_classifier_free_guidance=True,
    )
    ref = reference(pipe, **kwargs)
    ours = encode_prompt(stack, device="cpu", **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref, strict=True))
    # masks left out mean all ones, on both sides
    kwargs.update(attention_mask=None, negative_attention_mask=None)
    ref = reference(pipe, **kwargs)
    ours = encode_prompt(stack, device="cpu", **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref, strict=True)) and bool(ours[1].eq(1).all())


def test_precomputed_positive_negative_from_text(stacks):
    """Precomputed prompt tensors; the unconditional branch from "" padded to their length."""
    stack, pipe = stacks
    pe, pm, pg = reference(pipe, **CASES["batch_no_cfg_n2"] | {"num_waveforms_per_prompt": 1})
    kwargs = dict(prompt=None, prompt_embeds=pe, generated_prompt_embeds=pg, attention_mask=pm)
    ref = reference(pipe, do_classifier_free_guidance=True, num_waveforms_per_prompt=2, **kwargs)
    ours = encode_prompt(stack, device="cpu", num_waveforms_per_prompt=2, **kwargs)
    assert_parity(ours, ref)
    # diffusers rejects a negative prompt here (type(None) != str); we accept it, with the same meaning
    ours = encode_prompt(stack, device="cpu", negative_prompt=["", "", ""], **kwargs)
    assert_parity(ours, reference(pipe, do_classifier_free_guidance=True, **kwargs))


def test_prompt_from_text_negative_precomputed(stacks):
    stack, pipe = stacks
    case = CASES["batch_negative_n2"] | {"num_waveforms_per_prompt": 1}
    (ne, nm, ng), _ = halves(reference(pipe, **case))
    kwargs = dict(
        prompt=case["prompt"],
        negative_prompt_embeds=ne,
        negative_generated_prompt_embeds=ng,
        negative_attention_mask=nm,
        num_waveforms_per_prompt=2,
        do_classifier_free_guidance=True,
    )
    assert_parity(encode_prompt(stack, device="cpu", **kwargs), reference(pipe, **kwargs))


def test_str_negative_broadcasts(stacks):
    """A str negative prompt applies to every prompt (diffusers raises a TypeError for a list prompt)."""
    stack, pipe = stacks
    prompts = ["rain on a tin roof", "a crowd cheering"]
    ref = reference(
        pipe, prompt=prompts, negative_prompt=["low quality"] * 2, do_classifier_free_guidance=True
    )
    ours = encode_prompt(stack, prompts, "cpu", negative_prompt="low quality")
    assert_parity(ours, ref)


def test_negative_truncation_warns(stacks, caplog):
    stack, _ = stacks
    with caplog.at_level(logging.WARNING, logger="audioldm2_core"):
        encode_prompt(stack, device="cpu", **CASES["negative_longer"])
    messages = [r.getMessage() for r in caplog.records if r.name == "audioldm2_core"]
    assert any("T5" in m and "negative" in m and "unwanted" in m for m in messages), messages


def test_clap_padding_to_longest_is_exact_enough(stacks):
    """The efficiency claim: padding CLAP's input to the longest prompt instead of 512 changes nothing."""
    stack, _ = stacks
    prompts = ["", "a", "A dog barking in the distance.", "雨の音 🎹", LONG[:900], "piano " * 30]
    with torch.no_grad():
        longest = stack.tokenizer(prompts)
        full = stack.tokenizer(prompts, padding="max_length")
        assert longest.input_ids.shape[1] < 512 and full.input_ids.shape[1] == 512
        a = stack.clap(longest.input_ids, longest.attention_mask)
        b = stack.clap(full.input_ids, full.attention_mask)
    for i in range(len(prompts)):
        assert rel_err(a[i], b[i]) <= 1e-6


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(prompt=3), TypeError, "prompt"),
        (dict(prompt=["a", 3]), TypeError, "prompt"),
        (dict(prompt=[]), ValueError, "empty"),
        (dict(prompt=None), ValueError, "prompt_embeds"),
        (dict(prompt="a", negative_prompt=["x", "y"]), ValueError, "batch size"),
        (dict(prompt=["a", "b"], negative_prompt=["x"]), ValueError, "batch size"),
        (dict(prompt="a", negative_prompt=5), TypeError, "negative_prompt"),
        (dict(prompt="a", num_waveforms_per_prompt=0), ValueError, "num_waveforms_per_prompt"),
        (dict(prompt="a", num_waveforms_per_prompt=1.5), TypeError, "num_waveforms_per_prompt"),
        (dict(prompt="a", max_new_tokens=0), ValueError, "max_new_tokens"),
        (dict(prompt="a", prompt_embeds=torch.zeros(1, 3, 48)), ValueError, "not both"),
        (dict(prompt="a", generated_prompt_embeds=torch.zeros(1, 8, 32)), ValueError, "not both"),
        (dict(prompt=None, prompt_embeds=torch.zeros(1, 3, 48)), ValueError, "generated_prompt_embeds"),
        (
            dict(
                prompt=None, prompt_embeds=torch.zeros(3, 48), generated_prompt_embeds=torch.zeros(1, 8, 32)
            ),
            TypeError,
            "3-D",
        ),
        (
            dict(
                prompt=None,
                prompt_embeds=torch.zeros(2, 3, 48),
                generated_prompt_embeds=torch.zeros(1, 8, 32),
            ),
            ValueError,
            "batch",
        ),
        (
            dict(
                prompt=None,
                prompt_embeds=torch.zeros(1, 3, 48),
                generated_prompt_embeds=torch.zeros(1, 8, 32),
                attention_mask=torch.ones(1, 4, dtype=torch.long),
                do_classifier_free_guidance=False,
            ),
            ValueError,
            "mask",
        ),
        (
            dict(
                prompt="a",
                negative_prompt="b",
                negative_prompt_embeds=torch.zeros(1, 2, 48),
                negative_generated_prompt_embeds=torch.zeros(1, 8, 32),
            ),
            ValueError,
            "not both",
        ),
        (dict(prompt="a", negative_prompt_embeds=torch.zeros(1, 2, 48)), ValueError, "negative_generated"),
        (dict(prompt="a", negative_generated_prompt_embeds=torch.zeros(1, 8, 32)), ValueError, "need"),
        # a precomputed negative of another length than the prompt's T5 tokens ("a" -> 2 tokens)
        (
            dict(
                prompt="a",
                negative_prompt_embeds=torch.zeros(1, 5, 48),
                negative_generated_prompt_embeds=torch.zeros(1, 8, 32),
            ),
            ValueError,
            "positions",
        ),
    ],
)
def test_input_errors(stacks, kwargs, error, match):
    stack, _ = stacks
    kwargs = {"do_classifier_free_guidance": True, **kwargs}
    with pytest.raises(error, match=match):
        encode_prompt(stack, device="cpu", **kwargs)


# ------------------------------------------------------------------------------- speech checkpoints

ESPEAK = __import__("shutil").which("espeak-ng") or __import__("shutil").which("espeak")
needs_espeak = pytest.mark.skipif(
    ESPEAK is None, reason="espeak-ng is not installed (the phonemiser's program)"
)

SPEECH_CASES = {
    "single_cfg": dict(
        prompt="A man speaks clearly.",
        transcription="Hello world, it's me!",
        do_classifier_free_guidance=True,
    ),
    "single_no_cfg": dict(
        prompt="A woman whispers.", transcription="The quick brown fox.", do_classifier_free_guidance=False
    ),
    "batch_negative_n2": dict(
        prompt=["A man speaks clearly.", "A child shouts"],
        transcription=["Hello world, it's me!", "Numbers like 42 are spelled out."],
        negative_prompt=["low quality", "noise"],
        num_waveforms_per_prompt=2,
        do_classifier_free_guidance=True,
    ),
}


@pytest.fixture(scope="module", params=["gigaspeech", "ljspeech"])
def speech_stacks(request):
    path = request.getfixturevalue(f"tiny_{request.param}")
    return load_text_stack(open_checkpoint(path)), reference_pipeline(str(path))


@needs_espeak
@pytest.mark.parametrize("case", list(SPEECH_CASES))
def test_speech_parity(speech_stacks, case):
    """Phonemised transcriptions, the end token, the zero negative branch, learned positions, GPT-2."""
    stack, pipe = speech_stacks
    kwargs = dict(SPEECH_CASES[case], max_new_tokens=5)
    ours = encode_prompt(stack, device="cpu", **kwargs)
    assert_parity(ours, reference(pipe, **kwargs))
    assert ours[0].shape[1:] == (310, stack.t5.cfg.hidden_size) and ours[2].shape[1] == 5
    if kwargs["do_classifier_free_guidance"]:
        negative, _ = halves(ours)
        assert negative[1].dtype == torch.float32 and not negative[1].any() and not negative[0].any()


def test_speech_phoneme_input(speech_stacks):
    """IPA passed as it is: the reference's tokenizer told not to normalise or phonemise reads it the same."""
    stack, pipe = speech_stacks
    ipa = ["həlˈoʊ wˈɜːld, ɪts mˌiː!", "ðə kwˈɪk bɹˈaʊn fˈɑːks."]
    kwargs = dict(prompt=["A man speaks", "a woman"], do_classifier_free_guidance=True, max_new_tokens=4)
    ours = encode_prompt(stack, device="cpu", transcription=ipa, transcription_is_phonemes=True, **kwargs)
    tok = pipe.tokenizer_2
    saved = tok.phonemize, tok.normalize
    tok.phonemize = tok.normalize = False
    try:
        ref = reference(pipe, transcription=ipa, **kwargs)
    finally:
        tok.phonemize, tok.normalize = saved
    assert_parity(ours, ref)


def test_speech_end_token(speech_stacks):
    """diffusers writes 182 over the first id 0: the leading blank with add_blank, else the first pad."""
    from audioldm2_core.conditioning import mark_phoneme_end

    stack, _ = speech_stacks
    tokens = stack.tokenizer_2(["hˈɛloʊ", ""], is_phonemes=True)
    ids, mask = mark_phoneme_end(tokens.input_ids, tokens.attention_mask)
    n = 6 * (2 if stack.tokenizer_2.add_blank else 1) + stack.tokenizer_2.add_blank  # phonemes (and blanks)
    end = 0 if stack.tokenizer_2.add_blank else n
    assert ids[0, end] == 182 and mask[0].sum() == n + (0 if stack.tokenizer_2.add_blank else 1)
    assert ids[1, 0] == 182 and mask[1].sum() == 1  # an empty transcription: the end token alone


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prompt="a man"), "text-to-speech checkpoint: pass `transcription=`"),
        (dict(prompt=["a", "b"], transcription="one"), "1 entries for 2 prompts"),
        (dict(prompt="a", transcription=["x"], transcription_is_phonemes=1), "must be a bool"),
        (dict(prompt="a", transcription="hˈɛloʊ 你", transcription_is_phonemes=True), "'你'"),
    ],
)
def test_speech_errors(speech_stacks, kwargs, match):
    stack, _ = speech_stacks
    with pytest.raises((ValueError, TypeError), match=match):
        encode_prompt(stack, device="cpu", do_classifier_free_guidance=True, max_new_tokens=2, **kwargs)


def test_transcription_for_a_sound_checkpoint_is_an_error(stacks):
    stack, _ = stacks
    with pytest.raises(ValueError, match="`transcription` is for the text-to-speech checkpoints"):
        encode_prompt(stack, "a dog", device="cpu", transcription="woof")
