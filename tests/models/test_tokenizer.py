from __future__ import annotations

import torch

from clipforge.models.tokenizer import Tokenizer


def test_minilm_tokenizer_pads_to_longest_and_truncates(tmp_path):
    tok = Tokenizer.minilm(context_length=8)
    out = tok(["a dog", "a very long caption that will certainly be cut at eight tokens"])
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.dtype == torch.long and mask.dtype == torch.long
    assert ids.shape == (2, 8)  # longest is truncated to context_length
    assert mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]  # [CLS] a dog [SEP] + padding
    assert ids[0, 0].item() == 101 and ids[0, 3].item() == 102 and ids[0, 4].item() == tok.pad_token_id == 0
    assert ids[1, -1].item() == 102  # truncation keeps the closing [SEP]
    assert tok(["A Dog"])["input_ids"].tolist() == tok(["a dog"])["input_ids"].tolist()  # uncased
    short = tok(["hi", "yo"])["input_ids"]
    assert short.shape == (2, 3)  # padded to the batch's longest, not to context_length

    tok.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    assert again.context_length == 8
    assert torch.equal(again(["a dog", "cat"])["input_ids"], tok(["a dog", "cat"])["input_ids"])


def test_pad_to_max_gives_fixed_length():
    tok = Tokenizer.minilm(context_length=12)
    tok.pad_to_max = True
    assert tok(["a"])["input_ids"].shape == (1, 12)
    assert tok.lengths(["a dog", "a"]) == [4, 3]
