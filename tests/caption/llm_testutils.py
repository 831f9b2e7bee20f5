"""A tiny random Llama + a word-level tokenizer, built locally (no downloads): the ``--llm DIR`` of tests."""

from __future__ import annotations

from pathlib import Path

WORDS = (
    "a an the dog dogs man men woman girl boy child ball grass field park beach water snow street bench "
    "red blue green black white brown small big two three is are runs running plays playing sits sitting "
    "on in at with and of near across wearing shirt hat describe what looks like cat airplane truck ship "
    "frog horse bird deer automobile rewrite this caption merge keep names . , : ?"
).split()
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]


def tiny_llm(path: str | Path, chat_template: bool = True, seed: int = 0) -> Path:
    """Write a 2-layer random Llama (hidden 32) and its tokenizer to ``path``; return the dir."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    vocab = {w: i for i, w in enumerate(SPECIAL + [w for w in dict.fromkeys(WORDS) if w not in SPECIAL])}
    vocab.update({"\n": len(vocab), "User:": len(vocab) + 1, "Assistant:": len(vocab) + 2})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")  # fmt: skip
    if chat_template:
        tok.chat_template = (
            "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} \n {% endfor %}"
            "{% if add_generation_prompt %}assistant : {% endif %}"
        )
    tok.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


class FakeLM:
    """A ChatLM stand-in: ``answer(user_text) -> [texts]``; counts the prompts it was given."""

    name = "fake"

    def __init__(self, answer) -> None:
        self.answer = answer
        self.calls = 0

    def prompt(self, messages: list[dict[str, str]]) -> str:
        return messages[-1]["content"]

    def generate(self, prompts: list[str], opts, progress=None) -> list[list[str]]:
        self.calls += len(prompts)
        return [list(self.answer(p))[: opts.num_candidates] for p in prompts]


def caption_shard(path: str | Path, captions: dict[str, str | None]) -> Path:
    """A webdataset shard of KEY.txt captions (None: a sample with no caption, only KEY.cls)."""
    import io
    import tarfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for key, cap in captions.items():
            name, data = (f"{key}.txt", cap.encode()) if cap is not None else (f"{key}.cls", b"0")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path
