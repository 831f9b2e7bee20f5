"""The one decoding implementation: greedy, beam search and top-k / top-p sampling, batched, KV-cached.

Every caller (training previews, ``caption run``, evaluation, the server) decodes through
:func:`generate` with a :class:`DecodeOptions`, so a setting means the same thing everywhere.

Guards against the collapse a first CPU prototype showed (every caption "a" or empty): EOS is masked
until ``min_len`` words are out, BOS/PAD (and UNK unless allowed) can never be produced, and a caption
stops at ``max_len`` tokens. Sampling draws from a ``torch.Generator`` seeded with ``seed`` plus the
chunk's first row, so the same inputs, options and batch size give the same captions.

A cross-attention (CoCa) decoder takes image tokens [N, T, C] instead of vectors [N, C]; its image
keys/values are computed once per input in ``model.start`` and never re-gathered per step.

Beam search keeps ``beam_width`` running hypotheses per input; a hypothesis that emits EOS is set
aside with score ``sum(log p) / length ** length_penalty`` and the search for an input stops once no
running hypothesis can beat the worst finished one. With ``length_penalty=0`` and width 1 it is
exactly greedy decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from clipforge.caption.decoder import CaptionDecoder
from clipforge.config import ConfigError

METHODS = ("greedy", "beam", "sample")
RERANKS = ("none", "consensus")


@dataclass
class DecodeOptions:
    method: str = field(default="beam", metadata={"help": "greedy | beam | sample", "choices": METHODS})
    beam_width: int = field(default=3, metadata={"help": "hypotheses kept per input (beam)"})
    length_penalty: float = field(default=1.0, metadata={"help": "beam score = logp / length**this"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_k: int = field(default=0, metadata={"help": "sample among the k most likely words (0: all)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (1: off)"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "CTRL penalty on words already said"})
    no_repeat_ngram: int = field(default=3, metadata={"help": "forbid repeating any n-gram (0: off)"})
    min_len: int = field(default=3, metadata={"help": "words before EOS is allowed"})
    max_len: int = field(default=20, metadata={"help": "tokens generated at most (incl. EOS)"})
    allow_unk: bool = field(default=False, metadata={"help": "let the decoder produce [UNK]"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    batch_size: int = field(default=64, metadata={"help": "inputs decoded together"})
    num_candidates: int = field(
        default=1, metadata={"help": "captions per input (beam: n best hypotheses <= width; sample: n draws)"}
    )
    rerank: str = field(
        default="none",
        metadata={
            "help": "none | consensus: order the beam by score + rerank_weight x mean TF-IDF n-gram cosine "
            "to the captions of the rerank_k nearest training images (the captioner's saved memory)",
            "choices": RERANKS,
        },
    )
    rerank_k: int = field(default=20, metadata={"help": "consensus: training images whose captions vote"})
    rerank_weight: float = field(default=32.0, metadata={"help": "consensus: weight against the decoder score"})

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"decode method {self.method!r}: one of {', '.join(METHODS)}")
        if self.beam_width < 1 or self.max_len < 1 or self.batch_size < 1:
            raise ConfigError("beam_width, max_len and batch_size must be >= 1")
        if self.min_len < 0 or self.min_len >= self.max_len:
            raise ConfigError(f"min_len {self.min_len} must be in [0, max_len {self.max_len})")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ConfigError("temperature must be > 0, top_p in (0, 1], top_k >= 0")
        if self.num_candidates < 1 or (self.method == "greedy" and self.num_candidates > 1):
            raise ConfigError("num_candidates must be >= 1, and 1 for greedy decoding")
        if self.method == "beam" and self.num_candidates > self.beam_width:
            raise ConfigError(f"num_candidates {self.num_candidates} > beam_width {self.beam_width}")
        if self.repetition_penalty <= 0 or self.no_repeat_ngram < 0:
            raise ConfigError("repetition_penalty must be > 0 and no_repeat_ngram >= 0")
        if self.rerank not in RERANKS:
            raise ConfigError(f"rerank {self.rerank!r}: one of {', '.join(RERANKS)}")
        if self.rerank != "none" and (self.method != "beam" or self.rerank_k < 1 or self.rerank_weight < 0):
            raise ConfigError("rerank reorders a beam: it needs method=beam, rerank_k >= 1, rerank_weight >= 0")

    def describe(self) -> str:
        """Short, stable text of the settings that change the output (stored next to captions)."""
        parts = [self.method]
        if self.method == "beam":
            parts += [f"w={self.beam_width}", f"lp={self.length_penalty:g}"]
        if self.method == "sample":
            parts += [f"t={self.temperature:g}", f"k={self.top_k}", f"p={self.top_p:g}", f"seed={self.seed}"]
        parts += [f"rep={self.repetition_penalty:g}", f"ngram={self.no_repeat_ngram}"]
        parts += [f"len={self.min_len}-{self.max_len}"]
        if self.num_candidates > 1:
            parts.append(f"n={self.num_candidates}")
        if self.rerank != "none":
            parts.append(f"rerank={self.rerank} k={self.rerank_k} w={self.rerank_weight:g}")
        return " ".join(parts)


@dataclass
class SpecialIds:
    bos: int
    eos: int
    pad: int
    unk: int


def _no_repeat_mask(seqs: torch.Tensor, n: int, vocab: int) -> torch.Tensor:
    """[B, V] bool: words that would complete an n-gram already present in each row of ``seqs``."""
    b, t = seqs.shape
    if n == 0 or t < n:
        return torch.zeros(b, vocab, dtype=torch.bool, device=seqs.device)
    if n == 1:
        return torch.zeros(b, vocab, dtype=torch.long, device=seqs.device).scatter_(1, seqs, 1).bool()
    grams = seqs.unfold(1, n, 1)  # [B, t - n + 1, n]
    match = (grams[:, :, :-1] == seqs[:, t - n + 1 :].unsqueeze(1)).all(-1)  # [B, K]
    ban = torch.zeros(b, vocab, dtype=torch.long, device=seqs.device)
    return ban.scatter_reduce(1, grams[:, :, -1], match.long(), reduce="amax").bool()


def process_logits(
    logits: torch.Tensor, seqs: torch.Tensor, opts: DecodeOptions, ids: SpecialIds
) -> torch.Tensor:
    """Apply bans and penalties to next-word logits [B, V] given the words so far [B, T]."""
    logits = logits.float().clone()
    if opts.repetition_penalty != 1.0 and seqs.shape[1]:
        seen = logits.gather(1, seqs)
        seen = torch.where(seen > 0, seen / opts.repetition_penalty, seen * opts.repetition_penalty)
        logits.scatter_(1, seqs, seen)
    if opts.no_repeat_ngram:
        logits.masked_fill_(_no_repeat_mask(seqs, opts.no_repeat_ngram, logits.shape[1]), float("-inf"))
    banned = [ids.bos, ids.pad] + ([] if opts.allow_unk else [ids.unk])
    if seqs.shape[1] < opts.min_len:
        banned.append(ids.eos)
    logits[:, banned] = float("-inf")
    if seqs.shape[1] >= opts.min_len:  # every other word banned (tiny vocabularies): EOS stays possible
        dead = torch.isneginf(logits).all(1)
        logits[dead, ids.eos] = 0.0
    return logits


def _sample(logits: torch.Tensor, opts: DecodeOptions, gen: torch.Generator) -> torch.Tensor:
    logits = logits / opts.temperature
    if opts.top_k:
        kth = logits.topk(min(opts.top_k, logits.shape[1]), dim=1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if opts.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=1, descending=True)
        probs = sorted_logits.softmax(1)
        drop = probs.cumsum(1) - probs > opts.top_p  # keep the smallest prefix reaching top_p (>= 1 word)
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(1)


def _greedy_or_sample(
    model: CaptionDecoder, cond: torch.Tensor, opts: DecodeOptions, ids: SpecialIds, gen: torch.Generator
) -> tuple[list[list[int]], list[float]]:
    b = cond.shape[0]
    logits, cache = model.start(cond, ids.bos)
    seqs = torch.empty(b, 0, dtype=torch.long, device=cond.device)
    done = torch.zeros(b, dtype=torch.bool, device=cond.device)
    score = torch.zeros(b, device=cond.device)
    for t in range(opts.max_len):
        logits = process_logits(logits, seqs, opts, ids)
        nxt = logits.argmax(1) if opts.method == "greedy" else _sample(logits, opts, gen)
        logp = logits.log_softmax(1).gather(1, nxt[:, None]).squeeze(1)
        score = score + torch.where(done, 0.0, logp)
        nxt = torch.where(done, torch.full_like(nxt, ids.pad), nxt)
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        done |= nxt == ids.eos
        if bool(done.all()) or t == opts.max_len - 1:
            break
        logits = model.step(nxt, cache)
    return [_strip(s, ids) for s in seqs.tolist()], score.tolist()


def _strip(seq: list[int], ids: SpecialIds) -> list[int]:
    out = []
    for i in seq:
        if i in (ids.eos, ids.pad):
            break
        out.append(i)
    return out


def _beam(
    model: CaptionDecoder, cond: torch.Tensor, opts: DecodeOptions, ids: SpecialIds
) -> tuple[list[list[list[int]]], list[list[float]]]:
    b, w, alpha = cond.shape[0], opts.beam_width, opts.length_penalty
    dev = cond.device
    logits, cache = model.start(cond, ids.bos)
    cache.select(torch.arange(b, device=dev).repeat_interleave(w))
    logits = logits.repeat_interleave(w, 0)
    seqs = torch.empty(b * w, 0, dtype=torch.long, device=dev)
    scores = torch.full((b, w), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # all beams start identical: only the first may expand at step 0
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
    active = [True] * b

    def norm(s: float, length: int) -> float:
        return s / (length**alpha)

    for t in range(opts.max_len):
        logp = process_logits(logits, seqs, opts, ids).log_softmax(1).view(b, w, -1)
        cand = (scores.unsqueeze(2) + logp).view(b, -1)  # [B, W*V]
        top_s, top_i = cand.topk(min(2 * w, cand.shape[1]), dim=1)
        vocab = logp.shape[2]
        parent = torch.zeros(b, w, dtype=torch.long, device=dev)
        token = torch.full((b, w), ids.pad, dtype=torch.long, device=dev)
        new_scores = torch.full((b, w), float("-inf"), device=dev)
        for i in range(b):
            if not active[i]:
                continue
            k = 0
            for s, j in zip(top_s[i].tolist(), top_i[i].tolist()):
                if s == float("-inf") or k == w:
                    break
                beam, tok = divmod(j, vocab)
                if tok == ids.eos:
                    finished[i].append((norm(s, t + 1), seqs[i * w + beam].tolist()))
                    continue
                parent[i, k], token[i, k], new_scores[i, k] = beam, tok, s
                k += 1
            finished[i].sort(key=lambda h: -h[0])
            del finished[i][w:]
            if len(finished[i]) == w:
                best = float(new_scores[i].max())
                bound = best / ((opts.max_len if alpha > 0 else t + 2) ** alpha)
                active[i] = best != float("-inf") and bound > finished[i][-1][0]
            elif float(new_scores[i].max()) == float("-inf"):
                active[i] = False
        rows = (torch.arange(b, device=dev).unsqueeze(1) * w + parent).view(-1)
        seqs = torch.cat([seqs.index_select(0, rows), token.view(-1, 1)], dim=1)
        scores = new_scores
        if not any(active) or t == opts.max_len - 1:
            break
        cache.select(rows, cross=False)  # parents are beams of the same input: image K/V unchanged
        logits = model.step(token.view(-1), cache)
    out, out_scores = [], []
    for i in range(b):
        hyps = list(finished[i])
        if len(hyps) < w:  # ran out of length: the running beams count as they are
            for k in range(w):
                s = float(scores[i, k])
                if s != float("-inf"):
                    hyps.append((norm(s, seqs.shape[1]), seqs[i * w + k].tolist()))
        hyps.sort(key=lambda h: -h[0])
        hyps = hyps[: opts.num_candidates] or [(float("-inf"), [])]
        out.append([_strip(h[1], ids) for h in hyps])
        out_scores.append([h[0] for h in hyps])
    return out, out_scores


@torch.inference_mode()
def generate_candidates(
    model: CaptionDecoder, cond: torch.Tensor, opts: DecodeOptions, ids: SpecialIds
) -> tuple[list[list[list[int]]], list[list[float]]]:
    """``num_candidates`` captions per row, best first (beam: the n best hypotheses; sampling: n draws
    with seeds ``seed``, ``seed + 1``, ...), and their scores."""
    opts.validate()
    opts = DecodeOptions(**{**opts.__dict__, "max_len": min(opts.max_len, model.cfg.max_len - 1)})
    was_training = model.training
    model.eval()
    seqs: list[list[list[int]]] = []
    scores: list[list[float]] = []
    try:
        for s in range(0, cond.shape[0], opts.batch_size):
            chunk = cond[s : s + opts.batch_size]
            if opts.method == "beam":
                a, b = _beam(model, chunk, opts, ids)
            else:
                a, b = [[] for _ in range(len(chunk))], [[] for _ in range(len(chunk))]
                for j in range(opts.num_candidates):
                    gen = torch.Generator(device=chunk.device).manual_seed(opts.seed + j * 1_000_003 + s)
                    x, y = _greedy_or_sample(model, chunk, opts, ids, gen)
                    for r in range(len(chunk)):
                        a[r].append(x[r])
                        b[r].append(y[r])
            seqs += a
            scores += b
    finally:
        model.train(was_training)
    return seqs, scores


def generate(
    model: CaptionDecoder, cond: torch.Tensor, opts: DecodeOptions, ids: SpecialIds
) -> tuple[list[list[int]], list[float]]:
    """Word ids (no BOS/EOS) and a score (sum of log-probs; length-normalized for beam) per row: the
    first candidate of :func:`generate_candidates`."""
    opts = DecodeOptions(**{**opts.__dict__, "num_candidates": 1})
    seqs, scores = generate_candidates(model, cond, opts, ids)
    return [c[0] for c in seqs], [c[0] for c in scores]


def ngram_repeats(seq: list[int], n: int) -> int:
    """How many n-grams of ``seq`` occur more than once (0 when no-repeat n-gram works)."""
    grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
    return len(grams) - len(set(grams))
