"""``clipforge caption run``: recaption shards into a Parquet side table keyed by sample key.

    OUTPUT/captions/SHARD.parquet  key, shard, caption_original, caption_synthetic, decoder_score,
                                   clip_score_original, clip_score_synthetic (under ``scoring_model``),
                                   clip_cosine_original, clip_cosine_synthetic (the same model's raw
                                   cosines), decoding, scoring_model (+ caption_candidates and
                                   clip_cosine_candidates with --decode.num-candidates > 1)
    OUTPUT/captions/SHARD.bad.json the shard's bad samples (a resumed run still reports them)
    OUTPUT/shards/SHARD-000.tar    with --write-shards: KEY.txt = the synthetic caption and KEY.json
                                   ``captions`` = [synthetic caption] (trainers read every JSON caption);
                                   the originals kept in KEY.json as ``caption_original`` (KEY.txt) and
                                   ``captions_original`` (the JSON list), as ``curate fix`` writes them

Two scores per caption: ``clip_score_*`` is CLIPScore (``2.5 * max(cos, 0)`` of the caption behind the
"A photo depicts" prompt: the captioning metric, comparable across papers), ``clip_cosine_*`` the plain
cosine of the image and the caption as written, signed and unscaled - the measure of curation's
``clip-score`` stage, so it compares with a ``curate`` cut (``clipforge curate fix`` uses it: CLIPScore
clamps every poor caption to 0 and cannot rank them).
    OUTPUT/config.yaml             the run's settings (checked on --resume)
    OUTPUT/summary.json            counts, bad samples by reason and key, timings

One table per shard, written atomically: ``--resume`` skips the shards already done, like curation.
Samples without a caption are still captioned (``caption_original`` empty, its score null); samples
whose image cannot be decoded are counted by reason and key, never silently dropped.

Engines (``--engine``): ``local`` captions the shards one after the other in this process; ``ray``
runs the same :func:`caption_shard` in a Ray Data actor pool (``map_batches`` over the shard URLs, one
shard per call, each actor holding the captioner and models once), as curation's Ray engine does.
Both write the same per-shard files, byte for byte, so a run resumes on either engine.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.caption.captioner import Captioner
from clipforge.caption.decoding import DecodeOptions
from clipforge.caption.features import shard_conditions
from clipforge.caption.rewrite import side_table_path
from clipforge.config import ConfigError, check_run_config, from_dict, write_run_config
from clipforge.data.decode import TEXT_EXTS, DecodeConfig, SkipSample, decode_image, decode_text, find_image
from clipforge.data.report import BadSampleReport
from clipforge.data.shards import expand_shards, shard_name
from clipforge.models.encode import Prepare
from clipforge.utils import atomic_path, prepare_output_dir, write_json

log = logging.getLogger(__name__)
ENGINES = ("local", "ray")
RESUME_MAY_CHANGE = {"output", "workers", "threads", "batch_size", "engine", "ray_address"}


@dataclass
class CaptionRunConfig:
    captioner: str = field(default="", metadata={"help": "captioner dir (OUTPUT/captioner of caption train)"})
    data: list[str] = field(default_factory=list, metadata={"help": "shards to recaption"})
    output: str = field(default="runs/recaption", metadata={"help": "side-table dir"})
    encoder: str = field(
        default="", metadata={"help": "the encoder's spec, if not the saved one (py: specs)"}
    )
    scoring_model: str = field(
        default="encoder", metadata={"help": "CLIP model for clip scores: spec/dir, 'encoder' or 'none'"}
    )
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    decap_temperature: float | None = field(default=None, metadata={"help": "text-only: DeCap T (0: off)"})
    write_shards: bool = field(
        default=False,
        metadata={
            "help": "also write OUTPUT/shards: KEY.txt and KEY.json captions = the synthetic caption, "
            "the originals kept in KEY.json (caption_original, captions_original)"
        },
    )
    batch_size: int = 64
    workers: int = field(default=1, metadata={"help": "decode workers per shard (ray: also the actor count)"})
    threads: int | None = field(default=None, metadata={"help": "torch threads (ray: per actor, default 1)"})
    engine: str = field(
        default="local",
        metadata={"help": "local: shards one by one here; ray: a Ray Data actor pool", "choices": ENGINES},
    )
    ray_address: str | None = field(
        default=None, metadata={"help": "ray: an existing cluster (the output must be on shared storage)"}
    )

    def validate(self) -> None:
        if self.batch_size < 1 or self.workers < 0:
            raise ConfigError("batch_size >= 1 and workers >= 0 are required")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")


class RunPrepare(Prepare):
    """Worker-side: decode the image (required) and the original caption (optional) of a raw sample."""

    raw = True

    def __call__(self, s: dict[str, Any]) -> dict[str, Any]:
        image = decode_image(find_image(s))
        try:
            caption = decode_text(next((s[e] for e in TEXT_EXTS if e in s), None))
        except SkipSample:
            caption = ""
        return {
            "pixels": self.pixels(image),
            "key": s["__key__"],
            "shard": s.get("__shard__", ""),
            "caption": caption,
        }


def _table(rows: dict[str, list[Any]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(pa.table(rows), str(tmp))


def _over_nonempty(texts: list[str], score: Any) -> list[float | None]:
    """``score(rows, texts)`` on the non-empty texts only; None where a text is empty."""
    idx = [i for i, t in enumerate(texts) if t]
    out: list[float | None] = [None] * len(texts)
    if idx:
        for i, v in zip(idx, score(idx, [texts[i] for i in idx])):
            out[i] = float(v)
    return out


def _scores(model: Any, image_emb: np.ndarray, texts: list[str]) -> list[float | None]:
    from clipforge.caption.metrics import clip_scores

    return _over_nonempty(texts, lambda idx, t: clip_scores(model, image_emb[idx], t)["clip_score"])


def _cosines(model: Any, image_emb: np.ndarray, texts: list[str]) -> list[float | None]:
    """Plain cosine of each image and its text as written (no prompt): curation's clip-score measure."""
    from clipforge.models.encode import embed_texts

    def cosine(idx: list[int], t: list[str]) -> Any:
        img = image_emb[idx].astype(np.float32)
        img = img / np.maximum(np.linalg.norm(img, axis=1, keepdims=True), 1e-12)
        return (img * embed_texts(model, t)).sum(1)

    return _over_nonempty(texts, cosine)


def recaption_shard(
    url: str, cap: Captioner, encoder: Any, scorer: Any, cfg: CaptionRunConfig, scorer_name: str
) -> tuple[dict[str, list[Any]], BadSampleReport]:
    """Captions (and clip scores) of one shard's decodable samples; bad ones in the report."""
    kind = cap.condition
    prep = RunPrepare(encoder.preprocess)
    c = cap.shard_conditions(encoder, [url], batch_size=cfg.batch_size, workers=cfg.workers, prepare=prep,
                             fields=(), decode=DecodeConfig(image=True, caption=False))  # fmt: skip
    cands, cand_scores = cap.candidates(c.cond, cfg.decode, cfg.decap_temperature)
    originals = [str(x) for x in c.fields.get("caption", [""] * len(c))]
    img = None
    if scorer is not None:
        if scorer is encoder and kind == "embedding":
            img = c.cond.numpy()
        else:
            sc = shard_conditions(scorer, [url], "embedding", batch_size=cfg.batch_size, workers=cfg.workers,
                                  prepare=RunPrepare(scorer.preprocess), fields=(),
                                  decode=DecodeConfig(image=True, caption=False))  # fmt: skip
            pos = {k: i for i, k in enumerate(sc.keys)}
            missing = [k for k in c.keys if k not in pos]
            if missing:
                raise ValueError(
                    f"the scoring model could not read {len(missing)} samples, e.g. {missing[0]}"
                )
            img = sc.cond.numpy()[[pos[k] for k in c.keys]]
    chosen = [0] * len(c)
    if img is not None and cfg.decode.num_candidates > 1:  # the candidate the scoring model likes best
        flat = [t for row in cands for t in row]
        rep = np.repeat(np.arange(len(c)), [len(row) for row in cands])
        s = np.array([-1.0 if v is None else v for v in _scores(scorer, img[rep], flat)])
        offs = np.cumsum([0, *(len(row) for row in cands)])
        chosen = [int(np.argmax(s[offs[i] : offs[i + 1]])) for i in range(len(c))]
    texts = [row[j] for row, j in zip(cands, chosen)]
    rows: dict[str, list[Any]] = {
        "key": c.keys,
        "shard": [shard_name(url)] * len(c),
        "caption_original": originals,
        "caption_synthetic": texts,
        "decoder_score": [float(cs[j]) for cs, j in zip(cand_scores, chosen)],
    }
    if cfg.decode.num_candidates > 1:
        rows["caption_candidates"] = cands
    if img is not None:
        rows["clip_score_original"] = _scores(scorer, img, originals)
        rows["clip_score_synthetic"] = _scores(scorer, img, texts)
        rows["clip_cosine_original"] = _cosines(scorer, img, originals)
        rows["clip_cosine_synthetic"] = _cosines(scorer, img, texts)
        if cfg.decode.num_candidates > 1:
            flat = [t for row in cands for t in row]
            rep = np.repeat(np.arange(len(c)), [len(row) for row in cands])
            cos = _cosines(scorer, img[rep], flat)
            offs = np.cumsum([0, *(len(row) for row in cands)])
            rows["clip_cosine_candidates"] = [cos[offs[i] : offs[i + 1]] for i in range(len(c))]
    decoding = cfg.decode.describe()
    if cap.mode == "text-only":
        t = cap.meta.get("decap_temperature") if cfg.decap_temperature is None else cfg.decap_temperature
        decoding += f" decap={t or 0:g}"
    rows["decoding"] = [decoding] * len(c)
    rows["scoring_model"] = [scorer_name] * len(c)
    return rows, c.bad


def write_recaptioned_shard(url: str, rows: dict[str, list[Any]], out_dir: Path) -> str:
    """A copy of the shard's captioned samples with ``KEY.txt`` and KEY.json ``captions`` = the synthetic
    caption (a trainer reads every JSON caption: the originals must not stay there), the originals kept
    in ``KEY.json`` (``caption_original``, ``captions_original``) with ``caption_synthetic`` and
    ``decoding`` - the layout ``curate fix`` writes (:func:`clipforge.curate.fix.replace_caption`)."""
    from clipforge.curate.fix import replace_caption
    from clipforge.data.reader import iter_tar_samples
    from clipforge.data.writer import ShardWriter

    by_key = {k: i for i, k in enumerate(rows["key"])}
    stem = shard_name(url).removesuffix(".tar").replace("%", "%%")  # a '%' in a name is not a field
    with ShardWriter(out_dir / f"{stem}-%03d.tar", maxcount=10**9, maxsize=1e15) as w:
        for s in iter_tar_samples(url):
            i = by_key.get(s["__key__"])
            if i is None:  # a bad sample: counted in the summary, not copied
                continue
            new = rows["caption_synthetic"][i]
            w.write(replace_caption(s, new, caption_synthetic=new, decoding=rows["decoding"][i]))
    return ",".join(Path(p).name for p in w.shards)


def caption_shard(
    url: str, cap: Captioner, encoder: Any, scorer: Any, cfg: CaptionRunConfig, scorer_name: str, out: Path
) -> dict[str, Any]:
    """One shard, the unit of work of both engines: skipped when its table exists (``resumed``: its
    bad samples read back), else captioned into ``captions/SHARD.parquet`` (+ ``.bad.json``, and the
    new shard with ``write_shards``); a shard with no decodable image is ``failed``, by name."""
    name = shard_name(url)
    path = side_table_path(out, name)  # never outside OUTPUT/captions (run_captions checked it first)
    bad_path = path.with_suffix(".bad.json")
    if path.exists():  # done by an earlier run: its bad samples still count in this summary
        bad = json.loads(bad_path.read_text()) if bad_path.exists() else {}
        return {"url": url, "status": "resumed", "rows": 0, "bad": bad}
    try:
        rows, report = recaption_shard(url, cap, encoder, scorer, cfg, scorer_name)
    except ValueError as e:  # a shard with no decodable image: recorded, the run goes on
        failed = BadSampleReport()
        failed.add(name, "no_decodable_samples", str(e)[:300])
        return {"url": url, "status": "failed", "rows": 0, "bad": failed.to_dict()}
    write_json(bad_path, report.to_dict())
    if cfg.write_shards:  # before the table: the table marks the shard done for --resume
        write_recaptioned_shard(url, rows, Path(out) / "shards")
    _table(rows, path)
    return {"url": url, "status": "done", "rows": len(rows["key"]), "bad": report.to_dict()}


class ShardCaptioner:
    """Ray actor: holds the captioner and models (deserialized once) and captions whole shards."""

    def __init__(
        self, config: dict[str, Any], captioner: Captioner, encoder: Any, scorer: Any, scorer_name: str,
        out_dir: str,
    ) -> None:  # fmt: skip
        from clipforge.runtime import setup_process

        self.cfg = from_dict(CaptionRunConfig, config)
        setup_process(self.cfg.threads or 1)
        self.args = (captioner, encoder, scorer, self.cfg, scorer_name, Path(out_dir))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        cap, encoder, scorer, cfg, scorer_name, out = self.args
        res = [caption_shard(str(u), cap, encoder, scorer, cfg, scorer_name, out) for u in batch["url"]]
        return {
            "url": [r["url"] for r in res],
            "status": [r["status"] for r in res],
            "rows": [r["rows"] for r in res],
            "bad": [json.dumps(r["bad"]) for r in res],
        }


def run_ray(
    urls: list[str], cap: Captioner, encoder: Any, scorer: Any, cfg: CaptionRunConfig, scorer_name: str,
    out: Path,
) -> list[dict[str, Any]]:  # fmt: skip
    """Every shard through :class:`ShardCaptioner` actors (an existing ``ray.init`` is reused; else a
    local instance with ``workers`` CPUs, or ``ray_address``); results in the order of ``urls``."""
    try:
        import ray
    except ImportError:
        raise SystemExit('the Ray engine needs Ray: pip install "ray[data]"  (or clipforge[ray])') from None
    from clipforge.config import to_dict

    if not ray.is_initialized():
        if cfg.ray_address:
            ray.init(address=cfg.ray_address, log_to_driver=False)
        else:
            ray.init(num_cpus=max(1, cfg.workers), include_dashboard=False, log_to_driver=False)
    cpus = int(ray.available_resources().get("CPU", 1)) or 1
    n_actors = max(1, min(len(urls), cpus, max(1, cfg.workers)))
    kwargs = {"config": to_dict(cfg), "captioner": cap, "encoder": encoder, "scorer": scorer,
              "scorer_name": scorer_name, "out_dir": str(Path(out).resolve())}  # fmt: skip
    ds = ray.data.from_items([{"url": u} for u in urls], override_num_blocks=max(1, len(urls)))
    ds = ds.map_batches(ShardCaptioner, fn_constructor_kwargs=kwargs, batch_size=1, concurrency=n_actors,
                        num_cpus=1, batch_format="default")  # fmt: skip
    rows = ds.take_all()
    res = [{"url": r["url"], "status": r["status"], "rows": int(r["rows"]), "bad": json.loads(r["bad"])}
           for r in rows]  # fmt: skip
    order = {u: i for i, u in enumerate(urls)}
    return sorted(res, key=lambda r: order[r["url"]])


def run_captions(
    cfg: CaptionRunConfig | dict[str, Any],
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Recaption every shard of ``cfg.data`` into OUTPUT/captions/SHARD.parquet; returns the summary."""
    from tqdm import tqdm

    from clipforge.models import load_model
    from clipforge.runtime import setup_process

    cfg = from_dict(CaptionRunConfig, cfg)
    if not cfg.captioner or not cfg.data:
        raise ConfigError("caption run needs --captioner DIR and --data SHARDS")
    setup_process(cfg.threads)
    urls = expand_shards(cfg.data)
    names = [shard_name(u) for u in urls]
    if len(set(names)) != len(names):
        raise ConfigError("two shards share a file name: their side tables would collide")
    for name in names:  # refused before any work or write (side_table_path: inside OUTPUT, UTF-8)
        side_table_path(cfg.output, name)
    cap = Captioner.load(cfg.captioner)
    out = prepare_output_dir(cfg.output, overwrite=overwrite, resume=resume)
    if resume:
        check_run_config(out / "config.yaml", cfg, ignore=RESUME_MAY_CHANGE)
    write_run_config(out / "config.yaml", cfg)
    encoder = cap.load_encoder(cfg.encoder or None)
    scorer_name = cap.meta["encoder"]["model"] if cfg.scoring_model == "encoder" else cfg.scoring_model
    scorer = None
    if cfg.scoring_model == "encoder":
        scorer = encoder
    elif cfg.scoring_model != "none":
        scorer = load_model(cfg.scoring_model)
    t0 = time.perf_counter()
    if cfg.engine == "ray":
        results = run_ray(urls, cap, encoder, scorer, cfg, scorer_name, out)
    else:
        results = [
            caption_shard(url, cap, encoder, scorer, cfg, scorer_name, out)
            for url in tqdm(urls, desc="caption run", unit="shard", disable=not progress)
        ]
    report = BadSampleReport()
    for r in results:
        report.merge(r["bad"])
    done = sum(r["status"] == "done" for r in results)
    skipped = sum(r["status"] == "resumed" for r in results)
    rows_total = sum(r["rows"] for r in results if r["status"] == "done")
    summary = {
        "output": str(out),
        "captioner": cfg.captioner,
        "scoring_model": scorer_name if scorer is not None else None,
        "decoding": cfg.decode.describe(),
        "shards": len(urls),
        "shards_done": done,
        "shards_skipped_resume": skipped,
        "captions": rows_total,
        "engine": cfg.engine,
        "bad_samples": report.to_dict(),
        "seconds": time.perf_counter() - t0,
    }
    write_json(out / "summary.json", summary)
    return summary
