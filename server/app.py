"""The OpenAI-compatible HTTP API over the engine: completions, chat, models, tokenize, health, metrics."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import jinja2
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from rheads.engine import LLMEngine, RequestOutput, SamplingParams
from rheads.engine.llm import RequestError

from .engine_client import EngineClient, QueueFullError
from .guards import TOO_LARGE, BodySizeLimit, StrictJSONRoute
from .metrics import Metrics
from .protocol import (
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, SamplingFields, TokenizeRequest, Usage,
    completion_logprobs, error_body, new_id, now,
)


T = TypeVar("T")


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


class APIError(Exception):
    """An error for the client, rendered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error.status, error.message, error.type, error.param), error.status,
                        headers=error.headers)


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    first = error.errors()[0] if error.errors() else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    return (f"{param}: {first.get('msg', 'invalid request')}" if param else first.get("msg", "invalid request")), param


@dataclass
class Choice:
    """One choice's output gathered for a non-streaming response."""

    text: str
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    tokens: int = 0


def include_usage(body: SamplingFields) -> bool:
    return bool(body.stream and body.stream_options and body.stream_options.include_usage)


class Generation:
    """One API request's engine work, prompts x n choices, merged into one stream as outputs come."""

    def __init__(self, client: EngineClient, metrics: Metrics, prompts: list[list[int]],
                 params: SamplingParams, n: int, request_id: str):
        self.client, self.metrics = client, metrics
        self.choices = [(i * n + j, ids) for i, ids in enumerate(prompts) for j in range(n)]
        self.streams = []
        try:  # submit every choice before answering, so a refusal is a clean 4xx with nothing left running
            for index, ids in self.choices:
                seed = None if params.seed is None else params.seed + index
                self.streams.append(client.submit(f"{request_id}-{index}", ids,
                                                  SamplingParams(**{**params.__dict__, "seed": seed})))
        except (RequestError, QueueFullError):
            self.close()
            raise
        metrics.prompt_tokens.inc(sum(len(ids) for _, ids in self.choices))

    def close(self) -> None:
        """Abort every choice still unfinished (a no-op for finished ones), whether or not iteration began."""
        for stream in self.streams:
            self.client.abort(stream.request_id)

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._pump(index, stream, queue))
                 for (index, _), stream in zip(self.choices, self.streams)]
        try:
            for _ in range(len(tasks)):
                while (item := await queue.get()) is not None:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.close()  # a pump cancelled before it started never aborted its request

    async def _pump(self, index: int, stream, queue: asyncio.Queue) -> None:
        arrival = last = time.perf_counter()
        try:
            async for out in stream:
                stamp = time.perf_counter()
                if out.new_token_ids:
                    first = last == arrival
                    (self.metrics.ttft if first else self.metrics.itl).observe(stamp - last)
                    self.metrics.generation_tokens.inc(len(out.new_token_ids))
                    last = stamp
                if out.finished:
                    self.metrics.e2e.observe(stamp - arrival)
                    self.metrics.finished(out.finish_reason)
                await queue.put((index, out))
        finally:
            queue.put_nowait(None)


def create_app(engine: LLMEngine, settings: ServerSettings) -> FastAPI:
    """The FastAPI app; the engine thread starts with the app and stops with it."""
    metrics = Metrics(settings.served_model_names[0])
    client = EngineClient(engine, metrics, settings.max_waiting)
    tokenizer = engine.tokenizer
    model_name = settings.served_model_names[0]
    max_tokens_limit = settings.max_tokens_limit or engine.max_model_len
    app = FastAPI(title="rheads", version="0.1.0",
                  description="OpenAI-compatible server with a retrieval-head-aware KV cache.")
    app.router.route_class = StrictJSONRoute
    app.state.client, app.state.engine, app.state.metrics = client, engine, metrics
    app.router.on_shutdown.append(client.shutdown)
    # Tokenizing runs beside the event loop, never on it: a 32k-token prompt takes ~50 ms to encode, which
    # would stall every other stream's tokens. One worker, so no two encodes run at once: an encode may
    # reset the tokenizer's truncation and padding state (the engine thread only decodes a few tokens).
    tokenizer_pool = ThreadPoolExecutor(1, thread_name_prefix="rheads-tokenizer")
    app.router.on_shutdown.append(tokenizer_pool.shutdown)

    async def off_loop(work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(tokenizer_pool, work)

    app.add_middleware(BodySizeLimit, limit=settings.max_request_bytes)
    if settings.allowed_origins:  # added last, so it wraps everything: errors carry CORS headers too
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"])

    # The key is compared as SHA-256 digests with compare_digest: the time taken says nothing about it,
    # not even its length.
    expected_key = hashlib.sha256(f"Bearer {settings.api_key}".encode()).digest()

    async def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        given = hashlib.sha256(request.headers.get("authorization", "").encode()).digest()
        if not hmac.compare_digest(given, expected_key):
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                           "AuthenticationError")

    keyed = [Depends(check_key)]
    open_or_keyed = keyed if settings.protect_health_and_metrics else []

    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(error)
        return JSONResponse(error_body(400, message, "BadRequestError", param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = {400: "BadRequestError", 404: "NotFoundError", 405: "MethodNotAllowed",
                413: TOO_LARGE}.get(error.status_code, "HTTPError")
        return JSONResponse(error_body(error.status_code, str(error.detail), kind), error.status_code)

    @app.exception_handler(Exception)
    async def _internal(_: Request, error: Exception) -> JSONResponse:
        return JSONResponse(error_body(500, f"internal error: {type(error).__name__}", "InternalServerError"), 500)

    def check_model(body: SamplingFields | TokenizeRequest | DetokenizeRequest) -> None:
        if body.model is not None and body.model not in settings.served_model_names:
            raise APIError(404, f"The model `{body.model}` does not exist. Served: {model_name}.",
                           "NotFoundError", "model")

    def chat_prompt(messages, add_generation_prompt: bool) -> list[int]:
        """The model's chat template over the messages, the assistant's turn opened unless the client
        continues a message of its own (vLLM's `add_generation_prompt`)."""
        conversation = [{"role": m.role, "content": m.text()} for m in messages]
        if not tokenizer.chat_template:
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions",
                           "BadRequestError", "messages")
        try:
            text = tokenizer.apply_chat_template(conversation, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as error:  # a template may refuse a conversation (roles out of order)
            raise APIError(400, f"the chat template refused these messages: {error}", "BadRequestError",
                           "messages") from error
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def check_size(body: SamplingFields, num_prompts: int, param: str) -> None:
        """Refuse what can never be served: too many tokens asked for, or more choices than may wait."""
        for name in ("max_tokens", "max_completion_tokens"):
            value = getattr(body, name, None)
            if value is not None and value > max_tokens_limit:
                raise APIError(400, f"{name} is {value}, more than this server's limit of {max_tokens_limit}",
                               "BadRequestError", name)
        if num_prompts * body.n > settings.max_waiting:
            raise APIError(400, f"{num_prompts * body.n} choices (prompts x n) asked for; this server takes at "
                           f"most {settings.max_waiting} in one request", "BadRequestError", param)

    def sampling(body: SamplingFields, max_tokens: int, logprobs: int | None) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              top_k=max(body.top_k, 0), seed=body.seed, stop=body.stop or [],
                              stop_token_ids=body.stop_token_ids or [], ignore_eos=body.ignore_eos,
                              logprobs=logprobs)

    def start(prompts: list[list[int]], params: SamplingParams, n: int, request_id: str,
              param: str) -> Generation:
        try:
            return Generation(client, metrics, prompts, params, n, request_id)
        except RequestError as error:
            raise APIError(400, str(error), "BadRequestError", param) from error
        except QueueFullError as error:
            raise APIError(429, f"server busy: {error}; retry later", "RateLimitError",
                           headers={"Retry-After": str(settings.retry_after_seconds)}) from error

    def usage_of(prompts: list[list[int]], n: int, outputs: dict[int, int]) -> Usage:
        prompt = sum(len(p) for p in prompts) * n
        completion = sum(outputs.values())
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def streaming(gen: Generation, events: AsyncIterator[str]) -> StreamingResponse:
        """An SSE response; a client gone before the first event still has its requests aborted."""
        return StreamingResponse(events, media_type="text/event-stream", background=BackgroundTask(gen.close))

    def sse(payload: dict | str) -> str:
        return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"

    def token_text(token_id: int) -> str:
        return tokenizer.decode([token_id])

    def engine_error(out: RequestOutput) -> APIError:
        return APIError(500, f"the engine failed while serving this request: {out.error}", "InternalServerError")

    async def gather(gen: Generation, prefix: dict[int, str]) -> dict[int, Choice]:
        choices: dict[int, Choice] = {}
        async for index, out in gen:
            if out.error:
                raise engine_error(out)
            choice = choices.setdefault(index, Choice(prefix.get(index, "")))
            choice.text += out.new_text
            choice.logprobs.extend(out.new_logprobs)
            choice.finish_reason, choice.tokens = out.finish_reason, out.num_output_tokens
        return dict(sorted(choices.items()))

    async def disconnected(request: Request) -> None:
        """Returns when the client goes away (the body is read by now, so the next message says so)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def collect(gen: Generation, prefix: dict[int, str], request: Request) -> dict[int, Choice]:
        """Every choice's whole output (non-streaming responses); a client that leaves aborts them."""
        gathering = asyncio.ensure_future(gather(gen, prefix))
        leaving = asyncio.ensure_future(disconnected(request))
        await asyncio.wait({gathering, leaving}, return_when=asyncio.FIRST_COMPLETED)
        leaving.cancel()
        if not gathering.done():  # the client left: abort its requests
            gathering.cancel()
            await asyncio.gather(gathering, leaving, return_exceptions=True)
            gen.close()
            raise APIError(499, "the client closed the connection", "ClientClosedRequest")
        return gathering.result()

    async def sse_stream(gen: Generation, head: dict, chunk: Callable[[int, RequestOutput], dict],
                         usage: Callable[[dict[int, int]], Usage] | None,
                         opening: list[dict] | None = None) -> AsyncIterator[str]:
        """SSE events: opening chunks, one chunk per output, the usage chunk if asked, then [DONE]."""
        for choice in opening or []:
            yield sse({**head, "choices": [choice]})
        counts: dict[int, int] = {}
        async for index, out in gen:
            if out.error:
                yield sse(error_body(500, engine_error(out).message, "InternalServerError"))
                break
            counts[index] = out.num_output_tokens
            yield sse({**head, "choices": [chunk(index, out)]})
        if usage is not None:
            yield sse({**head, "choices": [], "usage": usage(counts).model_dump()})
        yield sse("[DONE]")

    # -- completions ------------------------------------------------------------------------------
    @app.post("/v1/completions", dependencies=keyed)
    async def completions(body: CompletionRequest, request: Request):
        check_model(body)
        check_size(body, len(body.prompts()), "prompt")
        if body.echo and body.logprobs is not None:
            raise APIError(400, "echo with logprobs is not supported", "BadRequestError", "echo")
        if body.suffix:
            raise APIError(400, "suffix is not supported", "BadRequestError", "suffix")
        prompts = body.prompts()
        if any(isinstance(p, str) for p in prompts):  # token ids need no trip to the tokenizer's thread
            prompts = await off_loop(lambda: [p if isinstance(p, list) else tokenizer(p)["input_ids"] for p in prompts])
        if any(not p for p in prompts):
            raise APIError(400, "a prompt is empty", "BadRequestError", "prompt")
        params = sampling(body, body.max_tokens or 16, body.logprobs)
        rid = new_id("cmpl")
        gen = start(prompts, params, body.n, rid, "prompt")
        created = now()
        echo = await off_loop(lambda: {i * body.n + j: tokenizer.decode(p) for i, p in enumerate(prompts)
                                       for j in range(body.n)}) if body.echo else {}

        offsets: dict[int, int] = {}  # characters of each choice's text before its next token

        def logprob_block(index: int, outs: list) -> dict | None:
            if body.logprobs is None:
                return None
            tokens = [token_text(lp.token_id) for lp in outs]
            starts = []
            for token in tokens:
                starts.append(offsets.get(index, 0))
                offsets[index] = starts[-1] + len(token)
            return completion_logprobs(tokens, [lp.logprob for lp in outs],
                                       [{token_text(t): v for t, v in lp.top} for lp in outs], starts)

        usage = (lambda counts: usage_of(prompts, body.n, counts)) if include_usage(body) else None
        if body.stream:
            head = {"id": rid, "object": "text_completion", "created": created, "model": model_name}

            def chunk(index: int, out: RequestOutput) -> dict:
                return {"index": index, "text": echo.pop(index, "") + out.new_text,
                        "logprobs": logprob_block(index, out.new_logprobs), "finish_reason": out.finish_reason}

            return streaming(gen, sse_stream(gen, head, chunk, usage))

        choices = await collect(gen, echo, request)
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                "choices": [{"index": i, "text": c.text, "logprobs": logprob_block(i, c.logprobs),
                             "finish_reason": c.finish_reason} for i, c in choices.items()],
                "usage": usage_of(prompts, body.n, {i: c.tokens for i, c in choices.items()}).model_dump()}

    # -- chat -------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body)
        check_size(body, 1, "n")
        prompt = await off_loop(lambda: chat_prompt(body.messages, body.add_generation_prompt))
        room = engine.output_room(len(prompt))  # by default, as many as the context and the cache leave
        max_tokens = body.max_completion_tokens or body.max_tokens or max(min(room, max_tokens_limit), 1)
        top = body.top_logprobs if body.logprobs else None
        params = sampling(body, max_tokens, (top or 0) if body.logprobs else None)
        rid = new_id("chatcmpl")
        gen = start([prompt], params, body.n, rid, "messages")
        created = now()

        def logprob_block(outs: list) -> dict | None:
            if not body.logprobs:
                return None
            entry = lambda t, v: {"token": token_text(t), "logprob": v,  # noqa: E731
                                  "bytes": list(token_text(t).encode())}
            return {"content": [{**entry(lp.token_id, lp.logprob),
                                 "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in outs]}

        usage = (lambda counts: usage_of([prompt], body.n, counts)) if include_usage(body) else None
        if body.stream:
            head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name}
            opening = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None} for i in range(body.n)]

            def chunk(index: int, out: RequestOutput) -> dict:
                delta = {"content": out.new_text} if out.new_text or not out.finished else {}
                return {"index": index, "delta": delta, "logprobs": logprob_block(out.new_logprobs),
                        "finish_reason": out.finish_reason}

            return streaming(gen, sse_stream(gen, head, chunk, usage, opening))

        choices = await collect(gen, {}, request)
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                             "logprobs": logprob_block(c.logprobs), "finish_reason": c.finish_reason}
                            for i, c in choices.items()],
                "usage": usage_of([prompt], body.n, {i: c.tokens for i, c in choices.items()}).model_dump()}

    # -- the rest ---------------------------------------------------------------------------------
    @app.get("/v1/models", dependencies=keyed)
    async def models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "rheads", "root": engine.model_name,
             "max_model_len": engine.max_model_len} for name in settings.served_model_names]}

    @app.post("/tokenize", dependencies=keyed)
    async def tokenize(body: TokenizeRequest):
        check_model(body)
        ids = await off_loop(lambda: chat_prompt(body.messages, body.add_generation_prompt)
                             if body.messages is not None
                             else tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"])
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @app.post("/detokenize", dependencies=keyed)
    async def detokenize(body: DetokenizeRequest):
        check_model(body)
        vocab = engine.model.config.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", "BadRequestError", "tokens")
        return {"prompt": await off_loop(lambda: tokenizer.decode(body.tokens))}

    @app.get("/health", dependencies=open_or_keyed)
    async def health():
        return Response(status_code=200)

    @app.get("/metrics", dependencies=open_or_keyed)
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
