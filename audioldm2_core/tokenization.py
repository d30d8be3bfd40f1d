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
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Encoding, Tokenizer, decoders, normalizers, pre_tokenizers, processors

from .loading import Checkpoint, CheckpointError

__all__ = ["TokenBatch", "TextTokenizer", "load_tokenizer", "tokenizer_from_folder"]

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
            raise ValueError(f"{name}: the backend tokenizer has no post-processor (special tokens)")
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
            raise ValueError(f"{self.name}: nothing to tokenize (an empty list of prompts)")
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"{self.name}: prompts must be str, got {type(t).__name__}: {t!r}")
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', not {padding!r}")
        max_length = self.model_max_length if max_length is None else max_length
        keep = max_length - self.num_special_tokens  # content tokens that fit beside <s>/</s>
        if keep < 0:
            raise ValueError(f"{self.name}: max_length {max_length} leaves no room for the special tokens")

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


def load_tokenizer(ckpt: Checkpoint, component: Literal["tokenizer", "tokenizer_2"]) -> TextTokenizer:
    """The tokenizer of a checkpoint component, of the class its ``model_index.json`` names."""
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
        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        raw = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
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
    reference = getattr(transformers, tokenizer_class).from_pretrained(str(folder))
    return Tokenizer.from_str(reference.backend_tokenizer.to_str())


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
