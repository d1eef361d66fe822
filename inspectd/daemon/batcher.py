"""Micro-batcher: frames from a bounded queue, grouped up to ``max_batch_size`` or ``max_delay_ms``."""

from __future__ import annotations

import asyncio
import time
from typing import Generic, TypeVar

T = TypeVar("T")

_CLOSED = object()


class MicroBatcher(Generic[T]):
    """A bounded inbox; `next_batch` returns as soon as the batch is full or the oldest frame waited
    ``max_delay_s``. After `close`, remaining frames are still delivered; then `next_batch` returns []."""

    def __init__(self, max_batch_size: int, max_delay_s: float, capacity: int) -> None:
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=capacity + 1)  # +1 for the close marker
        self._closed = False

    def qsize(self) -> int:
        return self._queue.qsize()

    async def put(self, item: T) -> None:
        await self._queue.put(item)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put_nowait(_CLOSED)

    async def next_batch(self) -> list[T]:
        if self._closed and self._queue.empty():
            return []
        first = await self._queue.get()
        if first is _CLOSED:
            return []
        batch = [first]
        deadline = time.monotonic() + self.max_delay_s
        while len(batch) < self.max_batch_size:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if item is _CLOSED:
                self._queue.put_nowait(_CLOSED)  # keep the marker for the next call
                break
            batch.append(item)
        return batch
