"""The OpenAI-compatible HTTP API over the engine: completions, chat, models, tokenize, health, metrics, and
vLLM's `POST /reset_prefix_cache`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from rheads.engine import LLMEngine

from .engine_client import EngineClient, EngineDeadError
from .errors import APIError, bad_request, install_error_handlers, unavailable
from .guards import BodySizeLimit, StrictJSONRoute, api_key_check
from .metrics import Metrics
from .protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ErrorResponse, TokenizeRequest
from .serving import OpenAIServingChat, OpenAIServingCompletion, check_model
from .tokenizer import ServerTokenizer


@dataclass
class ServerSettings:
    served_model_names: list[str]
    api_key: str | None = None
    max_waiting: int = 256  # waiting requests before new ones get 429 (and the most choices one request may have)
    retry_after_seconds: int = 1
    protect_health_and_metrics: bool = False  # True: /health and /metrics need the API key too
    max_request_bytes: int = 1 << 20  # a larger request body gets 413
    max_tokens_limit: int | None = None  # the largest max_tokens a request may ask for (None: max model len)
    allowed_origins: list[str] = field(default_factory=list)  # CORS origins; empty: no CORS at all
    engine_start_timeout: float = 600.0  # seconds the engine thread may take to get ready before start-up fails
    chat_template: str | None = None  # a Jinja chat template over the model's own (e.g. one that takes tools)


def show_server_logs() -> None:
    """Send the "rheads" loggers to uvicorn's handlers, at its level, when nothing else is set up to show them:
    uvicorn's log config names only its own loggers."""
    ours, uvicorn_log = logging.getLogger("rheads"), logging.getLogger("uvicorn")
    if not ours.handlers and not logging.getLogger().handlers and uvicorn_log.handlers:
        ours.handlers, ours.propagate = list(uvicorn_log.handlers), False
        ours.setLevel(logging.getLogger("uvicorn.error").getEffectiveLevel())


def _errors(*codes: int) -> dict:
    """OpenAPI entries for the statuses a route answers in OpenAI's error shape."""
    said = {400: "bad request (the field at fault in `param`)", 401: "invalid or missing API key",
            404: "unknown model", 413: "request body too large", 429: "server busy: retry after Retry-After",
            503: "the engine has stopped"}
    return {code: {"model": ErrorResponse, "description": said[code]} for code in codes}


API_ERRORS = _errors(400, 401, 404, 413, 429, 503)
EMPTY_OK = {200: {"description": "OK, with an empty body", "content": {}}}
GENERATED = {200: {"description": "the response; with `stream`, its chunks as server-sent events",
                   "content": {"application/json": {}, "text/event-stream": {}}}}


def _openapi_of(app: FastAPI) -> dict:
    """The app's OpenAPI schema without FastAPI's 422: a request that fails validation is a 400 here."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path in schema["paths"].values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(engine: LLMEngine, settings: ServerSettings) -> FastAPI:
    """The FastAPI app; the engine thread starts with the app (its lifespan) and stops with it."""
    names = settings.served_model_names
    metrics = Metrics(names[0])
    client = EngineClient(engine, metrics, settings.max_waiting)
    tokenizer = ServerTokenizer(engine.tokenizer, settings.chat_template)
    serving = {"client": client, "tokenizer": tokenizer, "served_model_names": names,
               "max_tokens_limit": settings.max_tokens_limit or engine.max_model_len,
               "max_choices": settings.max_waiting, "retry_after_seconds": settings.retry_after_seconds}
    completion, chat = OpenAIServingCompletion(**serving), OpenAIServingChat(**serving)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        show_server_logs()
        await tokenizer.start()
        try:
            await client.start(settings.engine_start_timeout)
            yield
        finally:
            client.shutdown()
            tokenizer.shutdown()

    app = FastAPI(title="rheads", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible server with a retrieval-head-aware KV cache.")
    app.router.route_class = StrictJSONRoute
    app.state.client, app.state.engine, app.state.metrics = client, engine, metrics
    app.add_middleware(BodySizeLimit, limit=settings.max_request_bytes)
    if settings.allowed_origins:  # added last, so it wraps everything: errors carry CORS headers too
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"])
    install_error_handlers(app)
    keyed = [Depends(api_key_check(settings.api_key, lambda: APIError(
        401, "invalid or missing API key (send Authorization: Bearer KEY)", "AuthenticationError")))]
    open_or_keyed = keyed if settings.protect_health_and_metrics else []

    @app.post("/v1/completions", dependencies=keyed, responses={**GENERATED, **API_ERRORS})
    async def completions(body: CompletionRequest, request: Request):
        return await completion.create(body, request)

    @app.post("/v1/chat/completions", dependencies=keyed, responses={**GENERATED, **API_ERRORS})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await chat.create(body, request)

    @app.get("/v1/models", dependencies=keyed, responses=_errors(401))
    async def models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "rheads", "root": engine.model_name,
             "max_model_len": engine.max_model_len} for name in names]}

    @app.post("/tokenize", dependencies=keyed, responses=_errors(400, 401, 404, 413))
    async def tokenize(body: TokenizeRequest):
        check_model(body.model, names)
        if body.messages is not None:
            ids = await chat.chat_prompt(body.messages, body.add_generation_prompt)
        else:
            ids = await tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @app.post("/detokenize", dependencies=keyed, responses=_errors(400, 401, 404, 413))
    async def detokenize(body: DetokenizeRequest):
        check_model(body.model, names)
        vocab = engine.model.config.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise bad_request(f"token ids must be in [0, {vocab})", "tokens")
        return {"prompt": await tokenizer.decode(body.tokens)}

    @app.post("/reset_prefix_cache", dependencies=keyed, response_class=Response,
              responses={**EMPTY_OK, **_errors(401, 503)})
    async def reset_prefix_cache():
        try:
            await client.reset_prefix_cache()
        except EngineDeadError as error:
            raise unavailable(str(error)) from error
        return Response(status_code=200)

    @app.get("/health", dependencies=open_or_keyed, response_class=Response,
             responses={**EMPTY_OK, **_errors(401, 503)})
    async def health():
        if client.death is not None:
            raise unavailable(client.death)
        return Response(status_code=200)

    @app.get("/metrics", dependencies=open_or_keyed, response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text exposition format",
                              "content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}, **_errors(401)})
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.openapi = lambda: _openapi_of(app)
    return app
