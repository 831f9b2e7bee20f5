"""The endpoints, at module level on one ``APIRouter``; each gets the :class:`ClipService` through a
dependency instead of a closure. Endpoints (OpenAPI docs at ``/docs``)::

    GET  /                 web page: text search grid + zero-shot classification bars
    GET  /health           model, index, batching stats (no API key needed)
    GET  /label_sets       named label sets -> number of labels
    POST /embed/text       {"texts": [...]} or {"text": "..."}
    POST /embed/image      multipart file=@img, or form/JSON url= (when --allow-image-urls)
    POST /classify         multipart file=@img (or url=) + labels="cat,dog" | label_set=cifar10 [+ templates, top_k]
    POST /search           {"text": ..., "k": 10, "filters": {...}} | {"image_url": ...} | multipart file=@img
    POST /caption          multipart file=@img (or url=; JSON {"url": ...}) [+ strategy, beam_width, ...]
    GET  /images/{key}     JPEG thumbnail of an indexed image
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response

from clipforge.serve import parsing as P
from clipforge.serve.errors import ApiError
from clipforge.serve.health import health_payload
from clipforge.serve.middleware import KEY_OK
from clipforge.serve.service import ClipService

STATIC = Path(__file__).resolve().parent / "static"
KEY_RE = re.compile(r"^[A-Za-z0-9_~\-][A-Za-z0-9_.~\-]{0,199}(/[A-Za-z0-9_~\-][A-Za-z0-9_.~\-]{0,199}){0,7}$")

CLASSIFY_FIELDS = {
    "url": {"type": "string"},
    "labels": {"type": "string", "description": "comma/newline separated or JSON list"},
    "label_set": {"type": "string"},
    "templates": {"type": "string"},
    "top_k": {"type": "integer"},
}
SEARCH_FIELDS = {"k": {"type": "integer"}, "filters": {"type": "string", "description": "JSON object"}}

router = APIRouter()


def get_service(request: Request) -> ClipService:
    """The app's one service (set by create_app); a dependency so handlers need no closure."""
    return request.app.state.service


Service = Annotated[ClipService, Depends(get_service)]


def _ms_since(t: float) -> float:
    return round((time.perf_counter() - t) * 1000, 2)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))


@router.get("/health")
async def health(request: Request, service: Service) -> dict[str, Any]:
    return health_payload(service, full=request.scope.get(KEY_OK, False))


@router.get("/label_sets")
async def label_sets(service: Service) -> dict[str, Any]:
    out = {}
    for name in sorted(service.label_sets):
        try:
            out[name] = len(service.label_set(name))
        except (OSError, ValueError):
            continue
    return {"label_sets": out}


@router.post("/embed/text")
async def embed_text(req: P.EmbedTextRequest, service: Service) -> dict[str, Any]:
    emb = await service.embed_texts(P.text_list(req, service.cfg))
    return {"embeddings": emb.tolist(), "dim": int(emb.shape[1]), "model": service.model.config.spec}


@router.post(
    "/embed/image", openapi_extra=P.upload_body({"url": {"type": "string"}}, json_model=P.UrlRequest)
)
async def embed_image(request: Request, service: Service) -> dict[str, Any]:
    if P.is_json(request):
        pixels = await P.image_from_json(service, request)
    else:
        pixels = await P.image_from_form(service, await P.read_form(request))
    emb = await service.embed_image(pixels)
    return {"embedding": emb.tolist(), "dim": int(emb.shape[0]), "model": service.model.config.spec}


@router.post("/classify", openapi_extra=P.upload_body(CLASSIFY_FIELDS))
async def classify(request: Request, service: Service) -> dict[str, Any]:
    form = await P.read_form(request)
    args = P.classify_args(form, service)
    pixels = await P.image_from_form(service, form)
    t = time.perf_counter()
    preds = await service.classify(pixels, args.labels, args.templates, args.top_k)
    return {
        "predictions": preds,
        "label_source": args.source,
        "num_labels": len(args.labels),
        "multi_label": service.logit_bias is not None,
        "took_ms": _ms_since(t),
    }


@router.post("/search", openapi_extra=P.upload_body(SEARCH_FIELDS, json_model=P.SearchRequest))
async def search(request: Request, service: Service) -> dict[str, Any]:
    P.need_index(service)
    t = time.perf_counter()
    q = await (P.search_from_json if P.is_json(request) else P.search_from_form)(request, service)
    P.check_filters(q.filters, service.cfg)
    hits = await service.search(text=q.text, vector=q.vector, k=q.k, filters=q.filters)
    if isinstance(hits, Exception):
        raise hits
    return {
        "query": {"kind": q.kind, "text": q.text, "k": q.k, "filters": q.filters},
        "results": service.results(hits),
        "took_ms": _ms_since(t),
    }


@router.post("/caption", openapi_extra=P.upload_body(P.CAPTION_FIELDS, json_model=P.CaptionRequest))
async def caption(request: Request, service: Service) -> dict[str, Any]:
    P.need_captioner(service)
    t = time.perf_counter()
    pixels, args = await P.caption_request(request, service)
    t_model = time.perf_counter()
    out = await service.caption(pixels, args.opts, args.num)
    return {
        "captions": [{"text": c, "score": s} for c, s in zip(out.texts, out.scores)],
        "caption": out.texts[0],
        "settings": args.settings,
        "took_ms": _ms_since(t),
        "caption_ms": _ms_since(t_model),
    }


@router.get("/images/{key:path}", responses={200: {"content": {"image/jpeg": {}}}})
async def image(key: str, service: Service) -> Response:
    if not KEY_RE.match(key) or any(part in (".", "..") for part in key.split("/")):
        raise ApiError(400, "bad_key", "invalid image key")
    P.need_index(service)
    assert service.index is not None
    data = service.index.thumbnail(key)
    if data is None:
        raise ApiError(404, "not_found", f"no image with key {key!r} in the index")
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=86400"})
