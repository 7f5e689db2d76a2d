"""Errors in OpenAI's shape, whatever raised them: handlers, request validation, routing, or a bug."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .guards import TOO_LARGE
from .protocol import error_body


class APIError(Exception):
    """An error for the client, rendered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.status, self.message, self.type, self.param), self.status,
                            headers=self.headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "BadRequestError", param)


def unavailable(message: str) -> APIError:
    return APIError(503, message, "ServiceUnavailableError")


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    first = error.errors()[0] if error.errors() else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    return (f"{param}: {first.get('msg', 'invalid request')}" if param else first.get("msg", "invalid request")), param


async def _api_error(_: Request, error: APIError) -> JSONResponse:
    return error.response()


async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
    return bad_request(*_validation_message(error)).response()


async def _http(_: Request, error: StarletteHTTPException) -> JSONResponse:
    kind = {400: "BadRequestError", 404: "NotFoundError", 405: "MethodNotAllowed",
            413: TOO_LARGE}.get(error.status_code, "HTTPError")
    return APIError(error.status_code, str(error.detail), kind).response()


async def _internal(_: Request, error: Exception) -> JSONResponse:
    return APIError(500, f"internal error: {type(error).__name__}", "InternalServerError").response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _internal)
