"""Tokenization parity: our TextTokenizer against transformers' tokenizers, called as diffusers calls them.

The reference calls are copied from ``AudioLDM2Pipeline.encode_prompt``:
- RoBERTa (prompt and negative): ``padding="max_length", max_length=model_max_length, truncation=True``;
- T5 prompt: ``padding=True, max_length=model_max_length, truncation=True`` (pad to the longest prompt);
- T5 negative: ``padding="max_length", max_length=<the prompt's T5 length>, truncation=True``.
Tokenizers are trained by weights_tools.tiny_tokenizers, saved in several styles (the hub's legacy configs,
re-saved by transformers 5, tokenizer.json written by an older converter, no tokenizer.json at all).
"""

from __future__ import annotations

import json
import logging
import random
import shutil

import pytest
import torch
import transformers

from audioldm2_core.tokenization import load_tokenizer, tokenizer_from_folder
from weights_tools.tiny_tokenizers import train_tokenizers

CLASSES = {"tokenizer": "RobertaTokenizerFast", "tokenizer_2": "T5TokenizerFast"}


def prompt_corpus() -> list[str]:
    """Over 200 prompts: edge cases by hand, then seeded mixtures of fragments of every kind."""
    hand = [
        "",
        " ",
        "   ",
        "\t\n",
        "\u3000",
        "A dog barking in the distance.",
        "Techno music with a strong, upbeat tempo and high melodic riffs",
        "The sound of a hammer hitting a wooden surface.",
        " leading space",
        "trailing space ",
        "double  space   triple",
        "tabs\tand\nnewlines\r\nhere",
        "UPPER lower MiXeD",
        "punctuation!!! ??? ... ,,, ;;; :: -- __ ** // \\\\ '' \"\" ()[]{}<>",
        "numbers 0 1 22 333 4444 3.14159 1e-5 -42 100%",
        "café naïve résumé façade crème brûlée Ångström Øresund",
        "e\u0301 (combining acute) vs é",
        "İstanbul ß ẞ ﬁ ﬂ ligatures",
        "ｆｕｌｌｗｉｄｔｈ ＡＢＣ ① ② ㈱",
        "non\u00a0breaking\u00a0space and zero\u200bwidth",
        "雨の音と遠くの雷。",
        "下雨的声音，远处有狗在叫。",
        "비가 오는 소리",
        "Звук дождя",
        "Ο ήχος της βροχής",
        "مرحبا بالعالم",
        "שלום עולם",
        "हिन्दी ध्वनि",
        "🎵🎶 music 🐶 dog 🌧️ rain 👍🏽 👨‍👩‍👧",
        "🎹",
        "<mask>",
        " <mask> ",
        "a<mask>b",
        "a <mask> b",
        "<s>",
        "</s>",
        "<pad>",
        "<unk>",
        "<s> hello </s> <pad> <unk>",
        "<extra_id_0>",
        "a <extra_id_5> b",
        "a<extra_id_99>b",
        "<extra_id_100> is not a sentinel",
        "▁ metaspace char ▁▁",
        "Ġ byte-level char",
        "\x00 control \x07 chars \x1b",
        "\ufeffbyte order mark",
        "x" * 300,
        "supercalifragilisticexpialidocious antidisestablishmentarianism",
        "dog " * 600,  # > 512 RoBERTa tokens and > 128 T5 tokens
        "A long, slow ambient piece. " * 40,
        "雨" * 200,
        "🎵" * 300,
        " ".join(f"word{i}" for i in range(200)),
    ]
    fragments = [
        "dog",
        "barking",
        "piano",
        "in the distance",
        "café",
        "雨の音",
        "🎹",
        "<mask>",
        "<extra_id_3>",
        "</s>",
        ",",
        ".",
        "!",
        "  ",
        "\n",
        "Techno",
        "upbeat",
        "ß",
        "naïve",
        "1234",
        "—",
        "'s",
        "n't",
        "rock'n'roll",
    ]
    rng = random.Random(0)
    mixed = []
    for _ in range(170):
        n = rng.choice([0, 1, 2, 3, 5, 8, 13, 21, 40, 80, 200])
        sep = rng.choice([" ", "", "  ", ", "])
        mixed.append(sep.join(rng.choice(fragments) for _ in range(n)))
    corpus = hand + mixed
    assert len(corpus) >= 200
    return corpus


CORPUS = prompt_corpus()


def batches(corpus: list[str], seed: int) -> list[list[str]]:
    """Consecutive batches of mixed sizes (1 .. 13) and one batch of everything."""
    rng, out, i = random.Random(seed), [], 0
    while i < len(corpus):
        n = rng.choice([1, 2, 3, 5, 8, 13])
        out.append(corpus[i : i + n])
        i += n
    return out + [corpus]


@pytest.fixture(scope="module")
def tokenizer_roots(tmp_path_factory):
    """The same trained tokenizers saved in four styles."""
    base = tmp_path_factory.mktemp("tokenizers")
    hub = base / "hub"
    train_tokenizers(hub, seed=0)

    resaved = base / "resaved"
    for name, cls in CLASSES.items():
        getattr(transformers, cls).from_pretrained(hub / name).save_pretrained(resaved / name)

    # An older converter's tokenizer.json: T5 with a normaliser Sequence and a "first" Metaspace (what
    # transformers 4 wrote with legacy=False), RoBERTa with add_prefix_space set in the file but not in the
    # config. transformers 5 overrides all of it from code and config; so must we.
    old = base / "old_json"
    shutil.copytree(hub, old)
    t5 = json.loads((old / "tokenizer_2" / "tokenizer.json").read_text())
    t5["normalizer"] = {
        "type": "Sequence",
        "normalizers": [t5["normalizer"], {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}],
    }
    t5["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": True}
    t5["decoder"] = dict(t5["pre_tokenizer"])
    (old / "tokenizer_2" / "tokenizer.json").write_text(json.dumps(t5))
    roberta = json.loads((old / "tokenizer" / "tokenizer.json").read_text())
    roberta["pre_tokenizer"]["add_prefix_space"] = True
    roberta["post_processor"]["add_prefix_space"] = True
    (old / "tokenizer" / "tokenizer.json").write_text(json.dumps(roberta))

    no_json = base / "no_json"  # vocab.json + merges.txt / spiece.model only: the transformers fallback
    shutil.copytree(hub, no_json)
    for name in CLASSES:
        (no_json / name / "tokenizer.json").unlink()
    return {"hub": hub, "resaved": resaved, "old_json": old, "no_json": no_json}


@pytest.fixture(scope="module", params=["hub", "resaved", "old_json", "no_json"])
def pair(request, tokenizer_roots):
    """(ours, reference) for both tokenizers of one saving style."""
    root = tokenizer_roots[request.param]
    return {
        name: (
            tokenizer_from_folder(root / name, cls),
            getattr(transformers, cls).from_pretrained(root / name),
        )
        for name, cls in CLASSES.items()
    }


def assert_same(ours, ref, what):
    assert torch.equal(ours.input_ids, ref.input_ids), f"{what}: input_ids differ"
    assert torch.equal(ours.attention_mask, ref.attention_mask), f"{what}: attention_mask differ"
    assert ours.input_ids.dtype == ref.input_ids.dtype == torch.long


def test_roberta_matches_reference(pair):
    ours, ref = pair["tokenizer"]
    assert ours.model_max_length == ref.model_max_length == 512
    assert ours.pad_token_id == ref.pad_token_id and len(ours) == len(ref)
    for batch in batches(CORPUS, seed=1):
        r = ref(
            batch, padding="max_length", max_length=ref.model_max_length, truncation=True, return_tensors="pt"
        )
        assert_same(ours(batch, padding="max_length"), r, batch)
    # a single str, as encode_prompt receives it
    r = ref(CORPUS[5], padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    assert_same(ours(CORPUS[5], padding="max_length"), r, CORPUS[5])


def test_t5_matches_reference(pair):
    ours, ref = pair["tokenizer_2"]
    assert ours.model_max_length == ref.model_max_length == 128
    assert ours.pad_token_id == ref.pad_token_id and len(ours) == len(ref)
    negatives = batches(list(reversed(CORPUS)), seed=2)
    for batch, negative in zip(batches(CORPUS, seed=1), negatives, strict=False):
        r = ref(batch, padding=True, max_length=ref.model_max_length, truncation=True, return_tensors="pt")
        o = ours(batch)
        assert_same(o, r, batch)
        # the negative prompts: padded or truncated to the prompt's length
        negative = (negative * len(batch))[: len(batch)]
        length = r.input_ids.shape[1]
        rn = ref(negative, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        assert_same(ours(negative, padding="max_length", max_length=length), rn, negative)
    r = ref(CORPUS[5], padding=True, max_length=128, truncation=True, return_tensors="pt")
    assert_same(ours(CORPUS[5]), r, CORPUS[5])


@pytest.mark.parametrize("name", ["tokenizer", "tokenizer_2"])
def test_truncation_warning(pair, name, caplog):
    ours, ref = pair[name]
    limit = ref.model_max_length
    short = "A dog barking in the distance."
    # the longest prompt that is not cut: exactly model_max_length tokens with its special tokens
    n_special = len(ref("").input_ids)
    word = next(w for w in ["a", "the", "dog", "x"] if len(ref(f"{w} {w}").input_ids) == 2 + n_special)
    exact = " ".join([word] * (limit - n_special))
    over = exact + f" {word} barking loudly"
    assert len(ref(exact).input_ids) == limit

    with caplog.at_level(logging.WARNING, logger="audioldm2_core"):
        caplog.clear()
        ours([short, exact])
        assert not caplog.records
        ours([short, over, exact])
    records = [r for r in caplog.records if r.name == "audioldm2_core"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    message = records[0].getMessage()
    assert "truncated" in message and str(limit) in message
    # what diffusers reports for that prompt: the tokens from position model_max_length - 1 to the end
    untruncated = ref(over, return_tensors="pt").input_ids
    removed = ref.decode(untruncated[0, limit - 1 : -1], clean_up_tokenization_spaces=False)
    assert "barking loudly" in removed and repr(removed) in message


def test_rejects_bad_input(pair):
    ours, _ = pair["tokenizer"]
    with pytest.raises(ValueError, match="empty"):
        ours([])
    with pytest.raises(TypeError, match="str"):
        ours(["ok", 3])
    with pytest.raises(ValueError, match="padding"):
        ours("x", padding="longest_first")


def test_checkpoint_tokenizers_match_pipeline(tiny_base):
    """On the tiny checkpoint, as the reference pipeline loads it (classes from model_index.json)."""
    from audioldm2_core.loading import open_checkpoint
    from tests.oracle import reference_pipeline

    ckpt = open_checkpoint(tiny_base)
    pipe = reference_pipeline(str(tiny_base))
    batch = CORPUS[:40]
    ours = load_tokenizer(ckpt, "tokenizer")
    r = pipe.tokenizer(batch, padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    assert_same(ours(batch, padding="max_length"), r, "tokenizer")
    ours = load_tokenizer(ckpt, "tokenizer_2")
    r = pipe.tokenizer_2(batch, padding=True, max_length=128, truncation=True, return_tensors="pt")
    assert_same(ours(batch), r, "tokenizer_2")


def test_folder_errors(tokenizer_roots, tmp_path):
    from audioldm2_core.errors import CheckpointError

    hub = tokenizer_roots["hub"]
    with pytest.raises(CheckpointError, match="not supported"):
        tokenizer_from_folder(hub / "tokenizer", "VitsTokenizer")
    for key, value, match in (
        ("model_max_length", None, "model_max_length"),
        ("padding_side", "left", "padding_side"),
    ):
        folder = tmp_path / key
        shutil.copytree(hub / "tokenizer", folder)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config[key] = value
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match=match):
            tokenizer_from_folder(folder, "RobertaTokenizerFast")


# ------------------------------------------------------------------------- speech: VITS phonemes

SPEECH_TEXTS = [
    "Hello world, it's me!",
    "The quick brown fox jumps over the lazy dog.",
    "  Leading and trailing spaces  ",
    "double  space   and\ttab",
    "UPPER lower MiXeD case",
    "Numbers like 42 and 1999.",
    "Is this a question? Yes; it is: really!",
    "a",
    "",
    'She said "hi" and left.',
]
# characters only: the normalise-without-phonemes path keeps vocabulary letters and drops punctuation
PLAIN_TEXTS = ["hello world", "Hello, World!", "  spaced  out  ", "MiXeD case.", "", "a;b:c"]
ESPEAK = shutil.which("espeak-ng") or shutil.which("espeak")
needs_espeak = pytest.mark.skipif(
    ESPEAK is None, reason="espeak-ng is not installed (the phonemiser's program)"
)


def _phoneme_tokenizer(tmp_path, add_blank: bool, normalize: bool, phonemize: bool, max_length: int = 310):
    from weights_tools.make_tiny import write_phoneme_tokenizer

    folder = tmp_path / f"vits_{add_blank}_{normalize}_{phonemize}"
    write_phoneme_tokenizer(folder, add_blank=add_blank)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(normalize=normalize, phonemize=phonemize, model_max_length=max_length)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder, transformers.VitsTokenizer.from_pretrained(folder)


def _reference_ids(ref, texts, max_length=310):
    # as diffusers' encode_prompt calls it for the transcription
    r = ref(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return r.input_ids, r.attention_mask


@pytest.mark.parametrize("add_blank", [True, False])
@pytest.mark.parametrize(
    "normalize,phonemize", [pytest.param(True, True, marks=needs_espeak), (True, False), (False, False)]
)
def test_phonemes_match_vits_tokenizer(tmp_path, add_blank, normalize, phonemize):
    from audioldm2_core.tokenization import phoneme_tokenizer_from_folder

    folder, ref = _phoneme_tokenizer(tmp_path, add_blank, normalize, phonemize)
    ours = phoneme_tokenizer_from_folder(folder)
    texts = SPEECH_TEXTS if phonemize else PLAIN_TEXTS if normalize else [t.lower() for t in PLAIN_TEXTS[:3]]
    got = ours(texts)
    ids, mask = _reference_ids(ref, texts)
    assert torch.equal(got.input_ids, ids) and torch.equal(got.attention_mask, mask)


@needs_espeak
def test_phoneme_input_path(tmp_path):
    """IPA given directly gives the ids of the text it is the phonemisation of, without calling espeak."""
    from audioldm2_core import tokenization

    folder, _ = _phoneme_tokenizer(tmp_path, True, True, True)
    ours = tokenization.phoneme_tokenizer_from_folder(folder)
    ipa = [tokenization.phonemize_english(ours._normalize_case(t)) for t in SPEECH_TEXTS]
    assert ipa[0] == "həlˈoʊ wˈɜːld, ɪts mˌiː!"
    want = ours(SPEECH_TEXTS)
    assert torch.equal(ours([p + "  " for p in ipa], is_phonemes=True).input_ids, want.input_ids)


def test_phonemes_out_of_vocabulary_and_missing_phonemizer(tmp_path, monkeypatch):
    import sys

    from audioldm2_core.tokenization import PhonemizerMissingError, phoneme_tokenizer_from_folder

    folder, _ = _phoneme_tokenizer(tmp_path, True, True, True)
    ours = phoneme_tokenizer_from_folder(folder)
    with pytest.raises(
        ValueError, match=r"outside the checkpoint's phoneme vocabulary: '1' \(U\+0031\), '你'"
    ):
        ours(["həlˈoʊ", "wˈɜːld 你 1"], is_phonemes=True)
    monkeypatch.setitem(sys.modules, "phonemizer", None)  # not installed
    with pytest.raises(
        PhonemizerMissingError, match=r'pip install "\.\[speech\]".*transcription_is_phonemes'
    ):
        ours("hello")
    assert ours("hˈɛloʊ", is_phonemes=True).attention_mask.sum() == 13  # the phoneme path needs neither

    class NoEspeak:
        @staticmethod
        def phonemize(*a, **k):
            raise RuntimeError("espeak not installed on your system")

    monkeypatch.setitem(sys.modules, "phonemizer", NoEspeak)
    with pytest.raises(PhonemizerMissingError, match="needs espeak-ng"):
        ours("hello")
    # without phonemisation, punctuation is stripped (the reference's normalisation); other characters are errors
    folder, _ = _phoneme_tokenizer(tmp_path, False, True, False)
    plain = phoneme_tokenizer_from_folder(folder)
    assert plain("Hi (there)").attention_mask.sum() == 8  # the VITS table has no brackets
    with pytest.raises(ValueError, match="'7'"):
        plain("Agent 007")


def test_phonemes_truncated_with_warning(tmp_path, caplog):
    from audioldm2_core.tokenization import phoneme_tokenizer_from_folder

    folder, ref = _phoneme_tokenizer(tmp_path, True, True, False, max_length=20)
    ours = phoneme_tokenizer_from_folder(folder)
    with caplog.at_level(logging.WARNING, logger="audioldm2_core"):
        got = ours(["a much longer transcription than fits", "ok"])
    assert "cut to 'a much lon'" in caplog.text
    ids, mask = _reference_ids(ref, ["a much longer transcription than fits", "ok"], max_length=20)
    assert torch.equal(got.input_ids, ids) and torch.equal(got.attention_mask, mask)


def test_phoneme_folder_errors(tmp_path):
    from audioldm2_core.errors import CheckpointError
    from audioldm2_core.tokenization import phoneme_tokenizer_from_folder

    for key, value, match in (
        ("model_max_length", None, "model_max_length"),
        ("is_uroman", True, "is_uroman"),
        ("pad_token", "<nope>", "pad token"),
    ):
        folder, _ = _phoneme_tokenizer(tmp_path / key, True, True, True)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config[key] = value
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match=match):
            phoneme_tokenizer_from_folder(folder)
