"""Request parsing and validation: malformed input becomes an :class:`ApiError` (4xx) here, before any
model work. Handlers read bodies themselves (not through FastAPI's models) where uploads are involved,
so the limits hold while streaming; these functions turn what they read into checked values.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Request
from pydantic import BaseModel, Field

from clipforge.data.decode import SkipSample
from clipforge.data.fetch import PUBLIC_FETCH_ERROR, FetchError
from clipforge.serve.errors import ApiError, too_large_in
from clipforge.serve.labels import parse_label_list, parse_templates
from clipforge.serve.service import ClipService, ServeConfig


class EmbedTextRequest(BaseModel):
    texts: list[str] | None = Field(None, description="texts to embed (at most max_texts)")
    text: str | None = Field(None, description="a single text (alternative to texts)")


class SearchRequest(BaseModel):
    text: str | None = Field(None, description="text query")
    image_url: str | None = Field(None, description="image query by URL (needs --allow-image-urls)")
    k: int = Field(10, description="number of results (1..max_k)")
    filters: dict[str, Any] | None = Field(None, description='column filters, e.g. {"label": 3}')


class UrlRequest(BaseModel):
    url: str


def upload_body(fields: dict[str, Any], json_model: type[BaseModel] | None = None) -> dict[str, Any]:
    """OpenAPI request body for an endpoint taking a multipart image upload (+ ``fields``), and
    optionally a JSON body of ``json_model``: FastAPI cannot infer it since handlers read the
    request themselves (to enforce upload limits while streaming). The JSON schema is inlined: a
    ``$ref`` would point at a component FastAPI never emits for a model no handler takes."""
    content: dict[str, Any] = {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}, **fields},
            }
        }
    }
    if json_model is not None:
        content["application/json"] = {"schema": json_model.model_json_schema()}
    return {"requestBody": {"content": content}}


# -- scalars -------------------------------------------------------------------------------------------
def check_k(k: Any, max_k: int) -> int:
    try:
        k = int(k)
    except (TypeError, ValueError):
        raise ApiError(400, "bad_k", f"k must be an integer, got {k!r}") from None
    if not 1 <= k <= max_k:
        raise ApiError(400, "bad_k", f"k must be in 1..{max_k}, got {k}")
    return k


def check_text(t: Any, max_chars: int, what: str = "text") -> str:
    if not isinstance(t, str) or not t.strip():
        raise ApiError(400, "empty_text", f"{what} must be a non-empty string")
    if len(t) > max_chars:
        raise ApiError(400, "text_too_long", f"{what} is {len(t)} chars > limit {max_chars}")
    if not is_utf8(t):
        raise ApiError(400, "bad_text", f"{what} is not valid Unicode text (a lone surrogate)")
    return t.strip()


def is_utf8(t: str) -> bool:
    """False for a str JSON can carry but no tokenizer or response can encode (``"\\ud800"``)."""
    try:
        t.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_url(url: str, cfg: ServeConfig) -> str:
    if not cfg.allow_image_urls:
        raise ApiError(403, "urls_disabled", "image URLs are disabled on this server (--allow-image-urls)")
    if not url.startswith(("http://", "https://")):
        raise ApiError(400, "bad_url", "image URL must be http(s)")
    return url


def need_index(service: ClipService) -> None:
    if service.index is None:
        raise ApiError(404, "no_index", "this server was started without --index")


# -- bodies --------------------------------------------------------------------------------------------
async def read_form(request: Request) -> Any:
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise ApiError(415, "unsupported_media_type", "send multipart/form-data")
    try:
        return await request.form(max_files=1, max_fields=16)
    except Exception as e:
        if (big := too_large_in(e)) is not None:
            raise big from None
        raise ApiError(400, "bad_form", f"could not parse form: {type(e).__name__}: {e}") from None


async def read_json(request: Request) -> Any:
    try:
        return await request.json()
    except Exception as e:
        if (big := too_large_in(e)) is not None:
            raise big from None
        raise ApiError(400, "bad_json", "request body is not valid JSON") from None


def is_json(request: Request) -> bool:
    return request.headers.get("content-type", "").startswith("application/json")


# -- images --------------------------------------------------------------------------------------------
async def load_url(service: ClipService, url: str) -> Any:
    """Pixels of the image at ``url``; a failed fetch is one 400 whose text does not tell a refused,
    closed, filtered or slow target apart (no port scanning through the server)."""
    check_url(url, service.cfg)
    try:
        return await service.load_image(url=url)
    except FetchError as e:
        raise ApiError(400, "fetch_failed", f"could not fetch image URL: {e.public}") from None
    except SkipSample:
        raise  # fetched, but not a usable image: bad_image / image_too_large
    except Exception:
        raise ApiError(400, "fetch_failed", f"could not fetch image URL: {PUBLIC_FETCH_ERROR}") from None


async def image_from_form(service: ClipService, form: Any) -> Any:
    """Pixels from a multipart ``file`` upload or a ``url`` field."""
    f = form.get("file")
    if f is not None and not isinstance(f, str):
        data = await f.read()
        if not data:
            raise ApiError(400, "empty_file", "uploaded file is empty")
        return await service.load_image(data=data)
    url = form.get("url")
    if isinstance(url, str) and url.strip():
        return await load_url(service, url.strip())
    raise ApiError(400, "missing_image", "send an image as multipart field 'file' (or 'url')")


async def image_from_json(service: ClipService, request: Request) -> Any:
    body = await read_json(request)
    url = body.get("url") if isinstance(body, dict) else None
    if not isinstance(url, str) or not url.strip():
        raise ApiError(400, "missing_image", "JSON body needs 'url'")
    return await load_url(service, url.strip())


# -- /embed/text ---------------------------------------------------------------------------------------
def text_list(req: EmbedTextRequest, cfg: ServeConfig) -> list[str]:
    texts = req.texts if req.texts is not None else ([req.text] if req.text is not None else None)
    if not texts:
        raise ApiError(400, "empty_text", "give 'texts' (a non-empty list) or 'text'")
    if len(texts) > cfg.max_texts:
        raise ApiError(400, "too_many_texts", f"{len(texts)} texts > limit {cfg.max_texts}")
    return [check_text(t, cfg.max_text_chars, f"texts[{i}]") for i, t in enumerate(texts)]


# -- /classify -----------------------------------------------------------------------------------------
@dataclass
class ClassifyArgs:
    labels: list[str]
    source: str
    templates: tuple[str, ...]
    top_k: int


def _labels(form: Any, service: ClipService) -> tuple[list[str], str]:
    labels_text, set_name = form.get("labels"), form.get("label_set")
    if isinstance(labels_text, str) and labels_text.strip():
        try:
            return parse_label_list(labels_text), "custom"
        except ValueError as e:
            raise ApiError(400, "bad_labels", str(e)) from None
    if isinstance(set_name, str) and set_name.strip():
        try:
            return service.label_set(set_name.strip()), set_name.strip()
        except KeyError:
            known = ", ".join(sorted(service.label_sets))
            raise ApiError(
                400, "unknown_label_set", f"unknown label set {set_name!r}; known: {known}"
            ) from None
    raise ApiError(400, "missing_labels", "give 'labels' (e.g. 'cat, dog') or 'label_set'")


def _check_labels(labels: list[str], cfg: ServeConfig) -> None:
    if len(labels) < 2:
        raise ApiError(400, "bad_labels", "need at least 2 distinct labels")
    if len(labels) > cfg.max_labels:
        raise ApiError(400, "too_many_labels", f"{len(labels)} labels > limit {cfg.max_labels}")
    for lab in labels:
        check_text(lab, cfg.max_text_chars, "label")


def _templates(form: Any, cfg: ServeConfig) -> tuple[str, ...]:
    raw = form.get("templates")
    try:
        return parse_templates(
            raw if isinstance(raw, str) else None, cfg.max_templates, cfg.max_template_chars
        )
    except ValueError as e:
        raise ApiError(400, "bad_templates", str(e)) from None


def _check_prompts(labels: list[str], templates: tuple[str, ...], cfg: ServeConfig) -> None:
    n = len(labels) * len(templates)
    if n > cfg.max_prompts:
        raise ApiError(
            400,
            "too_many_prompts",
            f"{len(labels)} labels x {len(templates)} templates = {n} prompts > limit {cfg.max_prompts}",
        )


def classify_args(form: Any, service: ClipService) -> ClassifyArgs:
    """Labels (custom or a named set), templates and top_k from a /classify form, all checked."""
    labels, source = _labels(form, service)
    _check_labels(labels, service.cfg)
    templates = _templates(form, service.cfg)
    _check_prompts(labels, templates, service.cfg)
    top_k = form.get("top_k")
    top_k = len(labels) if top_k in (None, "") else check_k(top_k, service.cfg.max_k)
    return ClassifyArgs(labels, source, templates, min(top_k, len(labels)))


# -- /search -------------------------------------------------------------------------------------------
@dataclass
class SearchQuery:
    kind: str
    text: str | None
    vector: np.ndarray | None
    k: int
    filters: dict[str, Any] | None


async def search_from_json(request: Request, service: ClipService) -> SearchQuery:
    cfg = service.cfg
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ApiError(400, "bad_json", "body must be a JSON object")
    try:
        req = SearchRequest.model_validate(body)
    except Exception as e:
        raise ApiError(422, "invalid_request", str(e)[:500]) from None
    k = check_k(req.k, cfg.max_k)
    if req.text is not None:
        return SearchQuery("text", check_text(req.text, cfg.max_text_chars), None, k, req.filters)
    if req.image_url:
        vec = await service.embed_image(await load_url(service, req.image_url))
        return SearchQuery("image", None, vec, k, req.filters)
    raise ApiError(400, "empty_query", "give 'text' or 'image_url' (or upload 'file')")


def _form_filters(raw: Any) -> Any:
    try:
        return json.loads(raw) if isinstance(raw, str) and raw.strip() else None
    except (json.JSONDecodeError, RecursionError):
        raise ApiError(400, "bad_filters", "filters must be a JSON object") from None


async def search_from_form(request: Request, service: ClipService) -> SearchQuery:
    cfg = service.cfg
    form = await read_form(request)
    k = check_k(form.get("k") or 10, cfg.max_k)
    filters = _form_filters(form.get("filters"))
    text = form.get("text") if isinstance(form.get("text"), str) else None
    if text is not None and form.get("file") is None:
        return SearchQuery("text", check_text(text, cfg.max_text_chars), None, k, filters)
    vec = await service.embed_image(await image_from_form(service, form))
    return SearchQuery("image", None, vec, k, filters)


INT64 = (-(1 << 63), (1 << 63) - 1)


def _bad_filter_value(v: Any, cfg: ServeConfig) -> str | None:
    """Why ``v`` cannot be a filter value (None when it can): what any column type could hold."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return None if INT64[0] <= v <= INT64[1] else "an integer outside the 64-bit range"
    if isinstance(v, float):
        return None if math.isfinite(v) else "a non-finite number"
    if isinstance(v, str):
        if not is_utf8(v):
            return "not valid Unicode text"
        return None if len(v) <= cfg.max_text_chars else f"a string over {cfg.max_text_chars} chars"
    return f"a {type(v).__name__} (use a string, number or boolean)"


def check_filters(filters: Any, cfg: ServeConfig) -> None:
    """``{column: scalar | [scalars]}`` with values any column could hold, else 400 bad_filters (the
    index checks the column names and types; values it could not even convert never reach it)."""
    if filters is None:
        return
    if not isinstance(filters, dict):
        raise ApiError(400, "bad_filters", "filters must be a JSON object of column -> value(s)")
    for col, want in filters.items():
        values = want if isinstance(want, list) else [want]
        if not values or len(values) > cfg.max_filter_values:
            raise ApiError(400, "bad_filters", f"filter {col!r}: give 1..{cfg.max_filter_values} values")
        for v in values:
            if (why := _bad_filter_value(v, cfg)) is not None:
                raise ApiError(400, "bad_filters", f"filter {col!r}: value is {why}")


# -- /caption ------------------------------------------------------------------------------------------
CAPTION_FIELDS: dict[str, Any] = {
    "url": {"type": "string"},
    "strategy": {"type": "string", "enum": ["greedy", "beam", "sample"], "description": "default beam"},
    "beam_width": {"type": "integer", "description": "beam: hypotheses kept (1..max_caption_beams)"},
    "length_penalty": {"type": "number", "description": "beam: score = logp / length**this (0..5)"},
    "max_length": {"type": "integer", "description": "tokens generated at most, EOS included"},
    "min_length": {"type": "integer", "description": "words before the caption may end"},
    "temperature": {"type": "number", "description": "sample: (0, 100]"},
    "top_k": {"type": "integer", "description": "sample: among the k most likely words (0: all)"},
    "top_p": {"type": "number", "description": "sample: nucleus mass (0, 1]"},
    "repetition_penalty": {"type": "number", "description": "penalty on words already said (0, 10]"},
    "no_repeat_ngram": {"type": "integer", "description": "forbid repeating any n-gram (0: off)"},
    "seed": {"type": "integer", "description": "sample: seed (same seed, image and settings: same captions)"},
    "num_captions": {"type": "integer", "description": "captions to return (> 1 needs strategy=sample)"},
}
CAPTION_OPTIONS = tuple(k for k in CAPTION_FIELDS if k != "url")
MAX_SEED = (1 << 32) - 1
INT_RE = re.compile(r"[+-]?[0-9]+")


class CaptionRequest(BaseModel):
    """JSON body of /caption (an image URL; needs --allow-image-urls) with the same options as the form."""

    url: str
    strategy: str | None = None
    beam_width: int | None = None
    length_penalty: float | None = None
    max_length: int | None = None
    min_length: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram: int | None = None
    seed: int | None = None
    num_captions: int | None = None


def need_captioner(service: ClipService) -> None:
    if service.captioner is None:
        raise ApiError(  # 404 like no_index: a client asking for what this server does not serve
            404,
            "captioning_off",
            "captioning is off: this server was started without --captioner DIR (see GET /health)",
        )


def _opt_int(fields: Any, name: str, lo: int, hi: int, default: int) -> int:
    v = fields.get(name)
    if v is None or (isinstance(v, str) and not v.strip()):
        return default
    bad = ApiError(400, "bad_option", f"{name} must be an integer in {lo}..{hi}, got {str(v)[:40]!r}")
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise bad
    if isinstance(v, float):
        if not v.is_integer():
            raise bad
        n = int(v)
    elif isinstance(v, str):
        if len(v) > 40 or not INT_RE.fullmatch(v.strip()):
            raise bad
        n = int(v.strip())
    else:
        n = v
    if not lo <= n <= hi:
        raise ApiError(
            400, "bad_option", f"{name} must be in {lo}..{hi}, got {n if abs(n) < 1e12 else str(n)[:20]}"
        )
    return n


def _opt_float(fields: Any, name: str, lo: float, hi: float, default: float, lo_open: bool = False) -> float:
    v = fields.get(name)
    if v is None or (isinstance(v, str) and not v.strip()):
        return default
    span = f"({lo:g}, {hi:g}]" if lo_open else f"[{lo:g}, {hi:g}]"
    try:
        if isinstance(v, bool) or (isinstance(v, str) and len(v) > 40):
            raise ValueError
        x = float(v)
    except (TypeError, ValueError, OverflowError):
        raise ApiError(400, "bad_option", f"{name} must be a number in {span}, got {str(v)[:40]!r}") from None
    if not math.isfinite(x) or x > hi or x < lo or (lo_open and x == lo):
        raise ApiError(400, "bad_option", f"{name} must be a number in {span}, got {x:g}")
    return x


def _unknown_fields(names: Any, allowed: set[str]) -> None:
    import difflib

    for name in names:
        if name not in allowed:
            close = difflib.get_close_matches(str(name), sorted(allowed), n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            known = ", ".join(sorted(allowed))
            raise ApiError(400, "unknown_field", f"unknown field {str(name)[:60]!r}{hint}; known: {known}")


@dataclass
class CaptionArgs:
    opts: Any  # clipforge.caption.decoding.DecodeOptions
    num: int
    settings: dict[str, Any]


def caption_args(fields: Any, service: ClipService) -> CaptionArgs:
    """Decoding settings of a /caption request, each checked against the server's limits (400 if not)."""
    from clipforge.caption.decoding import METHODS, DecodeOptions

    cfg = service.cfg
    assert service.captioner is not None
    base = DecodeOptions()
    strategy = fields.get("strategy")
    strategy = base.method if strategy is None or strategy == "" else strategy
    if strategy not in METHODS:
        raise ApiError(
            400, "bad_option", f"strategy must be one of {', '.join(METHODS)}, got {str(strategy)[:40]!r}"
        )
    max_len_limit = min(cfg.max_caption_length, service.captioner.decoder.cfg.max_len - 1)
    max_len = _opt_int(fields, "max_length", 1, max_len_limit, min(base.max_len, max_len_limit))
    min_len = _opt_int(fields, "min_length", 0, max_len - 1, min(base.min_len, max_len - 1))
    beams = min(base.beam_width, cfg.max_caption_beams)
    opts = DecodeOptions(
        method=strategy,
        max_len=max_len,
        min_len=min_len,
        repetition_penalty=_opt_float(fields, "repetition_penalty", 0.0, 10.0, base.repetition_penalty, True),
        no_repeat_ngram=_opt_int(fields, "no_repeat_ngram", 0, max_len_limit, base.no_repeat_ngram),
        beam_width=_opt_int(fields, "beam_width", 1, cfg.max_caption_beams, beams),
        length_penalty=_opt_float(fields, "length_penalty", 0.0, 5.0, base.length_penalty),
        temperature=_opt_float(fields, "temperature", 0.0, 100.0, base.temperature, True),
        top_k=_opt_int(fields, "top_k", 0, 1 << 20, base.top_k),
        top_p=_opt_float(fields, "top_p", 0.0, 1.0, base.top_p, True),
        seed=_opt_int(fields, "seed", 0, MAX_SEED, base.seed),
    )
    num = _opt_int(fields, "num_captions", 1, cfg.max_captions, 1)
    if num > 1 and strategy != "sample":
        raise ApiError(
            400, "bad_option", f"num_captions={num} needs strategy=sample ({strategy} gives one caption)"
        )
    return _caption_args(opts, num)


def _caption_args(opts: Any, num: int) -> CaptionArgs:
    """Settings that do not affect the strategy are reset (so equal requests batch together) and left
    out of the reported settings."""
    from dataclasses import replace

    settings: dict[str, Any] = {"strategy": opts.method}
    if opts.method == "beam":
        settings.update(beam_width=opts.beam_width, length_penalty=opts.length_penalty)
    else:
        opts = replace(opts, beam_width=1, length_penalty=1.0)
    if opts.method == "sample":
        settings.update(temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p, seed=opts.seed)
    else:
        opts = replace(opts, temperature=1.0, top_k=0, top_p=1.0, seed=0)
    settings.update(
        max_length=opts.max_len,
        min_length=opts.min_len,
        repetition_penalty=opts.repetition_penalty,
        no_repeat_ngram=opts.no_repeat_ngram,
        num_captions=num,
        describe=opts.describe(),
    )
    return CaptionArgs(opts, num, settings)


async def caption_request(request: Request, service: ClipService) -> tuple[Any, CaptionArgs]:
    """(pixels, settings) of a /caption request: multipart (file or url + options) or JSON (url + options).
    Options are checked before the image is decoded or fetched."""
    if is_json(request):
        body = await read_json(request)
        if not isinstance(body, dict):
            raise ApiError(400, "bad_json", "body must be a JSON object")
        _unknown_fields(body, set(CAPTION_FIELDS))
        args = caption_args(body, service)
        url = body.get("url")
        if not isinstance(url, str) or not url.strip():
            raise ApiError(400, "missing_image", "JSON body needs 'url' (or send multipart field 'file')")
        return await load_url(service, url.strip()), args
    form = await read_form(request)
    _unknown_fields(form.keys(), {"file", "_", *CAPTION_FIELDS})  # "_": an empty part that forces multipart
    for name in CAPTION_OPTIONS:
        if name in form and not isinstance(form[name], str):
            raise ApiError(400, "bad_option", f"{name} must be a form value, not a file")
    args = caption_args(form, service)
    return await image_from_form(service, form), args
