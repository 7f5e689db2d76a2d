"""The server's tokenizer work, on copies of the engine's tokenizer.

The engine thread detokenizes every output with the engine's own tokenizer, and a fast tokenizer is not
safe for an encode that sets truncation or padding beside a decode in another thread. So the server never
uses the engine's object: each server thread (the event loop, the tokenizing worker) gets its own copy,
made from a pristine one taken before the engine thread starts. Whole prompts are encoded and decoded on
the worker, beside the event loop, never on it: a long prompt would stall every other stream's tokens.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class ServerTokenizer:
    def __init__(self, tokenizer, chat_template: str | None = None):
        self._template = copy.deepcopy(tokenizer)  # only ever read (copied), so shared by every thread
        if chat_template is not None:  # the server's own (`rheads serve --chat-template`), over the model's
            self._template.chat_template = chat_template
        self._local = threading.local()
        # One worker: prompts are encoded in arrival order, and the CPU is left to the engine thread.
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="rheads-tokenizer")

    def own(self) -> Any:
        """The calling thread's copy, made on its first use."""
        tokenizer = getattr(self._local, "tokenizer", None)
        if tokenizer is None:
            tokenizer = self._local.tokenizer = copy.deepcopy(self._template)
        return tokenizer

    async def start(self) -> None:
        """Make the event loop's and the worker's copies now, not while the first request waits."""
        self.own()
        await self.run(lambda tokenizer: None)

    def shutdown(self) -> None:
        self._worker.shutdown()

    async def run(self, work: Callable[[Any], T]) -> T:
        """`work(tokenizer)` on the worker, with the worker's copy."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, lambda: work(self.own()))

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return await self.run(lambda tokenizer: tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    async def decode(self, ids: list[int]) -> str:
        return await self.run(lambda tokenizer: tokenizer.decode(ids))

    def token_text(self, token_id: int) -> str:
        """One token's text, decoded in the calling thread (cheap enough for the event loop)."""
        return self.own().decode([token_id])
