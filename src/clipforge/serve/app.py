"""The HTTP layer: FastAPI routes, limits, JSON errors, API key, CORS, the web page.

Every error a client can cause is a 4xx with ``{"error": CODE, "detail": MESSAGE}``; the server never
answers 500 for bad input and never dies from it. Endpoints (OpenAPI docs at ``/docs``)::

    GET  /                 web page: text search grid + zero-shot classification bars
    GET  /health           model, index, batching stats (no API key needed)
    GET  /label_sets       named label sets -> number of labels
    POST /embed/text       {"texts": [...]} or {"text": "..."}
    POST /embed/image      multipart file=@img, or form/JSON url= (when --allow-image-urls)
    POST /classify         multipart file=@img (or url=) + labels="cat,dog" | label_set=cifar10 [+ templates, top_k]
    POST /search           {"text": ..., "k": 10, "filters": {...}} | {"image_url": ...} | multipart file=@img
    GET  /images/{key}     JPEG thumbnail of an indexed image
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from clipforge.data.decode import SkipSample
from clipforge.index.store import FilterError
from clipforge.serve.batcher import OverloadedError
from clipforge.serve.labels import parse_label_list, parse_templates
from clipforge.serve.service import ClipService

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
KEY_RE = re.compile(r"^[A-Za-z0-9_~\-][A-Za-z0-9_.~\-]{0,199}(/[A-Za-z0-9_~\-][A-Za-z0-9_.~\-]{0,199}){0,7}$")
OPEN_PATHS = {"/", "/health", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect", "/favicon.ico"}


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


class PayloadTooLarge(Exception):
    pass


def upload_body(fields: dict[str, Any], json_schema: str | None = None) -> dict[str, Any]:
    """OpenAPI request body for an endpoint taking a multipart image upload (+ ``fields``), and
    optionally a JSON body of the named schema: FastAPI cannot infer it since handlers read the
    request themselves (to enforce upload limits while streaming)."""
    content: dict[str, Any] = {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}, **fields},
            }
        }
    }
    if json_schema:
        content["application/json"] = {"schema": {"$ref": f"#/components/schemas/{json_schema}"}}
    return {"requestBody": {"content": content}}


def _too_large_in(e: BaseException) -> PayloadTooLarge | None:
    """The PayloadTooLarge inside ``e`` (starlette may wrap it in an ExceptionGroup), if any."""
    if isinstance(e, PayloadTooLarge):
        return e
    for sub in getattr(e, "exceptions", ()):
        found = _too_large_in(sub)
        if found is not None:
            return found
    return _too_large_in(e.__cause__) if e.__cause__ is not None else None


def _err(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: refuse bodies over ``limit`` bytes by Content-Length, and cut streams that lie."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    resp = _err(413, "payload_too_large", f"request body over {self.limit} bytes")
                    return await resp(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise PayloadTooLarge(f"request body over {self.limit} bytes")
            return msg

        await self.app(scope, limited, send)


class ApiKeyGuard:
    """ASGI middleware: header X-API-Key or Authorization: Bearer (``?api_key=`` for <img> tags).

    Pure ASGI rather than ``@app.middleware``: that wrapper costs ~0.3 ms per request at high QPS.
    """

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = {k: v for k, v in scope.get("headers", [])}
        given = headers.get(b"x-api-key", b"")
        auth = headers.get(b"authorization", b"")
        if not given and auth.lower().startswith(b"bearer "):
            given = auth[7:].strip()
        if not given and scope.get("query_string"):
            from urllib.parse import parse_qs

            given = parse_qs(scope["query_string"].decode("latin-1")).get("api_key", [""])[0].encode()
        if not hmac.compare_digest(given, self.key):
            resp = _err(401, "unauthorized", "missing or wrong API key (X-API-Key header)")
            return await resp(scope, receive, send)
        await self.app(scope, receive, send)


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


def create_app(service: ClipService) -> FastAPI:
    """Build the FastAPI app around a :class:`ClipService` (tests call this directly)."""
    cfg = service.cfg

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await service.close()

    app = FastAPI(
        title="clipforge",
        description="Search, zero-shot classification and embeddings from a CLIP-family model.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.service = service

    # -- errors -----------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return _err(e.status, e.code, e.detail)

    @app.exception_handler(PayloadTooLarge)
    async def _too_large(_: Request, e: PayloadTooLarge) -> JSONResponse:
        return _err(413, "payload_too_large", str(e))

    @app.exception_handler(SkipSample)
    async def _bad_image(_: Request, e: SkipSample) -> JSONResponse:
        return _err(400, "bad_image" if e.reason != "image_too_large" else "image_too_large", str(e))

    @app.exception_handler(FilterError)
    async def _bad_filter(_: Request, e: FilterError) -> JSONResponse:
        return _err(400, "bad_filters", str(e))

    @app.exception_handler(OverloadedError)
    async def _overloaded(_: Request, e: OverloadedError) -> JSONResponse:
        return _err(503, "overloaded", str(e), {"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        msgs = [f"{'.'.join(str(p) for p in err.get('loc', []))}: {err.get('msg')}" for err in e.errors()]
        return _err(422, "invalid_request", "; ".join(msgs)[:1000])

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}.get(
            e.status_code, "http_error"
        )
        return _err(e.status_code, code, str(e.detail))

    @app.exception_handler(Exception)
    async def _crash(_: Request, e: Exception) -> JSONResponse:
        log.exception("internal error")
        return _err(500, "internal_error", f"{type(e).__name__}")

    if cfg.api_key:
        app.add_middleware(ApiKeyGuard, key=cfg.api_key)
    if cfg.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=cfg.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "X-API-Key", "Authorization"],
        )
    app.add_middleware(BodyLimit, limit=cfg.max_upload_bytes)

    # -- helpers ------------------------------------------------------------------------------------
    def need_index() -> None:
        if service.index is None:
            raise ApiError(404, "no_index", "this server was started without --index")

    def check_k(k: Any) -> int:
        try:
            k = int(k)
        except (TypeError, ValueError):
            raise ApiError(400, "bad_k", f"k must be an integer, got {k!r}") from None
        if not 1 <= k <= cfg.max_k:
            raise ApiError(400, "bad_k", f"k must be in 1..{cfg.max_k}, got {k}")
        return k

    def check_text(t: Any, what: str = "text") -> str:
        if not isinstance(t, str) or not t.strip():
            raise ApiError(400, "empty_text", f"{what} must be a non-empty string")
        if len(t) > cfg.max_text_chars:
            raise ApiError(400, "text_too_long", f"{what} is {len(t)} chars > limit {cfg.max_text_chars}")
        return t.strip()

    def check_url(url: str) -> str:
        if not cfg.allow_image_urls:
            raise ApiError(
                403, "urls_disabled", "image URLs are disabled on this server (--allow-image-urls)"
            )
        if not url.startswith(("http://", "https://")):
            raise ApiError(400, "bad_url", "image URL must be http(s)")
        return url

    async def image_from_form(form: Any) -> Any:
        """Pixels from a multipart ``file`` upload or a ``url`` field."""
        f = form.get("file")
        if f is not None and not isinstance(f, str):
            data = await f.read()
            if not data:
                raise ApiError(400, "empty_file", "uploaded file is empty")
            return await service.load_image(data=data)
        url = form.get("url")
        if isinstance(url, str) and url.strip():
            return await _load_url(url.strip())
        raise ApiError(400, "missing_image", "send an image as multipart field 'file' (or 'url')")

    async def _load_url(url: str) -> Any:
        check_url(url)
        try:
            return await service.load_image(url=url)
        except SkipSample:
            raise
        except Exception as e:
            raise ApiError(
                400, "fetch_failed", f"could not fetch image URL: {type(e).__name__}: {e}"
            ) from None

    async def read_form(request: Request) -> Any:
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            raise ApiError(415, "unsupported_media_type", "send multipart/form-data")
        try:
            return await request.form(max_files=1, max_fields=16)
        except Exception as e:
            if (big := _too_large_in(e)) is not None:
                raise big from None
            raise ApiError(400, "bad_form", f"could not parse form: {type(e).__name__}: {e}") from None

    async def read_json(request: Request) -> Any:
        try:
            return await request.json()
        except Exception as e:
            if (big := _too_large_in(e)) is not None:
                raise big from None
            raise ApiError(400, "bad_json", "request body is not valid JSON") from None

    # -- routes ---------------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": service.model.config.spec,
            "embed_dim": service.model.config.embed_dim,
            "index": service.index.describe() if service.index is not None else None,
            "model_matches_index": service.model_matches_index,
            "precision": {"text": service.precision, "image": service.image_precision},
            "batching": {"enabled": cfg.batching, "max_batch": cfg.max_batch, "max_wait_ms": cfg.max_wait_ms},
            "stats": service.stats(),
            "api_key_required": bool(cfg.api_key),
            "uptime_s": round(time.time() - service.started, 1),
        }

    @app.get("/label_sets")
    async def label_sets() -> dict[str, Any]:
        out = {}
        for name in sorted(service.label_sets):
            try:
                out[name] = len(service.label_set(name))
            except (OSError, ValueError):
                continue
        return {"label_sets": out}

    @app.post("/embed/text")
    async def embed_text(req: EmbedTextRequest) -> dict[str, Any]:
        texts = req.texts if req.texts is not None else ([req.text] if req.text is not None else None)
        if not texts:
            raise ApiError(400, "empty_text", "give 'texts' (a non-empty list) or 'text'")
        if len(texts) > cfg.max_texts:
            raise ApiError(400, "too_many_texts", f"{len(texts)} texts > limit {cfg.max_texts}")
        texts = [check_text(t, f"texts[{i}]") for i, t in enumerate(texts)]
        emb = await service.embed_texts(texts)
        return {"embeddings": emb.tolist(), "dim": int(emb.shape[1]), "model": service.model.config.spec}

    @app.post(
        "/embed/image", openapi_extra=upload_body({"url": {"type": "string"}}, json_schema="UrlRequest")
    )
    async def embed_image(request: Request) -> dict[str, Any]:
        if request.headers.get("content-type", "").startswith("application/json"):
            body = await read_json(request)
            url = body.get("url") if isinstance(body, dict) else None
            if not isinstance(url, str) or not url.strip():
                raise ApiError(400, "missing_image", "JSON body needs 'url'")
            pixels = await _load_url(url.strip())
        else:
            pixels = await image_from_form(await read_form(request))
        emb = await service.embed_image(pixels)
        return {"embedding": emb.tolist(), "dim": int(emb.shape[0]), "model": service.model.config.spec}

    @app.post(
        "/classify",
        openapi_extra=upload_body(
            {
                "url": {"type": "string"},
                "labels": {"type": "string", "description": "comma/newline separated or JSON list"},
                "label_set": {"type": "string"},
                "templates": {"type": "string"},
                "top_k": {"type": "integer"},
            }
        ),
    )
    async def classify(request: Request) -> dict[str, Any]:
        form = await read_form(request)
        labels_text, set_name = form.get("labels"), form.get("label_set")
        if isinstance(labels_text, str) and labels_text.strip():
            try:
                labels = parse_label_list(labels_text)
            except ValueError as e:
                raise ApiError(400, "bad_labels", str(e)) from None
            source = "custom"
        elif isinstance(set_name, str) and set_name.strip():
            try:
                labels = service.label_set(set_name.strip())
            except KeyError:
                known = ", ".join(sorted(service.label_sets))
                raise ApiError(
                    400, "unknown_label_set", f"unknown label set {set_name!r}; known: {known}"
                ) from None
            source = set_name.strip()
        else:
            raise ApiError(400, "missing_labels", "give 'labels' (e.g. 'cat, dog') or 'label_set'")
        if len(labels) < 2:
            raise ApiError(400, "bad_labels", "need at least 2 distinct labels")
        if len(labels) > cfg.max_labels:
            raise ApiError(400, "too_many_labels", f"{len(labels)} labels > limit {cfg.max_labels}")
        for lab in labels:
            check_text(lab, "label")
        try:
            templates = parse_templates(
                form.get("templates") if isinstance(form.get("templates"), str) else None
            )
        except (ValueError, json.JSONDecodeError) as e:
            raise ApiError(400, "bad_templates", str(e)) from None
        if len(templates) > cfg.max_templates:
            raise ApiError(400, "bad_templates", f"{len(templates)} templates > limit {cfg.max_templates}")
        top_k = form.get("top_k")
        top_k = len(labels) if top_k in (None, "") else check_k(top_k)
        pixels = await image_from_form(form)
        t = time.perf_counter()
        preds = await service.classify(pixels, labels, templates, min(top_k, len(labels)))
        return {
            "predictions": preds,
            "label_source": source,
            "num_labels": len(labels),
            "multi_label": service.logit_bias is not None,
            "took_ms": round((time.perf_counter() - t) * 1000, 2),
        }

    @app.post(
        "/search",
        openapi_extra=upload_body(
            {"k": {"type": "integer"}, "filters": {"type": "string", "description": "JSON object"}},
            json_schema="SearchRequest",
        ),
    )
    async def search(request: Request) -> dict[str, Any]:
        need_index()
        t = time.perf_counter()
        if request.headers.get("content-type", "").startswith("application/json"):
            body = await read_json(request)
            if not isinstance(body, dict):
                raise ApiError(400, "bad_json", "body must be a JSON object")
            try:
                req = SearchRequest.model_validate(body)
            except Exception as e:
                raise ApiError(422, "invalid_request", str(e)[:500]) from None
            k, filters = check_k(req.k), req.filters
            if req.text is not None:
                query_kind, text, vec = "text", check_text(req.text), None
            elif req.image_url:
                query_kind, text = "image", None
                vec = await service.embed_image(await _load_url(req.image_url))
            else:
                raise ApiError(400, "empty_query", "give 'text' or 'image_url' (or upload 'file')")
        else:
            form = await read_form(request)
            k = check_k(form.get("k") or 10)
            raw = form.get("filters")
            try:
                filters = json.loads(raw) if isinstance(raw, str) and raw.strip() else None
            except json.JSONDecodeError:
                raise ApiError(400, "bad_filters", "filters must be a JSON object") from None
            text = form.get("text") if isinstance(form.get("text"), str) else None
            if text is not None and form.get("file") is None:
                query_kind, text, vec = "text", check_text(text), None
            else:
                query_kind, text = "image", None
                vec = await service.embed_image(await image_from_form(form))
        if filters is not None and not isinstance(filters, dict):
            raise ApiError(400, "bad_filters", "filters must be a JSON object of column -> value(s)")
        hits = await service.search(text=text, vector=vec, k=k, filters=filters)
        if isinstance(hits, Exception):
            raise hits
        return {
            "query": {"kind": query_kind, "text": text, "k": k, "filters": filters},
            "results": service.results(hits),
            "took_ms": round((time.perf_counter() - t) * 1000, 2),
        }

    @app.get("/images/{key:path}", responses={200: {"content": {"image/jpeg": {}}}})
    async def image(key: str) -> Response:
        if not KEY_RE.match(key) or any(part in (".", "..") for part in key.split("/")):
            raise ApiError(400, "bad_key", "invalid image key")
        need_index()
        assert service.index is not None
        data = service.index.thumbnail(key)
        if data is None:
            raise ApiError(404, "not_found", f"no image with key {key!r} in the index")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=86400"})

    return app
