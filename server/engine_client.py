"""The bridge between asyncio request handlers and the engine, which steps in its own thread.

Only the engine thread touches the engine: handlers validate a request (fixed settings only), then
post it to an inbox that the thread drains before each step, so a long prefill step never blocks the
event loop. Each output goes to its request's asyncio queue, a step's outputs in one call into the
loop. A handler that stops iterating (client gone, task cancelled) posts an abort, which frees the
request's cache pages before the next step.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from rheads.engine import LLMEngine, RequestOutput, SamplingParams
from rheads.engine.llm import RequestError

from .metrics import Metrics


class QueueFullError(RuntimeError):
    """The waiting queue is at its limit; the client should retry later (429)."""


@dataclass
class _Pending:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


class EngineClient:
    def __init__(self, engine: LLMEngine, metrics: Metrics, max_waiting: int = 256):
        self.engine, self.metrics, self.max_waiting = engine, metrics, max_waiting
        self._inbox: deque[tuple] = deque()  # ("add", id, ids, params) / ("abort", id), in order
        self._work = threading.Event()
        self._stop = threading.Event()
        self._pending: dict[str, _Pending] = {}
        self._waiting = 0  # requests posted but not yet running (read by handlers, for the 429 check)
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="rheads-engine", daemon=True)
        self._thread.start()
        self._ready.wait()  # the engine thread's own start-up (its cuDNN plans) comes before any request
        if self._start_error is not None:
            raise self._start_error

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._work.set()
        self._thread.join(timeout)

    @property
    def num_unfinished(self) -> int:
        return len(self._pending)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their requests' queues: one wake-up of each event loop, not one per output."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            pending = self._pending.get(out.request_id)
            if pending is not None:
                by_loop.setdefault(pending.loop, []).append((pending.queue, out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _drain_inbox(self) -> list[RequestOutput]:
        failed = []
        while self._inbox:
            kind, request_id, *rest = self._inbox.popleft()
            if kind == "abort":
                self.engine.abort(request_id)
                continue
            try:
                self.engine.add_request(request_id, *rest)
            except RequestError as error:  # validated already; only a race (a duplicate id) lands here
                failed.append(RequestOutput.failure(request_id, str(error)))
        return failed

    def _run(self) -> None:
        try:
            self.engine.prepare_thread()
        except BaseException as error:  # noqa: BLE001 - raised in the constructing thread
            self._start_error = error
            return
        finally:
            self._ready.set()
        while not self._stop.is_set():
            outputs = self._drain_inbox()
            busy = self.engine.has_unfinished()
            if busy:
                outputs += self._step()
            self._waiting = self.engine.num_waiting + len(self._inbox)
            self.metrics.observe_engine(self.engine)
            self._deliver(outputs)
            if not busy and not self._inbox:
                self._work.wait(0.5)
                self._work.clear()

    def _step(self) -> list[RequestOutput]:
        """One engine step; if it raises, every request in flight fails with the error (none hangs)."""
        try:
            return self.engine.step()
        except Exception as error:  # noqa: BLE001 - reported to each client as an engine error
            return self.engine.fail_all(error)

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> "RequestStream":
        """Validate and post a request (RequestError or QueueFullError at once); return its output stream."""
        if self._waiting >= self.max_waiting:
            raise QueueFullError(f"{self._waiting} requests are already waiting")
        if request_id in self._pending:
            raise RequestError(f"request id {request_id!r} is already running")
        self.engine.validate(prompt_ids, params)
        pending = _Pending(asyncio.get_running_loop())
        self._pending[request_id] = pending
        self._waiting += 1
        self._inbox.append(("add", request_id, prompt_ids, params))
        self._work.set()
        return RequestStream(self, request_id, pending.queue)

    def abort(self, request_id: str) -> None:
        if self._pending.pop(request_id, None) is not None:
            self._inbox.append(("abort", request_id))
            self._work.set()


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)


class RequestStream:
    """The outputs of one submitted request; leaving the iteration early aborts the request."""

    def __init__(self, client: EngineClient, request_id: str, queue: asyncio.Queue):
        self.client, self.request_id, self.queue = client, request_id, queue

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                out = await self.queue.get()
                finished = out.finished
                yield out
        finally:
            if finished:
                self.client._pending.pop(self.request_id, None)
            else:
                self.client.abort(self.request_id)
