"""Completions and chat completions: two small serving classes over one generation path (vLLM's
OpenAIServingCompletion and OpenAIServingChat). Each says how its request becomes prompt token ids and
how an output becomes its API's JSON; `OpenAIServing.create` does the rest for both: the checks, the
output-token room, submitting prompts x n choices, and the response, whole or as server-sent events."""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import functools
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import jinja2
from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from rheads.engine import RequestOutput, SamplingParams
from rheads.engine import RequestError

from .engine_client import EngineClient, EngineDeadError, QueueFullError, RequestStream
from .errors import APIError, bad_request, unavailable
from .protocol import (
    ChatCompletionRequest, ChatMessage, CompletionRequest, PromptTokensDetails, SamplingFields, Usage,
    completion_logprobs, error_body, new_id, now,
)
from .structured import lark_grammar
from .tokenizer import ServerTokenizer
from .tools import ToolFamily, ToolStream, family_of


class Generation:
    """One API request's engine work, prompts x n choices, merged into one stream as outputs come."""

    def __init__(self, client: EngineClient, prompts: list[list[int]], params: SamplingParams, n: int,
                 request_id: str):
        for ids in prompts:  # a prompt's choices differ only in their seeds: one check serves them all
            client.validate(ids, params)
        self.ready = asyncio.Event()
        self.streams: list[RequestStream] = []
        try:  # submit every choice before answering, so a refusal is a clean 4xx with nothing left running
            for index, ids in enumerate([ids for ids in prompts for _ in range(n)]):
                seed = None if params.seed is None else params.seed + index
                self.streams.append(client.submit(f"{request_id}-{index}", ids,
                                                  dataclasses.replace(params, seed=seed), self.ready))
        except (QueueFullError, EngineDeadError, RequestError):
            self.close()
            raise
        client.metrics.prompt_tokens.inc(sum(map(len, prompts)) * n)

    def close(self) -> None:
        """Abort every choice still unfinished (a no-op for finished ones), whether or not iteration began."""
        for stream in self.streams:
            stream.close()

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) as they come; each output holds all that choice produced since the last."""
        try:
            while not all(stream.done for stream in self.streams):
                await self.ready.wait()
                self.ready.clear()
                for index, stream in enumerate(self.streams):
                    if (out := stream.take()) is not None:
                        yield index, out
        finally:
            self.close()


@dataclass
class Choice:
    """One choice's output gathered for a non-streaming response."""

    text: str = ""
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    tokens: int = 0
    cached_tokens: int = 0  # of its prompt, found in the prefix cache


class Rendering(abc.ABC):
    """How one request's outputs read in its API: the chunks of a stream and the choices of a response."""

    def opening(self) -> list[dict]:
        """Chunks that open the stream, before any output."""
        return []

    @abc.abstractmethod
    def chunk(self, index: int, out: RequestOutput) -> dict: ...

    @abc.abstractmethod
    def choice(self, index: int, choice: Choice) -> dict: ...


def engine_error(out: RequestOutput) -> APIError:
    return APIError(500, f"the engine failed while serving this request: {out.error}", "InternalServerError")


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def sse_events(gen: Generation, head: dict, rendering: Rendering,
                     usage: Callable[[dict[int, int], dict[int, int]], Usage] | None) -> AsyncIterator[str]:
    """SSE events: opening chunks, one chunk per output, the usage chunk if asked, then [DONE]."""
    for choice in rendering.opening():
        yield sse({**head, "choices": [choice]})
    counts: dict[int, int] = {}
    cached: dict[int, int] = {}
    async for index, out in gen:
        if out.error:
            yield sse(error_body(500, engine_error(out).message, "InternalServerError"))
            break
        counts[index], cached[index] = out.num_output_tokens, out.num_cached_tokens
        yield sse({**head, "choices": [rendering.chunk(index, out)]})
    if usage is not None:
        yield sse({**head, "choices": [], "usage": usage(counts, cached).model_dump()})
    yield sse("[DONE]")


async def gather(gen: Generation) -> dict[int, Choice]:
    choices: dict[int, Choice] = {}
    async for index, out in gen:
        if out.error:
            raise engine_error(out)
        choice = choices.setdefault(index, Choice())
        choice.text += out.new_text
        choice.logprobs.extend(out.new_logprobs)
        choice.finish_reason, choice.tokens = out.finish_reason, out.num_output_tokens
        choice.cached_tokens = out.num_cached_tokens
    return dict(sorted(choices.items()))


async def disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is read by now, so the next message says so)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(gen: Generation, request: Request) -> dict[int, Choice]:
    """Every choice's whole output (non-streaming responses); a client that leaves aborts them."""
    gathering = asyncio.ensure_future(gather(gen))
    leaving = asyncio.ensure_future(disconnected(request))
    await asyncio.wait({gathering, leaving}, return_when=asyncio.FIRST_COMPLETED)
    leaving.cancel()
    if not gathering.done():  # the client left: abort its requests
        gathering.cancel()
        await asyncio.gather(gathering, leaving, return_exceptions=True)
        gen.close()
        raise APIError(499, "the client closed the connection", "ClientClosedRequest")
    return gathering.result()


def usage_of(prompts: list[list[int]], n: int, outputs: dict[int, int], cached: dict[int, int]) -> Usage:
    """A response's usage over its choices; `cached`: each choice's prompt tokens the prefix cache served."""
    prompt = sum(map(len, prompts)) * n
    completion = sum(outputs.values())
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(cached.values())))


class OpenAIServing(abc.ABC):
    """The generation path both APIs share; subclasses say how prompts are made and outputs read."""

    id_prefix: str
    object: str
    chunk_object: str
    prompt_param: str  # the field a refused prompt is blamed on
    choices_param: str  # the field blamed for too many choices

    def __init__(self, client: EngineClient, tokenizer: ServerTokenizer, served_model_names: list[str],
                 max_tokens_limit: int, max_choices: int, retry_after_seconds: int):
        self.client, self.tokenizer, self.served_model_names = client, tokenizer, served_model_names
        self.max_tokens_limit, self.max_choices, self.retry_after_seconds = (max_tokens_limit, max_choices,
                                                                             retry_after_seconds)

    @abc.abstractmethod
    def check(self, body) -> None:
        """Refuse at once what this API cannot serve (before any tokenizing)."""

    @abc.abstractmethod
    async def prompt_ids(self, body) -> list[list[int]]: ...

    @abc.abstractmethod
    async def rendering(self, body, prompts: list[list[int]]) -> Rendering: ...

    def grammar(self, body) -> tuple[str | None, str | None]:
        """The grammar the output must follow (validated with the request), and the field it comes from."""
        return body.grammar(), body.guide

    def kept_special_ids(self, body) -> tuple[int, ...]:
        """Special tokens this request's output text must keep (decoding skips every other)."""
        return ()

    async def checked_grammar(self, body) -> str | None:
        """The grammar, checked over the model's tokenizer on the tokenizing worker (where the first
        grammar's tokenizer wrapping happens too, not in the engine thread)."""
        grammar, param = self.grammar(body)
        if grammar is not None:
            try:
                await self.tokenizer.run(lambda _: self.client.check_grammar(grammar))
            except RequestError as error:
                raise bad_request(str(error), param) from error
        return grammar

    def check_limits(self, body, num_prompts: int) -> None:
        """Refuse what can never be served: another model, too many tokens or more choices than may wait."""
        check_model(body.model, self.served_model_names)
        for name in ("max_tokens", "max_completion_tokens"):
            value = getattr(body, name, None)
            if value is not None and value > self.max_tokens_limit:
                raise bad_request(f"{name} is {value}, more than this server's limit of {self.max_tokens_limit}",
                                  name)
        if num_prompts * body.n > self.max_choices:
            raise bad_request(f"{num_prompts * body.n} choices (prompts x n) asked for; this server takes at most "
                              f"{self.max_choices} in one request", self.choices_param)

    def max_tokens(self, body: SamplingFields, num_prompt_tokens: int) -> int:
        """How many tokens the request may generate, decided here alone: what it asks for (more than fits is
        refused by validation), else its API's default within what the context, the cache and the server's
        limit leave."""
        if body.asked_max_tokens is not None:
            return body.asked_max_tokens
        room = min(self.client.output_room(num_prompt_tokens), self.max_tokens_limit)
        return max(min(room, body.default_max_tokens or room), 1)

    def start(self, prompts: list[list[int]], params: SamplingParams, n: int, request_id: str) -> Generation:
        try:
            return Generation(self.client, prompts, params, n, request_id)
        except RequestError as error:
            raise bad_request(str(error), error.param or self.prompt_param) from error
        except QueueFullError as error:
            raise APIError(429, f"server busy: {error}; retry later", "RateLimitError",
                           headers={"Retry-After": str(self.retry_after_seconds)}) from error
        except EngineDeadError as error:
            raise unavailable(str(error)) from error

    async def create(self, body: SamplingFields, request: Request):
        self.check(body)
        prompts = await self.prompt_ids(body)
        params = body.to_sampling_params(self.max_tokens(body, max(map(len, prompts))),
                                         await self.checked_grammar(body))
        params = dataclasses.replace(params, keep_special_ids=self.kept_special_ids(body))
        rendering = await self.rendering(body, prompts)
        rid = new_id(self.id_prefix)
        gen = self.start(prompts, params, body.n, rid)
        head = {"id": rid, "object": self.object, "created": now(), "model": self.served_model_names[0]}
        if body.stream:
            usage = (lambda outputs, cached: usage_of(prompts, body.n, outputs, cached)) if body.include_usage \
                else None
            events = sse_events(gen, {**head, "object": self.chunk_object}, rendering, usage)
            # the background task aborts the requests of a client gone before the first event
            return StreamingResponse(events, media_type="text/event-stream", background=BackgroundTask(gen.close))
        choices = await collect(gen, request)
        return {**head, "choices": [rendering.choice(i, c) for i, c in choices.items()],
                "usage": usage_of(prompts, body.n, {i: c.tokens for i, c in choices.items()},
                                  {i: c.cached_tokens for i, c in choices.items()}).model_dump()}


def check_model(model: str | None, served_model_names: list[str]) -> None:
    if model is not None and model not in served_model_names:
        raise APIError(404, f"The model `{model}` does not exist. Served: {served_model_names[0]}.",
                       "NotFoundError", "model")


# -- completions ----------------------------------------------------------------------------------
class CompletionRendering(Rendering):
    def __init__(self, body: CompletionRequest, echo: dict[int, str], token_text: Callable[[int], str]):
        self.body, self.echo, self.token_text = body, echo, token_text
        self.offsets: dict[int, int] = {}  # characters of each choice's text before its next token

    def logprobs(self, index: int, outs: list) -> dict | None:
        if self.body.logprobs is None:
            return None
        tokens = [self.token_text(lp.token_id) for lp in outs]
        starts = []
        for token in tokens:
            starts.append(self.offsets.get(index, 0))
            self.offsets[index] = starts[-1] + len(token)
        return completion_logprobs(tokens, [lp.logprob for lp in outs],
                                   [{self.token_text(t): v for t, v in lp.top} for lp in outs], starts)

    def chunk(self, index: int, out: RequestOutput) -> dict:
        return {"index": index, "text": self.echo.pop(index, "") + out.new_text,
                "logprobs": self.logprobs(index, out.new_logprobs), "finish_reason": out.finish_reason}

    def choice(self, index: int, choice: Choice) -> dict:
        return {"index": index, "text": self.echo.get(index, "") + choice.text,
                "logprobs": self.logprobs(index, choice.logprobs), "finish_reason": choice.finish_reason}


class OpenAIServingCompletion(OpenAIServing):
    id_prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"
    prompt_param = choices_param = "prompt"

    def check(self, body: CompletionRequest) -> None:
        self.check_limits(body, len(body.prompts()))
        if body.echo and body.logprobs is not None:
            raise bad_request("echo with logprobs is not supported", "echo")
        if body.suffix:
            raise bad_request("suffix is not supported", "suffix")

    async def prompt_ids(self, body: CompletionRequest) -> list[list[int]]:
        prompts = [p if isinstance(p, list) else await self.tokenizer.encode(p) for p in body.prompts()]
        if any(not p for p in prompts):
            raise bad_request("a prompt is empty", "prompt")
        return prompts

    async def rendering(self, body: CompletionRequest, prompts: list[list[int]]) -> Rendering:
        echo = {}
        for i, ids in enumerate(prompts if body.echo else []):
            text = await self.tokenizer.decode(ids)
            echo.update({i * body.n + j: text for j in range(body.n)})
        return CompletionRendering(body, echo, self.tokenizer.token_text)


# -- chat -----------------------------------------------------------------------------------------
class ChatRendering(Rendering):
    """Chat choices; with tools offered, each choice's tool calls are read out of its text (`tools`), and a
    stream holds back what may be a call until the choice ends."""

    def __init__(self, body: ChatCompletionRequest, token_text: Callable[[int], str], tools: ToolFamily | None):
        self.body, self.token_text, self.tools = body, token_text, tools
        self.streams: dict[int, ToolStream] = {}

    def logprobs(self, outs: list) -> dict | None:
        if not self.body.logprobs:
            return None

        def entry(token_id: int, logprob: float) -> dict:
            text = self.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                            for lp in outs]}

    def opening(self) -> list[dict]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(self.body.n)]

    def chunk(self, index: int, out: RequestOutput) -> dict:
        text, calls, called = out.new_text, [], False
        if self.tools is not None:
            stream = self.streams.setdefault(index, ToolStream(self.tools))
            text, calls = stream.feed(text)
            if out.finished:
                rest, more = stream.finish()
                text, calls = text + rest, calls + more
            called = stream.calls > 0
        delta = {"content": text} if text or not (out.finished or calls) else {}
        if calls:
            delta["tool_calls"] = calls
        return {"index": index, "delta": delta, "logprobs": self.logprobs(out.new_logprobs),
                "finish_reason": finish_reason(out.finish_reason, called)}

    def choice(self, index: int, choice: Choice) -> dict:
        content, calls = self.tools.parse(choice.text) if self.tools is not None else (choice.text, [])
        message = {"role": "assistant", "content": content.strip() or None if calls else content}
        if calls:
            message["tool_calls"] = calls
        return {"index": index, "message": message, "logprobs": self.logprobs(choice.logprobs),
                "finish_reason": finish_reason(choice.finish_reason, bool(calls))}


def finish_reason(reason: str | None, called: bool) -> str | None:
    return "tool_calls" if called and reason == "stop" else reason


class OpenAIServingChat(OpenAIServing):
    id_prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"
    prompt_param, choices_param = "messages", "n"

    @functools.cached_property
    def tools(self) -> ToolFamily | None:
        """The chat template's tool-call format, if it has one."""
        return family_of(self.tokenizer.own())

    def check(self, body: ChatCompletionRequest) -> None:
        self.check_limits(body, 1)
        if body.calls_tools and self.tools is None:
            raise bad_request("this model's chat template takes no tools (serve it with a chat template that "
                              "does: rheads serve --chat-template)", "tools")

    def kept_special_ids(self, body: ChatCompletionRequest) -> tuple[int, ...]:
        return self.tools.kept_ids if body.calls_tools else ()  # the tool calls' markers, to read the calls

    def grammar(self, body: ChatCompletionRequest) -> tuple[str | None, str | None]:
        forced = body.forced_tools
        if forced is None:
            return super().grammar(body)
        tools = [(tool.function.name, tool.function.parameters) for tool in forced]
        try:
            one = body.tool_choice != "required" or not body.parallel_tool_calls
            return lark_grammar(self.tools.grammar(tools, one=one)), "tools"
        except ValueError as error:
            raise bad_request(f"no grammar for these tools: {error}", "tools") from error

    async def prompt_ids(self, body: ChatCompletionRequest) -> list[list[int]]:
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.calls_tools else None
        return [await self.chat_prompt(body.messages, body.add_generation_prompt, tools)]

    async def rendering(self, body: ChatCompletionRequest, prompts: list[list[int]]) -> Rendering:
        return ChatRendering(body, self.tokenizer.token_text, self.tools if body.calls_tools else None)

    async def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool,
                          tools: list[dict] | None = None) -> list[int]:
        """The model's chat template over the messages (and the tools offered), the assistant's turn opened
        unless the client continues a message of its own (vLLM's `add_generation_prompt`)."""
        conversation = [m.for_template() for m in messages]

        def render(tokenizer) -> list[int]:
            if not tokenizer.chat_template:
                raise bad_request("this model's tokenizer has no chat template; use /v1/completions", "messages")
            try:
                text = tokenizer.apply_chat_template(conversation, tools=tools, tokenize=False,
                                                     add_generation_prompt=add_generation_prompt)
            except jinja2.TemplateError as error:  # a template may refuse a conversation (roles out of order)
                raise bad_request(f"the chat template refused these messages: {error}", "messages") from error
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        return await self.tokenizer.run(render)
