"""The Redis source against a real Redis: a crashed peer's entries trimmed away leave nothing held here, and
max_deliveries holds however many other entries this consumer has pending."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from inspectd.streams.codec import encode_png
from inspectd.streams.message import frame_fields
from inspectd.streams.reasons import Reason
from inspectd.streams.redis_keys import StreamKeys
from inspectd.streams.redis_sink import DeadLetterSink
from inspectd.streams.redis_source import RedisStreamSource
from inspectd.streams.schema import DeadLetter

pytestmark = pytest.mark.redis

PNG = encode_png(__import__("numpy").zeros((4, 4, 3), "uint8"))


async def _add(client: Any, stream: str, n: int, tag: str) -> list[str]:
    return [(await client.xadd(stream, frame_fields("bottle", "l1", f"{tag}{i}", PNG))).decode() for i in range(n)]


def _source(client: Any, stream: str, consumer: str, **kw: Any) -> RedisStreamSource:
    return RedisStreamSource(client, [stream], group="g", consumer=consumer, block_ms=20, **kw)


async def test_a_claimed_entry_that_was_trimmed_away_is_not_held_for_ever(redis_client: Any, key_prefix: str) -> None:
    """XAUTOCLAIM names a crashed peer's entries the producer's MAXLEN trimmed away; their dead letters have no ack
    (Redis dropped them from the PEL), so nothing ever released them: one entry of memory each, for the process's
    lifetime (a producer trimming hard behind a crashed peer leaks without bound)."""
    keys = StreamKeys(key_prefix)
    stream = keys.frames("l1")
    await _add(redis_client, stream, 20, "f")
    assert len(await _source(redis_client, stream, "crashed").read(20)) == 20  # never acked
    await redis_client.xtrim(stream, maxlen=0, approximate=False)
    alive = _source(redis_client, stream, "alive", claim_idle_ms=50, claim_interval_s=0.0)
    await alive.start()
    await asyncio.sleep(0.1)
    gone = await alive.read(64)
    assert len(gone) == 20 and {d.reason for d in gone} == {Reason.DELETED_BEFORE_SCORING}
    assert all(isinstance(d, DeadLetter) and d.ack is None for d in gone)
    await DeadLetterSink(redis_client, keys).publish(gone)  # what the daemon does with them; nothing to ack
    assert await redis_client.xlen(keys.dead("l1")) == 20
    assert await alive.pending_count() == 0
    assert not alive._held  # (20 before)


async def test_max_deliveries_holds_with_many_other_entries_pending_here(redis_client: Any, key_prefix: str) -> None:
    """The delivery counts of claimed entries came from one XPENDING page of len(claimed) + 100 over their id range:
    with more of this consumer's own frames in flight inside that range (batcher.queue_size above 100), the later
    claimed entries were missing from it, counted as never delivered, and a frame that keeps killing its consumers
    was handed out again instead of being dead-lettered."""
    keys = StreamKeys(key_prefix)
    stream = keys.frames("l1")
    crashed = _source(redis_client, stream, "crashed")
    alive = _source(redis_client, stream, "alive", claim_idle_ms=100, claim_interval_s=0.0, max_deliveries=1)
    [first] = await _add(redis_client, stream, 1, "poison-a")
    assert len(await crashed.read(1)) == 1
    await _add(redis_client, stream, 150, "busy")
    in_flight = await alive.read(150)  # this instance's own frames, still being scored
    assert len(in_flight) == 150
    [last] = await _add(redis_client, stream, 1, "poison-b")
    assert len(await crashed.read(1)) == 1
    await asyncio.sleep(0.15)
    assert await alive.keep_alive(in_flight) == 150  # own frames refreshed: only the crashed peer's are idle
    claimed = await alive.read(64)  # the daemon's read chunk: one XAUTOCLAIM scans (10 x 64) past all 150
    assert sorted(i.entry_id for i in claimed) == sorted([first, last])
    assert [(type(i).__name__, i.reason) for i in claimed] == [("DeadLetter", Reason.TOO_MANY_DELIVERIES)] * 2
