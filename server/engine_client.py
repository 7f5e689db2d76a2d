"""The bridge between asyncio request handlers and the engine, which steps in its own thread.

Only the engine thread touches the engine's state: handlers validate a request (`validate` and
`output_room` read fixed settings only), then post it to an inbox that the thread drains before each
step, so a long prefill step never blocks the event loop. A step's outputs reach the event loop in one
call, and only the loop touches the request streams. A handler that stops iterating (client gone, task
cancelled) posts an abort, which frees the request's cache pages before the next step.

The engine thread never waits for a client: what a request produced and its handler has not taken yet is
merged into one pending output, so a client that reads slowly costs one output's worth of text, not a
queue of them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import deque

from rheads.engine import LLMEngine, RequestOutput, SamplingParams
from rheads.engine import EngineBrokenError, RequestError

from .metrics import Metrics

logger = logging.getLogger("rheads.server")


class QueueFullError(RuntimeError):
    """The waiting queue is at its limit; the client should retry later (429)."""


class EngineDeadError(RuntimeError):
    """The engine thread has died: nothing can be served any more (503)."""


class EngineStartError(RuntimeError):
    """The engine thread did not get ready to step in time."""


def merged(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """Two consecutive outputs of one request as one."""
    return dataclasses.replace(later, new_token_ids=earlier.new_token_ids + later.new_token_ids,
                               new_text=earlier.new_text + later.new_text,
                               new_logprobs=earlier.new_logprobs + later.new_logprobs,
                               error=later.error or earlier.error)


class EngineClient:
    def __init__(self, engine: LLMEngine, metrics: Metrics, max_waiting: int = 256):
        self.engine, self.metrics, self.max_waiting = engine, metrics, max_waiting
        # The lock keeps the inbox and the waiting count that decides 429 in step: a request is counted
        # from its post until the engine thread's next look at the engine's own queue after taking it.
        self._lock = threading.Lock()
        self._inbox: deque[tuple] = deque()  # ("add", id, ids, params) / ("abort", id) / ("reset", future)
        self._posted = 0  # adds in the inbox
        self._resets: list[asyncio.Future] = []  # prefix-cache resets done, to answer after the metrics
        self._engine_waiting = 0  # the engine's waiting requests as of the engine thread's last look
        self._work = threading.Event()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._streams: dict[str, RequestStream] = {}  # unfinished requests; the event loop's alone
        self._loop: asyncio.AbstractEventLoop | None = None
        self._start_error: BaseException | None = None
        self._died: BaseException | None = None  # why the engine thread stopped stepping, if it did
        self._thread = threading.Thread(target=self._run, name="rheads-engine", daemon=True)

    # -- lifecycle (the app's lifespan) ---------------------------------------------------------
    async def start(self, timeout: float) -> None:
        """Start the engine thread and return once it is ready to step; raise if it failed or took longer
        than `timeout` seconds (its start-up builds cuDNN plans, which belong to the thread that steps)."""
        self._loop = asyncio.get_running_loop()
        self._thread.start()
        if not await asyncio.to_thread(self._ready.wait, timeout):
            self._stop.set()  # the thread exits once its start-up returns
            raise EngineStartError(f"the engine thread was not ready to serve within {timeout:g} s")
        if self._start_error is not None:
            raise self._start_error

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._work.set()
        if self._ready.is_set():  # else it is still starting up, and leaves once that returns
            self._thread.join(timeout)

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    @property
    def death(self) -> str | None:
        """What /health and every new request are told once the engine thread has died; None while it runs."""
        if self._died is None:
            return None
        return f"the engine thread has died ({self._died!r}); restart the server"

    # -- the event loop's side ------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        self.engine.limits.validate(prompt_ids, params)

    def check_grammar(self, grammar: str) -> None:
        self.engine.grammars.check(grammar)

    def output_room(self, num_prompt_tokens: int) -> int:
        return self.engine.limits.output_room(num_prompt_tokens)

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
               ready: asyncio.Event) -> RequestStream:
        """Post a validated request (QueueFullError, EngineDeadError or RequestError at once); return its
        stream, which sets `ready` whenever an output arrives."""
        if self.death is not None:
            raise EngineDeadError(self.death)
        if request_id in self._streams:
            raise RequestError(f"request id {request_id!r} is already running")
        with self._lock:
            waiting = self._posted + self._engine_waiting
            if waiting >= self.max_waiting:
                raise QueueFullError(f"{waiting} requests are already waiting")
            self._inbox.append(("add", request_id, prompt_ids, params))
            self._posted += 1
        stream = self._streams[request_id] = RequestStream(self, request_id, ready)
        self._work.set()
        return stream

    def abort(self, request_id: str) -> None:
        """Stop an unfinished request (a no-op for a finished one)."""
        if self._streams.pop(request_id, None) is not None:
            logger.info("request %s aborted before it finished", request_id)
            with self._lock:
                self._inbox.append(("abort", request_id))
            self._work.set()

    async def reset_prefix_cache(self) -> None:
        """Empty the engine's prefix cache, between two steps of the engine thread (which owns the cache);
        returns once it is done."""
        if self.death is not None:
            raise EngineDeadError(self.death)
        done = self._loop.create_future()
        with self._lock:
            self._inbox.append(("reset", done))
        self._work.set()
        await done

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:  # aborted after the step began
                continue
            if out.finished:
                del self._streams[out.request_id]
            stream.put(out)

    def _fail_all(self, message: str) -> None:
        with self._lock:  # resets the dead thread never took: their callers get 503, not a wait forever
            resets = [item[1] for item in self._inbox if item[0] == "reset"] + self._resets
        for done in resets:
            if not done.done():
                done.set_exception(EngineDeadError(message))
        streams, self._streams = self._streams, {}
        for request_id, stream in streams.items():
            stream.put(RequestOutput.failure(request_id, message))

    # -- the engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.engine.prepare_thread()
        except BaseException as error:  # noqa: BLE001 - raised by `start`, in the event loop
            self._start_error = error
            return
        finally:
            self._ready.set()
        try:
            while not self._stop.is_set():
                self._turn()
        except BaseException as error:  # noqa: BLE001 - reported by /health and to every request
            self._died = error
            logger.critical("the engine thread died; failing every request in flight", exc_info=error)
            self._loop.call_soon_threadsafe(self._fail_all, f"the engine thread died: {error!r}")

    def _turn(self) -> None:
        outputs = self._drain_inbox()
        busy = self.engine.has_unfinished()
        if busy:
            outputs += self._step()
        with self._lock:
            self._engine_waiting = self.engine.num_waiting
        self.metrics.observe_engine(self.engine)
        for done in self._resets:
            self._loop.call_soon_threadsafe(done.set_result, None)
        self._resets.clear()
        if outputs:
            self._loop.call_soon_threadsafe(self._dispatch, outputs)
        if not busy and not self._inbox:
            self._work.wait(0.5)
            self._work.clear()

    def _drain_inbox(self) -> list[RequestOutput]:
        with self._lock:
            items = list(self._inbox)
            self._inbox.clear()
            self._engine_waiting += self._posted  # waiting in the engine from now on
            self._posted = 0
        failed = []
        for kind, request_id, *rest in items:
            if kind == "reset":  # request_id is the caller's future, answered once the metrics show the reset
                self.engine.reset_prefix_cache()
                self._resets.append(request_id)
                continue
            if kind == "abort":
                self.engine.abort(request_id)
                continue
            try:
                self.engine.add_request(request_id, *rest, validated=True)
            except RequestError as error:  # validated already; only a race (a duplicate id) lands here
                logger.warning("request %s refused by the engine: %s", request_id, error)
                failed.append(RequestOutput.failure(request_id, str(error)))
        return failed

    def _step(self) -> list[RequestOutput]:
        """One engine step; if it raises, every request in flight fails with the error (none hangs), and if
        the engine cannot step again (`EngineBrokenError`) the thread dies with it."""
        try:
            return self.engine.step()
        except EngineBrokenError:  # it cannot step again: the thread dies, /health and every request say so
            raise
        except Exception as error:  # noqa: BLE001 - reported to each client as an engine error
            outputs = self.engine.fail_all(error)
            logger.error("an engine step failed; failing requests %s", ", ".join(o.request_id for o in outputs),
                         exc_info=error)
            return outputs


class RequestStream:
    """One submitted request's outputs as they arrive, merged while its handler has not taken them."""

    def __init__(self, client: EngineClient, request_id: str, ready: asyncio.Event):
        self.client, self.request_id, self.ready, self.metrics = client, request_id, ready, client.metrics
        self.pending: RequestOutput | None = None
        self.done = False  # the last output taken, or the stream closed
        self.arrival = self.last = time.perf_counter()

    def put(self, out: RequestOutput) -> None:
        self._observe(out)
        if self.pending is None:
            self.pending = out
            self.metrics.buffered.inc()
        else:
            self.pending = merged(self.pending, out)
            self.metrics.coalesced.inc()
        self.ready.set()

    def take(self) -> RequestOutput | None:
        out, self.pending = self.pending, None
        if out is not None:
            self.metrics.buffered.dec()
            self.done = out.finished
        return out

    def close(self) -> None:
        """Abort the request if it is unfinished and drop what it has not delivered."""
        if not self.done:
            self.client.abort(self.request_id)
        if self.pending is not None:
            self.pending = None
            self.metrics.buffered.dec()
        self.done = True

    def _observe(self, out: RequestOutput) -> None:
        """Latencies as the engine delivers, whatever the client's pace."""
        stamp = time.perf_counter()
        if out.new_token_ids:
            (self.metrics.ttft if self.last == self.arrival else self.metrics.itl).observe(stamp - self.last)
            self.metrics.generation_tokens.inc(len(out.new_token_ids))
            self.last = stamp
        if out.finished:
            self.metrics.e2e.observe(stamp - self.arrival)
            self.metrics.finished(out.finish_reason)
