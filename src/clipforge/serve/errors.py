"""JSON errors: every error a client can cause is ``{"error": CODE, "detail": MESSAGE}`` with a 4xx status.

The handlers live here (not inside ``create_app``) so the mapping from exception to status is one table
a reader can check at a glance; the server never answers 500 for bad input and never dies from it.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from clipforge.data.decode import SkipSample
from clipforge.index.store import FilterError
from clipforge.serve.batcher import OverloadedError

log = logging.getLogger(__name__)

HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}


class ApiError(Exception):
    """A client error with its status and machine-readable code (raised by parsing and handlers)."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


class PayloadTooLarge(Exception):
    """The request body went over the limit (raised while streaming it, see middleware.BodyLimit)."""


def error_response(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def too_large_in(e: BaseException) -> PayloadTooLarge | None:
    """The PayloadTooLarge inside ``e`` (starlette may wrap it in an ExceptionGroup), if any."""
    if isinstance(e, PayloadTooLarge):
        return e
    for sub in getattr(e, "exceptions", ()):
        found = too_large_in(sub)
        if found is not None:
            return found
    return too_large_in(e.__cause__) if e.__cause__ is not None else None


async def api_error(_: Request, e: ApiError) -> JSONResponse:
    return error_response(e.status, e.code, e.detail)


async def too_large(_: Request, e: PayloadTooLarge) -> JSONResponse:
    return error_response(413, "payload_too_large", str(e))


async def bad_image(_: Request, e: SkipSample) -> JSONResponse:
    return error_response(400, "bad_image" if e.reason != "image_too_large" else "image_too_large", str(e))


async def bad_filter(_: Request, e: FilterError) -> JSONResponse:
    return error_response(400, "bad_filters", str(e))


async def overloaded(_: Request, e: OverloadedError) -> JSONResponse:
    return error_response(503, "overloaded", str(e), {"Retry-After": "1"})


async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
    msgs = [f"{'.'.join(str(p) for p in err.get('loc', []))}: {err.get('msg')}" for err in e.errors()]
    return error_response(422, "invalid_request", "; ".join(msgs)[:1000])


async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    return error_response(e.status_code, HTTP_CODES.get(e.status_code, "http_error"), str(e.detail))


async def crash(_: Request, e: Exception) -> JSONResponse:
    log.exception("internal error")
    return error_response(500, "internal_error", f"{type(e).__name__}")


HANDLERS = {
    ApiError: api_error,
    PayloadTooLarge: too_large,
    SkipSample: bad_image,
    FilterError: bad_filter,
    OverloadedError: overloaded,
    RequestValidationError: invalid,
    StarletteHTTPException: http_error,
    Exception: crash,
}


def install_error_handlers(app: FastAPI) -> None:
    for exc, handler in HANDLERS.items():
        app.add_exception_handler(exc, handler)
