"""Train small but real tokenizers in the layout of ``cvssp/audioldm2``'s ``tokenizer/`` and ``tokenizer_2/``.

The official tokenizers are RoBERTa's byte-level BPE (50265 tokens, for CLAP's text branch) and Flan-T5's
SentencePiece unigram model (32100 tokens). Their vocabularies are not shipped here, so tests use the same
*kinds* of tokenizer trained on a small built-in corpus of sound descriptions:

- ``tokenizer/``: byte-level BPE trained with the ``tokenizers`` library (vocab ~1000, ``<s>=0 <pad>=1
  </s>=2 <unk>=3``, ``<mask>`` last as in RoBERTa), saved by ``RobertaTokenizerFast.save_pretrained``
  (``tokenizer.json``, ``vocab.json``, ``merges.txt``), with the hub's ``tokenizer_config.json`` and
  ``special_tokens_map.json`` (``model_max_length`` 512).
- ``tokenizer_2/``: SentencePiece unigram model (vocab 500, ``<pad>=0 </s>=1 <unk>=2``, no BOS, default
  ``nmt_nfkc`` normalisation, so there is a precompiled charsmap as in T5's) plus 100 ``<extra_id_*>``
  sentinels, converted and saved by ``T5TokenizerFast`` (``spiece.model``, ``tokenizer.json``), with the
  hub's config files (``model_max_length`` 128, no ``legacy`` key).

The config files are the hub's own (legacy style: no ``added_tokens_decoder``), so that
``from_pretrained`` takes the same code path as on the real checkpoint. Deterministic for a seed: the
corpus is drawn from a seeded RNG and SentencePiece trains single-threaded with a fixed seed.

Needs the test extra (transformers, sentencepiece, protobuf).
"""

from __future__ import annotations

import io
import json
import random
import shutil
import tempfile
from pathlib import Path

HUB_TOKENIZERS = Path(__file__).parent / "hub_configs" / "cvssp__audioldm2"

ROBERTA_VOCAB = 1000  # BPE vocab before <mask> is appended
T5_SPM_VOCAB = 500  # SentencePiece pieces; the tokenizer adds 100 sentinels on top
T5_EXTRA_IDS = 100

_ADJECTIVES = (
    "loud soft distant nearby gentle heavy light sharp dull bright dark warm cold rhythmic steady sudden "
    "faint muffled crisp hollow metallic wooden electric acoustic ambient deep high low rapid slow calm "
    "busy quiet noisy smooth rough echoing repetitive melodic harsh mellow eerie cheerful dramatic"
).split()
_SOURCES = (
    "dog cat bird rooster cow horse sheep goat frog cricket bee mosquito owl crow seagull duck pigeon "
    "engine car truck motorcycle train airplane helicopter boat siren alarm bell clock telephone doorbell "
    "piano guitar violin cello trumpet saxophone flute drum snare cymbal synthesizer organ harp banjo "
    "choir singer woman man child baby crowd audience orchestra band wind rain thunder river ocean waves "
    "stream waterfall fire fireworks hammer saw drill typewriter keyboard printer vacuum blender kettle "
    "faucet shower toilet door window footsteps applause laughter whistle chainsaw lawnmower tractor"
).split()
_ACTIONS = (
    "barking meowing chirping crowing mooing neighing buzzing hooting squawking revving idling honking "
    "ringing ticking playing strumming humming singing shouting whispering crying laughing talking "
    "clapping knocking tapping pounding splashing dripping flowing crackling rumbling roaring howling "
    "whistling beeping clicking typing sawing drilling hammering squeaking creaking rattling echoing"
).split()
_PLACES = (
    "in the distance|in a large hall|in a small room|on a busy street|in the forest|near a river|"
    "at the beach|in a cathedral|inside a car|in a kitchen|at night|in the morning|during a storm|"
    "in a stadium|underwater|in a cave|on a farm|in a factory|at a train station|in an office|"
    "in a jazz club|at a concert|in the park|on the roof|in the garden|through a wall"
).split("|")
_STYLES = (
    "Techno music with a strong, upbeat tempo and high melodic riffs|A lo-fi hip hop beat with vinyl "
    "crackle|Ambient drone with slowly evolving pads|Upbeat pop song with catchy vocals and claps|"
    "Classical string quartet playing a slow waltz|Heavy metal guitar riff with double bass drums|"
    "Jazz trio improvising over a swing rhythm|Epic orchestral score with brass fanfares|"
    "Reggae groove with offbeat guitar skanks|Bossa nova with nylon guitar and soft percussion"
).split("|")
# A few non-English and accented lines so that both vocabularies hold some non-ASCII pieces.
_EXTRA = (
    "Café au lait, s'il vous plaît: un piano doux joue près de la fenêtre.",
    "Die Glocken läuten über dem Marktplatz, und die Vögel singen.",
    "El niño toca la guitarra mientras llueve en la ciudad.",
    "Naïve résumé: the façade échoes with a crème brûlée of sounds.",
    "雨の音と遠くの雷。鳥のさえずりが聞こえる。",
    "下雨的声音，远处有狗在叫。",
    "비가 오는 소리와 멀리서 들리는 천둥.",
    "Звук дождя и далёкий гром.",
    "Ο ήχος της βροχής στο παράθυρο.",
    "🎵 music notes and 🐶 dog barks and 🌧️ rain 🎹",
)


def _corpus(seed: int, n: int = 3000) -> list[str]:
    """Seeded sound descriptions: templated captions, music styles and a few multilingual lines."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.75:
            line = (
                f"{rng.choice(['A', 'The', 'Some', 'Two', 'Several'])} {rng.choice(_ADJECTIVES)} "
                f"{rng.choice(_SOURCES)} {rng.choice(_ACTIONS)} {rng.choice(_PLACES)}"
            )
            if rng.random() < 0.5:
                line += f" while a {rng.choice(_SOURCES)} is {rng.choice(_ACTIONS)}"
            line += rng.choice([".", "!", "", ",", "...", "?"])
        elif kind < 0.9:
            line = f"{rng.choice(_STYLES)}, {rng.randint(60, 180)} bpm, {rng.choice(_ADJECTIVES)} mix."
        else:
            line = rng.choice(_EXTRA)
        lines.append(line if i % 7 else line.lower())
    return lines


def _copy_hub_configs(name: str, dst: Path) -> None:
    for f in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(HUB_TOKENIZERS / name / f, dst / f)


def _train_roberta(corpus: list[str], out: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import RobertaTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=ROBERTA_VOCAB,
        min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],  # RoBERTa's ids 0..3
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    vocab = bpe.get_vocab()
    vocab["<mask>"] = len(vocab)  # RoBERTa's <mask> is the last id (50264)

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp)
        (src / "vocab.json").write_text(json.dumps(dict(sorted(vocab.items(), key=lambda kv: kv[1]))))
        merges = json.loads(bpe.to_str())["model"]["merges"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
        (src / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        _copy_hub_configs("tokenizer", src)
        tok = RobertaTokenizerFast.from_pretrained(src)
        tok.save_pretrained(out)
        for f in (
            "vocab.json",
            "merges.txt",
        ):  # transformers 5 writes only tokenizer.json; the hub has all three
            if not (out / f).is_file():
                shutil.copyfile(src / f, out / f)
    _copy_hub_configs("tokenizer", out)  # keep the hub's legacy-style configs, as on the real checkpoint
    return len(tok)


def _train_t5(corpus: list[str], out: Path, seed: int) -> int:
    import sentencepiece as spm
    from transformers import T5TokenizerFast

    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        model_type="unigram",
        vocab_size=T5_SPM_VOCAB,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,  # T5 has no BOS
        num_threads=1,
        character_coverage=0.9995,  # rare (CJK) characters stay <unk>, as with T5's vocab
        minloglevel=2,
    )
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp)
        (src / "spiece.model").write_bytes(model.getvalue())
        _copy_hub_configs("tokenizer_2", src)
        tok = T5TokenizerFast.from_pretrained(src)
        tok.save_pretrained(out)
        if not (out / "spiece.model").is_file():
            shutil.copyfile(src / "spiece.model", out / "spiece.model")
    _copy_hub_configs("tokenizer_2", out)
    return len(tok)


def train_tokenizers(out_root: Path, seed: int = 0) -> dict[str, int]:
    """Write ``tokenizer/`` and ``tokenizer_2/`` under ``out_root``; return their vocab sizes by folder name.

    The sizes are what the text encoders' ``vocab_size`` must be (every id the tokenizer emits has a row).
    """
    out_root = Path(out_root)
    corpus = _corpus(seed)
    sizes = {}
    for name, train in (
        ("tokenizer", lambda out: _train_roberta(corpus, out)),
        ("tokenizer_2", lambda out: _train_t5(corpus, out, seed)),
    ):
        out = out_root / name
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        sizes[name] = train(out)
    return sizes


if __name__ == "__main__":
    import sys

    print(train_tokenizers(Path(sys.argv[1]), seed=int(sys.argv[2]) if len(sys.argv) > 2 else 0))
