"""Serve a model (and optionally an index, a captioner) over HTTP: search, zero-shot classification,
embeddings and captions (``POST /caption`` with ``--captioner DIR``).

``Client`` needs only httpx; ``create_app`` / ``ClipService`` need the ``serve`` extra (fastapi, uvicorn).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Client", "ClientError", "ClipService", "ServeConfig", "ServerThread", "create_app"]


def __getattr__(name: str) -> Any:  # heavy imports only when asked for (keeps `clipforge --help` fast)
    if name in ("Client", "ClientError"):
        from clipforge.serve import client

        return getattr(client, name)
    if name == "create_app":
        from clipforge.serve.app import create_app

        return create_app
    if name == "ClipService":
        from clipforge.serve.service import ClipService

        return ClipService
    if name == "ServeConfig":
        from clipforge.serve.config import ServeConfig

        return ServeConfig
    if name == "ServerThread":
        from clipforge.serve.server import ServerThread

        return ServerThread
    raise AttributeError(name)
