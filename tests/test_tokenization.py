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
    from audioldm2_core.loading import CheckpointError

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
