"""A small caption vocabulary built from the training captions (``tokenizers`` JSON).

Two kinds (``TOKENIZERS``):

- ``word`` (default): the words seen >= ``min_count`` times; captions are lower-cased and split on
  whitespace and punctuation; rare words map to ``[UNK]``.
- ``wordpiece``: the text tower's WordPiece (MiniLM's BERT vocabulary), either whole (``min_count``
  0: 30,522 rows, which makes each CPU decoder step ~3.5x slower) or trimmed to the pieces the
  training captions use >= ``min_count`` times (a word with a dropped piece maps to ``[UNK]``).
  Decoding glues ``##`` continuation pieces back onto their word.

    vocab = build_vocab(train_captions, min_count=5)
    ids = vocab.encode(["A dog runs ."])      # [[BOS, a, dog, runs, ., EOS]]
    vocab.decode(ids[0])                        # "a dog runs ."
    vocab.save(dir / "vocab.json"); CaptionVocab.load(dir / "vocab.json")
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel, WordPiece

from clipforge.utils import atomic_path

PAD, BOS, EOS, UNK = "[PAD]", "[BOS]", "[EOS]", "[UNK]"
SPECIALS = (PAD, BOS, EOS, UNK)  # ids 0..3, in this order
TOKENIZERS = ("word", "wordpiece")


def _normalizer():
    return normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(), normalizers.Strip()])


def _pre_tokenizer():
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])


class CaptionVocab:
    """A ``tokenizers.Tokenizer`` (word level) plus the special ids the decoder needs."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        ids = [tokenizer.token_to_id(s) for s in SPECIALS]
        if any(i is None for i in ids):
            raise ValueError(f"a caption vocabulary needs the special tokens {SPECIALS}")
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = ids  # type: ignore[misc]

    def __len__(self) -> int:
        return self.tok.get_vocab_size()

    def words(self, text: str) -> list[str]:
        """The normalized words of ``text`` (what the vocabulary counts)."""
        norm = self.tok.normalizer.normalize_str(text)
        return [w for w, _ in self.tok.pre_tokenizer.pre_tokenize_str(norm)]

    def encode(self, texts: list[str], bos: bool = True, eos: bool = True) -> list[list[int]]:
        """Token ids per caption, framed by BOS/EOS."""
        out = []
        for enc in self.tok.encode_batch(list(texts), add_special_tokens=False):
            out.append(([self.bos_id] if bos else []) + list(enc.ids) + ([self.eos_id] if eos else []))
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> caption text, stopping at EOS and dropping BOS/PAD (UNK is kept visible); a WordPiece
        continuation (``##ing``) joins the word before it (a word vocabulary has no such token)."""
        words: list[str] = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.bos_id, self.pad_id):
                continue
            w = self.tok.id_to_token(i) or UNK
            if w.startswith("##") and len(w) > 2 and words:
                words[-1] += w[2:]
            else:
                words.append(w)
        return " ".join(words)

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            self.tok.save(str(tmp))

    @classmethod
    def load(cls, path: str | Path) -> CaptionVocab:
        return cls(Tokenizer.from_file(str(path)))


def count_words(captions: Iterable[str]) -> Counter:
    """Word counts after the vocabulary's own normalization and splitting."""
    norm, pre = _normalizer(), _pre_tokenizer()
    counts: Counter = Counter()
    for c in captions:
        counts.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(c)))
    return counts


def build_vocab(captions: Iterable[str], min_count: int = 5, max_size: int | None = None) -> CaptionVocab:
    """Words seen >= ``min_count`` times (most frequent first, ties alphabetical), capped at ``max_size``."""
    counts = count_words(captions)
    words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
    if max_size is not None:
        words = words[: max(max_size - len(SPECIALS), 0)]
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = _normalizer()
    tok.pre_tokenizer = _pre_tokenizer()
    return CaptionVocab(tok)


def wordpiece_vocab(base: Tokenizer, captions: Iterable[str], min_count: int = 0) -> CaptionVocab:
    """The WordPiece vocabulary of ``base`` (a text tower's ``tokenizers.Tokenizer``) with this module's
    specials: all of its pieces (``min_count`` <= 0), or the pieces the captions use >= ``min_count``
    times, most frequent first. Normalization and pre-tokenization are the tower's own."""
    model = base.model
    if not isinstance(model, WordPiece):
        raise ValueError(f"the text tower's tokenizer is {type(model).__name__}, not WordPiece")
    prefix = model.continuing_subword_prefix
    own_specials = {t.content for t in base.get_added_tokens_decoder().values() if t.special}
    pieces = [p for p, _ in sorted(base.get_vocab(with_added_tokens=False).items(), key=lambda x: x[1])]
    pieces = [p for p in pieces if p not in own_specials and p not in SPECIALS]
    if min_count > 0:
        counts: Counter = Counter()
        for enc in base.encode_batch(list(captions), add_special_tokens=False):
            counts.update(enc.tokens)
        rank = {p: i for i, p in enumerate(pieces)}
        pieces = sorted((p for p in pieces if counts[p] >= min_count), key=lambda p: (-counts[p], rank[p]))
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for p in pieces:
        vocab.setdefault(p, len(vocab))
    tok = Tokenizer(WordPiece(vocab, unk_token=UNK, continuing_subword_prefix=prefix,
                              max_input_chars_per_word=model.max_input_chars_per_word))  # fmt: skip
    tok.normalizer = base.normalizer
    tok.pre_tokenizer = base.pre_tokenizer
    return CaptionVocab(tok)
