"""Tokenizers of the two text encoders, built from the checkpoint's ``tokenizer.json`` with ``tokenizers``.

AudioLDM 2 tokenizes every prompt twice:

- ``tokenizer/`` is RoBERTa's byte-level BPE (``<s> ... </s>``) for CLAP's text branch. The reference pads
  it to ``model_max_length`` (512) and truncates there;
- ``tokenizer_2/`` is Flan-T5's SentencePiece unigram model (``... </s>``, no BOS) for the T5 encoder. The
  reference pads a batch of prompts to its longest member and truncates at ``model_max_length`` (128); it
  pads or truncates the *negative* prompts to exactly that length, so a negative prompt longer than the
  prompt loses its tail (a diffusers quirk we reproduce, and warn about).

Each becomes a :class:`TextTokenizer` that returns ``(B, L)`` int64 ``input_ids`` and ``attention_mask``
(1 = token, 0 = padding, right-padded with the pad id), identical to what transformers 5 gives diffusers'
``AudioLDM2Pipeline.encode_prompt``.

Quirk: transformers 5 does not run ``tokenizer.json`` as written. Its ``RobertaTokenizer`` and
``T5Tokenizer`` keep the vocabulary (and the added tokens) from the file but rebuild the rest of the
pipeline in code, with ``tokenizer_config.json`` on top. We do the same, so both agree on any file,
including hub files written by older converters:

- RoBERTa: no normaliser; ``ByteLevel(add_prefix_space)`` pre-tokeniser and decoder; ``RobertaProcessing``
  with the config's ``<s>`` / ``</s>``;
- T5: only the SentencePiece ``Precompiled`` normaliser (other normalisers in the file are dropped);
  ``WhitespaceSplit`` then ``Metaspace(prepend_scheme="always", split=True)``, i.e. transformers 4's
  "legacy" behaviour (a ``legacy`` key in the config is ignored in transformers 5); ``$A </s>``.

Truncation and padding are done here rather than by the backend's stateful ``enable_truncation`` /
``enable_padding``: we encode without special tokens, cut the content to ``max_length`` minus the number of
special tokens (as the backend's truncation does), then add the special tokens and pad on the right.

A checkpoint without ``tokenizer.json`` (only ``vocab.json`` + ``merges.txt``, or ``spiece.model``) falls
back to transformers, lazily imported, whose converted backend tokenizer then runs through the same code.

The speech checkpoints' ``tokenizer_2/`` is a ``VitsTokenizer`` (``vocab.json``: one id per character, IPA
symbols included), read by :class:`PhonemeTokenizer` below with no library at all, except the optional
phonemiser (``phonemizer`` + espeak-ng, ``pip install ".[speech]"``) that turns English text into IPA.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Encoding, Tokenizer, decoders, normalizers, pre_tokenizers, processors

from .errors import CheckpointError, PhonemizerMissingError, UsageError, UsageTypeError
from .loading import Checkpoint

__all__ = [
    "TokenBatch",
    "TextTokenizer",
    "PhonemeTokenizer",
    "PhonemizerMissingError",
    "load_tokenizer",
    "tokenizer_from_folder",
    "phoneme_tokenizer_from_folder",
]

logger = logging.getLogger("audioldm2_core")

# The classes model_index.json may name for each kind (the Fast and slow names are one class in transformers 5).
_ROBERTA = ("RobertaTokenizer", "RobertaTokenizerFast")
_T5 = ("T5Tokenizer", "T5TokenizerFast")


@dataclass(frozen=True)
class TokenBatch:
    """A right-padded batch of token ids."""

    input_ids: torch.Tensor  # (B, L) int64
    attention_mask: torch.Tensor  # (B, L) int64, 1 on tokens, 0 on padding


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` configured as transformers 5 configures it, plus ``model_max_length``."""

    def __init__(self, backend: Tokenizer, *, model_max_length: int, pad_token_id: int, name: str):
        if backend.post_processor is None:
            raise CheckpointError(f"{name}: the backend tokenizer has no post-processor (special tokens)")
        self.backend = backend
        self.model_max_length = model_max_length
        self.pad_token_id = pad_token_id
        self.name = name
        self.num_special_tokens = backend.post_processor.num_special_tokens_to_add(False)

    def __repr__(self) -> str:
        return (
            f"TextTokenizer({self.name}, vocab={self.backend.get_vocab_size()}, "
            f"model_max_length={self.model_max_length})"
        )

    def __len__(self) -> int:
        return self.backend.get_vocab_size()  # with added tokens: the rows the embedding must have

    def __call__(
        self,
        texts: str | Sequence[str],
        *,
        padding: Literal["longest", "max_length"] = "longest",
        max_length: int | None = None,
        truncation_note: str = "",
    ) -> TokenBatch:
        """Tokenize a prompt or a batch of prompts, truncated at ``max_length`` (default ``model_max_length``).

        ``padding="longest"`` pads to the longest (truncated) sequence of the batch, ``"max_length"`` to
        ``max_length``. Cutting a prompt logs a warning naming what was cut (``truncation_note`` is
        appended to it: why the limit is what it is).
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise UsageError(f"{self.name}: nothing to tokenize (an empty list of prompts)")
        for t in texts:
            if not isinstance(t, str):
                raise UsageTypeError(f"{self.name}: prompts must be str, got {type(t).__name__}: {t!r}")
        if padding not in ("longest", "max_length"):
            raise UsageError(f"padding must be 'longest' or 'max_length', not {padding!r}")
        max_length = self.model_max_length if max_length is None else max_length
        keep = max_length - self.num_special_tokens  # content tokens that fit beside <s>/</s>
        if keep < 0:
            raise UsageError(f"{self.name}: max_length {max_length} leaves no room for the special tokens")

        encodings: list[Encoding] = self.backend.encode_batch(texts, add_special_tokens=False)
        rows, removed = [], []
        for enc in encodings:
            if len(enc.ids) > keep:
                removed.append(self.backend.decode(enc.ids[keep:], skip_special_tokens=False))
                enc.truncate(keep)
            rows.append(self.backend.post_process(enc).ids)
        if removed:
            logger.warning(
                f"The following part of your input was truncated because the {self.name} input is limited to "
                f"{max_length} tokens{truncation_note}: {removed}"
            )

        length = max_length if padding == "max_length" else max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
        return TokenBatch(input_ids, attention_mask)

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)


# --------------------------------------------------------------------------------------------- loading


def load_tokenizer(
    ckpt: Checkpoint, component: Literal["tokenizer", "tokenizer_2"]
) -> TextTokenizer | PhonemeTokenizer:
    """The tokenizer of a checkpoint component, of the class its ``model_index.json`` names."""
    if ckpt.index[component][1] == "VitsTokenizer":
        return phoneme_tokenizer_from_folder(ckpt.folder(component))
    return tokenizer_from_folder(ckpt.folder(component), ckpt.index[component][1])


def tokenizer_from_folder(folder: str | Path, tokenizer_class: str) -> TextTokenizer:
    """Build a :class:`TextTokenizer` from a tokenizer folder and its transformers class name."""
    folder = Path(folder)
    if tokenizer_class not in _ROBERTA + _T5:
        raise CheckpointError(
            f"{folder}: tokenizer class {tokenizer_class!r} is not supported ({_ROBERTA + _T5})"
        )
    config = _read_json(folder / "tokenizer_config.json")
    if not config:
        raise CheckpointError(f"{folder}: tokenizer_config.json is missing")
    # The legacy special_tokens_map.json is read only when the config has no added_tokens_decoder (transformers).
    specials = {} if "added_tokens_decoder" in config else _read_json(folder / "special_tokens_map.json")

    def token(key: str, default: str) -> str:
        value = config.get(key) or specials.get(key) or default
        return value["content"] if isinstance(value, dict) else str(value)

    for key in ("padding_side", "truncation_side"):  # what AudioLDM 2's tokenizers use; others unsupported
        if config.get(key, "right") != "right":
            raise CheckpointError(f"{folder}/tokenizer_config.json: {key} {config[key]!r} is not supported")
    model_max_length = config.get("model_max_length")
    if not isinstance(model_max_length, int) or model_max_length <= 0:
        raise CheckpointError(f"{folder}/tokenizer_config.json: needs an integer model_max_length")

    if (folder / "tokenizer.json").is_file():
        try:  # the tokenizers library raises a bare Exception for a file it cannot parse
            backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
            raw = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        except Exception as e:
            raise CheckpointError(f"{folder}/tokenizer.json: cannot read it as a tokenizer ({e})") from e
        if tokenizer_class in _ROBERTA:
            _as_roberta(backend, config, token)
        else:
            _as_t5(backend, raw, token)
    else:
        backend = _backend_from_transformers(folder, tokenizer_class)
    backend.no_truncation()
    backend.no_padding()

    def token_id(tok: str) -> int:
        i = backend.token_to_id(tok)
        if i is None:
            raise CheckpointError(f"{folder}: special token {tok!r} is not in the vocabulary")
        return i

    for key, default in (("eos_token", "</s>"), ("unk_token", "<unk>")):
        token_id(token(key, default))
    name = "CLAP text (RoBERTa)" if tokenizer_class in _ROBERTA else "T5"
    return TextTokenizer(
        backend,
        model_max_length=model_max_length,
        pad_token_id=token_id(token("pad_token", "<pad>")),
        name=name,
    )


def _as_roberta(backend: Tokenizer, config: dict[str, Any], token) -> None:
    """transformers 5 ``RobertaTokenizer.__init__``: byte-level pre-tokenizer and decoder, <s> A </s>."""
    add_prefix_space = bool(config.get("add_prefix_space", False))
    trim_offsets = bool(config.get("trim_offsets", True))
    sep, cls = token("sep_token", "</s>"), token("cls_token", "<s>")
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.RobertaProcessing(
        (sep, backend.token_to_id(sep)), (cls, backend.token_to_id(cls)), trim_offsets, add_prefix_space
    )


def _as_t5(backend: Tokenizer, raw: dict[str, Any], token) -> None:
    """transformers 5 ``T5Tokenizer.__init__``: SentencePiece charsmap, Metaspace ("always"), A </s>."""
    charsmap = _precompiled_charsmap(raw.get("normalizer"))
    backend.normalizer = normalizers.Precompiled(charsmap) if charsmap is not None else None
    metaspace = dict(replacement="▁", prepend_scheme="always", split=True)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**metaspace)]
    )
    backend.decoder = decoders.Metaspace(**metaspace)
    eos = token("eos_token", "</s>")
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", eos], pair=["$A", eos, "$B", eos], special_tokens=[(eos, backend.token_to_id(eos))]
    )


def _precompiled_charsmap(normalizer: dict[str, Any] | None) -> bytes | None:
    """The SentencePiece normalisation table of a tokenizer.json normaliser (alone or in a Sequence)."""
    if not normalizer:
        return None
    parts = normalizer["normalizers"] if normalizer.get("type") == "Sequence" else [normalizer]
    for part in parts:
        if part.get("type") == "Precompiled" and "precompiled_charsmap" in part:
            return base64.b64decode(part["precompiled_charsmap"])
    return None


def _backend_from_transformers(folder: Path, tokenizer_class: str) -> Tokenizer:
    """No tokenizer.json: let transformers convert vocab.json/merges.txt or spiece.model (lazy import)."""
    try:
        import transformers
    except ImportError as e:
        raise CheckpointError(
            f"{folder}: no tokenizer.json; converting the slow tokenizer files needs transformers "
            "(and sentencepiece for spiece.model)"
        ) from e
    try:  # corrupt or missing vocabulary files, a missing sentencepiece: transformers' errors vary
        reference = getattr(transformers, tokenizer_class).from_pretrained(str(folder))
        return Tokenizer.from_str(reference.backend_tokenizer.to_str())
    except Exception as e:
        raise CheckpointError(
            f"{folder}: cannot convert the slow tokenizer files with transformers ({type(e).__name__}: {e})"
        ) from e


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


# ------------------------------------------------------------------------------- speech: VITS phonemes


_INSTALL_HINT = (
    'install it with `pip install ".[speech]"` (the `phonemizer` package) plus the espeak-ng program '
    "(`apt install espeak-ng`, `brew install espeak-ng`), or pass phonemes (IPA) directly with "
    "transcription_is_phonemes=True (CLI: --phonemes)"
)


def phonemize_english(text: str) -> str:
    """English text -> IPA with stress marks, exactly as transformers' ``VitsTokenizer`` calls espeak-ng
    through ``phonemizer`` (``en-us`` whatever the tokenizer's ``language``; punctuation kept)."""
    try:
        import phonemizer
    except ImportError as e:
        raise PhonemizerMissingError(
            f"phonemizing the transcription needs `phonemizer`: {_INSTALL_HINT}"
        ) from e
    try:
        phonemes = phonemizer.phonemize(
            text, language="en-us", backend="espeak", strip=True, preserve_punctuation=True, with_stress=True
        )
    except RuntimeError as e:  # phonemizer's way of saying that espeak(-ng) is not installed
        raise PhonemizerMissingError(
            f"phonemizing the transcription needs espeak-ng ({e}): {_INSTALL_HINT}"
        ) from e
    return re.sub(r"\s+", " ", phonemes)


class PhonemeTokenizer:
    """transformers' ``VitsTokenizer`` as diffusers' speech pipeline calls it: one id per character of the
    (normalised, phonemised) transcription, with the blank id 0 between characters if ``add_blank``, right-
    padded with the pad id and truncated to ``model_max_length``.

    The reference's steps, in order (``prepare_for_tokenization``, ``_tokenize``):
    1. ``normalize``: lower-case every character that does not start a vocabulary entry (a greedy scan);
    2. ``phonemize``: espeak-ng's en-us IPA through ``phonemizer``, runs of whitespace made one space;
       otherwise, with ``normalize``, characters outside the vocabulary (punctuation) are removed;
    3. the special tokens (pad, unk: transformers' "added tokens") are cut out of the string first and become
       one token each; every other stretch becomes one token per character, and ``add_blank`` puts the id-0
       token before, between and after the characters *of each stretch* (an empty string gives no token).

    Where we differ on purpose: the reference maps a character outside the vocabulary to ``unk`` (often the
    pad/blank id itself) and carries on; here it is an error naming the characters, since the phoneme encoder
    would silently be told something else. Punctuation that step 2 removes is still removed.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        *,
        pad_token_id: int,
        model_max_length: int,
        add_blank: bool,
        normalize: bool,
        phonemize: bool,
        language: str | None,
        special_tokens: Sequence[str] = (),
        name: str = "VITS phonemes",
    ):
        if 0 not in vocab.values():
            raise CheckpointError(f"{name}: the vocabulary has no id 0 (the blank token)")
        self.vocab = vocab
        self.pad_token_id = pad_token_id
        self.model_max_length = model_max_length
        self.add_blank, self.normalize, self.phonemize = add_blank, normalize, phonemize
        self.language = language
        self.name = name
        specials = sorted({t for t in special_tokens if t in vocab}, key=len, reverse=True)  # longest first
        self._special_split = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None

    def __repr__(self) -> str:
        return (
            f"PhonemeTokenizer(vocab={len(self.vocab)}, model_max_length={self.model_max_length}, "
            f"add_blank={self.add_blank}, normalize={self.normalize}, phonemize={self.phonemize})"
        )

    def __len__(self) -> int:
        return len(self.vocab)

    def _normalize_case(self, text: str) -> str:
        """``VitsTokenizer.normalize_text``: keep vocabulary entries as written, lower-case the rest."""
        out, i = [], 0
        while i < len(text):
            for word in self.vocab:  # the vocabulary's order, first match wins, as the reference
                if text.startswith(word, i):
                    out.append(word)
                    i += len(word)
                    break
            else:
                out.append(text[i].lower())
                i += 1
        return "".join(out)

    def phonemes(self, text: str, *, is_phonemes: bool = False) -> str:
        """The character string that is tokenized: ``text`` normalised and phonemised as the checkpoint's
        tokenizer says; with ``is_phonemes``, ``text`` is taken as phonemes already (whitespace runs made one
        space, as after phonemisation; no case change)."""
        if is_phonemes:
            return re.sub(r"\s+", " ", text).strip()
        if self.normalize:
            text = self._normalize_case(text)
        if self.language == "ron":
            text = text.replace("ț", "ţ")  # the reference's one language-specific substitution
        if self.phonemize:
            return phonemize_english(text)
        if self.normalize:  # the reference strips what the vocabulary lacks; we strip punctuation only
            text = "".join(c for c in text if c in self.vocab or not unicodedata.category(c).startswith("P"))
            return text.strip()
        return text

    def encode(self, text: str, *, is_phonemes: bool = False) -> list[int]:
        """One transcription -> its ids, unpadded and untruncated."""
        chars = self.phonemes(text, is_phonemes=is_phonemes)
        unknown = sorted({c for c in chars if c not in self.vocab})
        if unknown:
            listed = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in unknown)
            how = "the phonemes given" if is_phonemes else f"the phonemes of {text!r}"
            raise UsageError(
                f"{self.name}: {how} ({chars!r}) hold characters outside the checkpoint's phoneme vocabulary: "
                f"{listed}; remove or replace them"
            )
        pieces = self._special_split.split(chars) if self._special_split else [chars]
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i % 2:  # a special token (the split's captured group)
                ids.append(self.vocab[piece])
            elif piece:
                stretch = [self.vocab[c] for c in piece]
                if self.add_blank:
                    blanked = [0] * (2 * len(stretch) + 1)
                    blanked[1::2] = stretch
                    stretch = blanked
                ids += stretch
        return ids

    def __call__(self, texts: str | Sequence[str], *, is_phonemes: bool = False) -> TokenBatch:
        """A batch of transcriptions -> ids and mask (B, model_max_length), as the reference's
        ``padding="max_length", truncation=True``; a cut transcription is logged."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise UsageError(f"{self.name}: nothing to tokenize (an empty list of transcriptions)")
        for t in texts:
            if not isinstance(t, str):
                raise UsageTypeError(
                    f"{self.name}: transcriptions must be str, got {type(t).__name__}: {t!r}"
                )
        length = self.model_max_length
        input_ids = torch.full((len(texts), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(texts), length), dtype=torch.long)
        for i, text in enumerate(texts):
            ids = self.encode(text, is_phonemes=is_phonemes)
            if len(ids) > length:
                logger.warning(
                    f"{self.name}: transcription {i} has {len(ids)} phoneme tokens; the checkpoint reads at most "
                    f"{length}, so it is cut to {self.phonemes(text, is_phonemes=is_phonemes)[: length // (1 + self.add_blank)]!r}"
                )
                ids = ids[:length]
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, : len(ids)] = 1
        return TokenBatch(input_ids, attention_mask)


def phoneme_tokenizer_from_folder(folder: str | Path) -> PhonemeTokenizer:
    """Read a ``VitsTokenizer`` folder (``vocab.json``, ``tokenizer_config.json``) into a :class:`PhonemeTokenizer`."""
    folder = Path(folder)
    config = _read_json(folder / "tokenizer_config.json")
    vocab = _read_json(folder / "vocab.json")
    if not config or not vocab:
        raise CheckpointError(f"{folder}: a VitsTokenizer needs tokenizer_config.json and vocab.json")
    if not all(isinstance(v, int) for v in vocab.values()):
        raise CheckpointError(f"{folder}/vocab.json: ids must be integers")
    specials = {} if "added_tokens_decoder" in config else _read_json(folder / "special_tokens_map.json")
    if config.get("is_uroman"):
        raise CheckpointError(
            f"{folder}/tokenizer_config.json: is_uroman (romanising the input) is not supported"
        )
    for key in ("padding_side", "truncation_side"):
        if config.get(key, "right") != "right":
            raise CheckpointError(f"{folder}/tokenizer_config.json: {key} {config[key]!r} is not supported")
    model_max_length = config.get("model_max_length")
    if not isinstance(model_max_length, int) or isinstance(model_max_length, bool) or model_max_length <= 0:
        raise CheckpointError(f"{folder}/tokenizer_config.json: needs an integer model_max_length")

    def token(key: str, default: str) -> str:
        value = config.get(key) or specials.get(key) or default
        return value["content"] if isinstance(value, dict) else str(value)

    pad = token("pad_token", "<pad>")
    if pad not in vocab:
        raise CheckpointError(f"{folder}: pad token {pad!r} is not in vocab.json")
    added = [t["content"] for t in config.get("added_tokens_decoder", {}).values() if isinstance(t, dict)]
    return PhonemeTokenizer(
        vocab,
        pad_token_id=vocab[pad],
        model_max_length=model_max_length,
        add_blank=bool(config.get("add_blank", True)),
        normalize=bool(config.get("normalize", True)),
        phonemize=bool(config.get("phonemize", True)),
        language=config.get("language"),
        special_tokens=[pad, token("unk_token", "<unk>"), *added],
    )
