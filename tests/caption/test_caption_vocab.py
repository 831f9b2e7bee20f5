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
