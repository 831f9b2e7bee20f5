"""The caption vocabulary: counting, specials, round trip, save/load."""

from __future__ import annotations

from clipforge.caption.vocab import SPECIALS, CaptionVocab, build_vocab


def test_min_count_and_specials():
    v = build_vocab(["A dog runs .", "a dog jumps", "the cat"], min_count=2)
    assert [v.tok.id_to_token(i) for i in range(4)] == list(SPECIALS)
    assert len(v) == 4 + 2  # "a" and "dog" seen twice
    ids = v.encode(["a dog sleeps"])[0]
    assert ids[0] == v.bos_id and ids[-1] == v.eos_id
    assert ids[3] == v.unk_id  # "sleeps" is rare


def test_round_trip_lowercases_and_splits_punctuation(tmp_path):
    v = build_vocab(["A dog, runs."], min_count=1)
    assert v.decode(v.encode(["A DOG, runs."])[0]) == "a dog , runs ."
    v.save(tmp_path / "vocab.json")
    w = CaptionVocab.load(tmp_path / "vocab.json")
    assert w.encode(["a dog runs"]) == v.encode(["a dog runs"])


def test_decode_stops_at_eos_and_max_size():
    v = build_vocab(["x y z"] * 3 + ["x"] * 5, min_count=1, max_size=6)
    assert len(v) == 6 and v.words("X y") == ["x", "y"]
    assert v.decode([v.bos_id, *v.encode(["x"], bos=False, eos=True)[0], 5]) == "x"


def _bert_like():
    """A tiny WordPiece tokenizer shaped like the MiniLM text tower's (its own specials, ## pieces)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordPiece

    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "dog", "snow", "##board", "##ing", "##y", "runs", "."]
    tok = Tokenizer(WordPiece({p: i for i, p in enumerate(pieces)}, unk_token="[UNK]"))
    tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tok


def test_wordpiece_keeps_the_towers_pieces_and_glues_continuations(tmp_path):
    from clipforge.caption.vocab import wordpiece_vocab

    v = wordpiece_vocab(_bert_like(), [], min_count=0)
    assert [v.tok.id_to_token(i) for i in range(4)] == list(SPECIALS)
    assert len(v) == 4 + 8  # the tower's own specials are replaced by ours
    ids = v.encode(["A dog, Snowboarding."])[0]
    assert v.tok.id_to_token(ids[-2]) == "." and ids.count(v.unk_id) == 1  # "," is not a piece
    assert v.decode(ids) == "a dog [UNK] snowboarding ."
    v.save(tmp_path / "vocab.json")
    assert CaptionVocab.load(tmp_path / "vocab.json").encode(["snowy dog"]) == v.encode(["snowy dog"])


def test_wordpiece_trimmed_to_pieces_the_captions_use():
    from clipforge.caption.vocab import wordpiece_vocab

    v = wordpiece_vocab(_bert_like(), ["a snowy dog", "a dog runs", "a dog"], min_count=2)
    assert [v.tok.id_to_token(i) for i in range(4, len(v))] == ["a", "dog"]  # most frequent first
    ids = v.encode(["a snowy dog"])[0]
    assert v.decode(ids) == "a [UNK] dog"  # a word with a dropped piece is one [UNK]
