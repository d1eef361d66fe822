"""The micro-batcher's promises: a batch ends max_delay after it began, nothing taken is lost to a cancelled
`next_batch`, the inbox holds ``capacity`` frames, and close delivers what is queued, then ends. Found by a review
helper."""

from __future__ import annotations

import asyncio
import time

import pytest

from inspectd.daemon.batcher import MicroBatcher


async def test_a_steady_trickle_that_never_fills_a_batch_still_ends_it_max_delay_after_the_call() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(max_batch_size=1000, max_delay_s=0.3, capacity=1000)

    async def trickle() -> None:
        for i in range(100):
            await batcher.put(i)
            await asyncio.sleep(0.01)

    producer = asyncio.create_task(trickle())
    started = time.monotonic()
    batch = await batcher.next_batch()
    waited = time.monotonic() - started
    producer.cancel()
    assert batch[:3] == [0, 1, 2] and 10 < len(batch) < 60
    assert 0.25 < waited < 0.5, waited


async def test_a_cancelled_next_batch_loses_no_frame() -> None:
    """`next_batch` cancelled while it waits to fill a batch (a caller's timeout, shutdown): the frames it had
    already taken used to vanish; they are delivered by the next call."""
    batcher: MicroBatcher[int] = MicroBatcher(max_batch_size=8, max_delay_s=5.0, capacity=64)
    await batcher.put(1)
    await batcher.put(2)
    task = asyncio.create_task(batcher.next_batch())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert batcher.qsize() == 2
    await batcher.put(3)
    batcher.close()
    assert await batcher.next_batch() == [1, 2, 3]
    assert await batcher.next_batch() == []


async def test_close_ends_a_filling_batch_then_the_rest_is_delivered_and_next_batch_ends() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(max_batch_size=2, max_delay_s=5.0, capacity=64)
    await batcher.put(1)
    task = asyncio.create_task(batcher.next_batch())
    await asyncio.sleep(0.05)
    started = time.monotonic()
    batcher.close()
    assert await task == [1]
    assert time.monotonic() - started < 0.5
    await batcher.put(2)  # e.g. a parked frame coming back while the daemon drains: still delivered
    await batcher.put(3)
    await batcher.put(4)
    assert [await batcher.next_batch() for _ in range(3)] == [[2, 3], [4], []]
    assert batcher.qsize() == 0


async def test_close_on_a_full_inbox_does_not_raise_and_a_waiting_consumer_wakes() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(max_batch_size=4, max_delay_s=0.0, capacity=3)
    for i in range(3):
        await batcher.put(i)
    with pytest.raises(TimeoutError):  # the bound holds: a fourth frame waits for room
        await asyncio.wait_for(batcher.put(3), 0.1)
    batcher.close()
    assert await batcher.next_batch() == [0, 1, 2]
    empty: MicroBatcher[int] = MicroBatcher(max_batch_size=4, max_delay_s=0.0, capacity=3)
    waiting = asyncio.create_task(empty.next_batch())
    await asyncio.sleep(0.05)
    empty.close()
    assert await asyncio.wait_for(waiting, 1.0) == []
