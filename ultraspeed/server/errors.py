"""OpenAI-style errors: every failure the client sees is `{"error": {"message", "type", "param", "code"}}` with a
meaningful status, including FastAPI's own validation failures (422 there, 400 here as OpenAI does) and
unknown routes."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "overloaded_error", 504: "timeout_error"}


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal"}


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None, type_: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type = type_ or _TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _validation_error(exc: RequestValidationError, content_type: str = "application/json") -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, f"could not parse the JSON body: {first.get('ctx', {}).get('error', 'invalid JSON')}",
                        code="invalid_json")
    param = _param(first.get("loc", ()))
    if param is None:
        message = ("the request body is missing: send a JSON object" if kind == "missing"
                   else "the request body must be a JSON object")
        if "json" not in content_type:   # e.g. curl -d without -H: FastAPI does not parse the body at all
            message += f" sent with 'Content-Type: application/json' (got {content_type or 'none'!r})"
        return APIError(400, message, code="invalid_request_body")
    # A union field (e.g. content: str | list[part]) fails once per alternative: name the alternatives instead.
    alternatives = [str(e["loc"][-1]) for e in errors if _param(e["loc"]) == param and _is_tag(e["loc"][-1])]
    if len(alternatives) > 1:
        message = f"{param}: expected {' or '.join(dict.fromkeys(alternatives))}"
    else:
        more = f" (first of {len(errors)} problems)" if len(errors) > 1 else ""
        message = f"{param}: {first.get('msg', 'invalid value')}{more}"
    code = "missing_field" if kind == "missing" else "invalid_type" if "type" in kind else "invalid_value"
    return APIError(400, message, param=param, code=code)


def _param(loc) -> str | None:
    """Dotted field path of a pydantic error location, without "body" and union alternative tags."""
    return ".".join(str(p) for p in loc if p != "body" and not _is_tag(p)) or None


def _is_tag(part) -> bool:
    return str(part) in _TYPE_TAGS or "[" in str(part) or "-" in str(part)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc, request.headers.get("content-type", "")).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code in (404, 405):
            message = f"{message}: {request.method} {request.url.path}"
        return APIError(exc.status_code, message, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return APIError(500, f"internal error: {type(exc).__name__}", code="internal_error").response()
