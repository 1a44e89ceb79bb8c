"""AsyncClient: the Client for asyncio code. Each call runs in a worker thread (the native
calls release the GIL, so the event loop keeps running); cancelling the awaiting task sends
the server a cancel request for the call."""
from __future__ import annotations

import asyncio
import functools
from typing import Any, AsyncIterator, Optional

from ._client import Client
from ._native import StreamEvent, TrainStep

__all__ = ["AsyncClient"]


class AsyncClient:
    """``db = await AsyncClient.connect(dsn)``; then ``await db.generate(...)``, ``async for
    event in db.stream(...)``, and every other method of :class:`Client` awaited. Calls on
    one AsyncClient run one at a time (one connection); open several for parallel work."""

    def __init__(self, client: Client):
        self._client = client

    @classmethod
    async def connect(cls, dsn: Optional[str] = None) -> "AsyncClient":
        return cls(await asyncio.to_thread(Client, dsn))

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await asyncio.to_thread(self._client.close)

    async def _call(self, method, *args, **kwargs):
        try:
            return await asyncio.to_thread(method, *args, **kwargs)
        except asyncio.CancelledError:
            # The thread still waits on the server: stop the query there.
            await asyncio.to_thread(self._client.cancel)
            raise

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        if not callable(method):
            return method

        @functools.wraps(method)
        async def call(*args, **kwargs):
            return await self._call(method, *args, **kwargs)

        return call

    async def stream(self, prompt: str, **options) -> AsyncIterator[StreamEvent]:
        """Tokens as the server produces them; leaving the loop early cancels the generation."""
        events = await self._call(self._client.stream, prompt, **options)
        async for event in self._iterate(events):
            yield event

    async def train_stream(self, **options) -> AsyncIterator[TrainStep]:
        """Training steps as they end; leaving the loop early cancels the run."""
        steps = await self._call(self._client.train_stream, **options)
        async for step in self._iterate(steps):
            yield step

    async def _iterate(self, rows):
        done = object()
        try:
            while True:
                item = await self._call(next, rows, done)
                if item is done:
                    return
                yield item
        finally:
            await asyncio.to_thread(rows.close)
