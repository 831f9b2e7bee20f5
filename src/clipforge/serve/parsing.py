"""Request parsing and validation: malformed input becomes an :class:`ApiError` (4xx) here, before any
model work. Handlers read bodies themselves (not through FastAPI's models) where uploads are involved,
so the limits hold while streaming; these functions turn what they read into checked values.
"""

from __future__ import annotations

import json
import math
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
