"""The HTTP app: a FastAPI around one :class:`ClipService`, with limits, JSON errors, API key and CORS.

The endpoints are in routes.py, request parsing in parsing.py, error mapping in errors.py and the ASGI
middlewares in middleware.py; this file only puts them together. OpenAPI docs are at ``/docs``.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

import clipforge
from clipforge.serve.errors import install_error_handlers
from clipforge.serve.middleware import ApiKeyGuard, BodyLimit
from clipforge.serve.routes import router
from clipforge.serve.service import ClipService


@asynccontextmanager
async def lifespan(app: FastAPI):
    yield
    await app.state.service.close()


def _add_middlewares(app: FastAPI, service: ClipService) -> None:
    cfg = service.cfg
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


def create_app(service: ClipService) -> FastAPI:
    """Build the FastAPI app around a :class:`ClipService` (tests call this directly)."""
    app = FastAPI(
        title="clipforge",
        description="Search, zero-shot classification and embeddings from a CLIP-family model.",
        version=clipforge.__version__,  # the one version string
        lifespan=lifespan,
    )
    app.state.service = service
    install_error_handlers(app)
    _add_middlewares(app, service)
    app.include_router(router)
    return app
