"""The bridge between asyncio request handlers and the engine, which steps in its own thread.

Handlers call `generate`, an async iterator of RequestOutput. The engine thread steps whenever work
is pending and hands each output to its request's asyncio queue. A handler that stops iterating
(client gone, task cancelled) aborts its request, which frees its cache pages at once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from rheads.engine import LLMEngine, RequestOutput, SamplingParams

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
        self._lock = threading.Lock()
        self._work = threading.Event()
        self._stop = threading.Event()
        self._pending: dict[str, _Pending] = {}
        self._thread = threading.Thread(target=self._run, name="rheads-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._work.set()
        self._thread.join(timeout)

    @property
    def num_unfinished(self) -> int:
        return len(self._pending)

    def _deliver(self, out: RequestOutput) -> None:
        pending = self._pending.get(out.request_id)
        if pending is not None:
            pending.loop.call_soon_threadsafe(pending.queue.put_nowait, out)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                busy = self.engine.has_unfinished()
                outputs = self._step() if busy else []
                self.metrics.observe_engine(self.engine)
            for out in outputs:
                self._deliver(out)
            if not busy:
                self._work.wait(0.5)
                self._work.clear()

    def _step(self) -> list[RequestOutput]:
        """One engine step; if it raises, every request in flight fails with the error (none hangs)."""
        try:
            return self.engine.step()
        except Exception as error:  # noqa: BLE001 - reported to each client as an engine error
            failed = []
            for request_id in list(self.engine.sequences):
                self.engine.abort(request_id)
                failed.append(RequestOutput(request_id, [], "", [], True, "error", 0, 0,
                                            error=f"{type(error).__name__}: {error}"))
            return failed

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> "RequestStream":
        """Add a request now (raising RequestError or QueueFullError at once) and return its output stream."""
        pending = _Pending(asyncio.get_running_loop())
        with self._lock:
            if self.engine.num_waiting >= self.max_waiting:
                raise QueueFullError(f"{self.engine.num_waiting} requests are already waiting")
            self.engine.add_request(request_id, prompt_ids, params)
            self._pending[request_id] = pending
        self._work.set()
        return RequestStream(self, request_id, pending.queue)

    def abort(self, request_id: str) -> None:
        self._pending.pop(request_id, None)
        with self._lock:
            if self.engine.abort(request_id):
                self.metrics.observe_engine(self.engine)


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
