"""What stands between the network and the handlers: the API key, a body size limit and strict JSON.

`api_key_check` compares the key as SHA-256 digests with compare_digest: the time taken says nothing
about it, not even its length. `BodySizeLimit` answers 413 when the declared Content-Length is over the
limit, before reading anything, and stops a body without one (chunked) as soon as the bytes read so far
pass it. `StrictJSONRoute` parses bodies as RFC 8259 JSON: UTF-8 only, no NaN or Infinity, no lone UTF-16
surrogates (they could not be encoded back), and nesting too deep for the parser is a 400, not a 500.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Callable
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .protocol import error_body

TOO_LARGE = "RequestTooLargeError"


class BodySizeLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 in OpenAI's error shape."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    def message(self) -> str:
        return f"the request body is larger than this server's limit of {self.limit} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            response = JSONResponse(error_body(413, self.message(), TOO_LARGE), 413, headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:  # FastAPI passes an HTTPException from the body read through
                    raise HTTPException(413, self.message())
            return message

        await self.app(scope, receive_within_limit, send)


def api_key_check(api_key: str | None, unauthorized: Callable[[], Exception]) -> Callable:
    """A FastAPI dependency that raises `unauthorized()` unless the request carries `Bearer api_key`."""
    expected = hashlib.sha256(f"Bearer {api_key}".encode()).digest()

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = hashlib.sha256(request.headers.get("authorization", "").encode()).digest()
        if not hmac.compare_digest(given, expected):
            raise unauthorized()

    return check_key


def _not_json(name: str) -> Any:
    raise HTTPException(400, f"{name} is not valid JSON; send finite numbers only")


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def strict_json(body: bytes) -> Any:
    """Parse a request body as RFC 8259 JSON, or raise a 400 HTTPException that says what is wrong."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise HTTPException(400, f"the body is not valid UTF-8 (byte {error.start})") from error
    try:
        value = json.loads(text, parse_constant=_not_json)  # a syntax error stays a JSONDecodeError (400)
        if _SURROGATE_ESCAPE.search(text):  # only then can a lone surrogate be in there
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except RecursionError as error:
        raise HTTPException(400, "the JSON body is nested too deeply") from error
    except UnicodeEncodeError as error:
        raise HTTPException(400, "the JSON body has a lone UTF-16 surrogate (\\ud800-\\udfff)") from error
    return value


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = strict_json(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """A route whose JSON body is parsed by `strict_json`."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler
