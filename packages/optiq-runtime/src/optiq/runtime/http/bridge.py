"""The HTTP front's way into the engine: the same request checks as gRPC, asyncio side.

Both fronts build a ``pb.GenerateRequest`` and pass it through
:func:`optiq.runtime.request.build_request`, so limits, defaults and error messages are
one code path. Tokenizing (chat templates can be slow on long agent prompts) runs in a
worker thread; events come back through the engine's ``notify`` hook instead of a
thread blocked per request, so many open streams cost no threads.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable

from optiq.v1 import generation_pb2 as pb
from starlette.concurrency import run_in_threadpool

from ..config import Defaults
from ..engine import Engine, RequestHandle
from ..request import build_request, render_input
from ..service import _coalesce
from ..types import Event, GenerationRequest


def _waker(loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> Callable[[], None]:
    def wake() -> None:
        try:
            loop.call_soon_threadsafe(event.set)
        except RuntimeError:  # the loop is closed: nobody is reading any more
            pass

    return wake


class Stream:
    """One running request, read from the event loop."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._ready = asyncio.Event()
        self.handle: RequestHandle | None = None

    @property
    def request(self) -> GenerationRequest:
        assert self.handle is not None
        return self.handle.request

    def submit(self, req: GenerationRequest) -> None:
        self.handle = self.engine.submit(req, _waker(asyncio.get_running_loop(), self._ready))

    async def batches(self) -> AsyncIterator[list[Event]]:
        """Events in batches (what was ready at once, merged per channel); ends after
        the final event."""
        assert self.handle is not None
        while not self.handle.done:
            await self._ready.wait()
            self._ready.clear()
            batch = self.handle.poll()
            if batch:
                yield _coalesce(batch)

    def cancel(self) -> None:
        """Free the request's slot (client gone); nothing if it already ended."""
        if self.handle is not None and not self.handle.done:
            self.engine.cancel(self.handle)


class EngineBridge:
    def __init__(self, engine: Engine, defaults: Defaults):
        self.engine = engine
        self.defaults = defaults

    async def start(self, r: pb.GenerateRequest) -> Stream:
        """Validate, tokenize and submit; raises BadRequest / QueueFull / NotServing."""
        req = await run_in_threadpool(build_request, r, self.engine, self.defaults)
        stream = Stream(self.engine)
        stream.submit(req)
        return stream

    async def count_tokens(self, messages: Any, tools: Any, enable_thinking: bool | None) -> int:
        ids, _, _ = await run_in_threadpool(
            lambda: render_input(self.engine, text="", messages=messages, tools=tools,
                                 enable_thinking=enable_thinking)
        )
        return len(ids)
