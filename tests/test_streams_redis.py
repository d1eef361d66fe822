"""Redis source and sinks against a real Redis: groups, sharing, takeover, ack-after-publish, trimming."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import numpy as np
import pytest
from PIL import Image

from inspectd.streams.codec import decode_frame_image, encode_png
from inspectd.streams.message import frame_fields
from inspectd.streams.records import MaskPolicy
from inspectd.streams.redis_keys import StreamKeys
from inspectd.streams.redis_sink import DeadLetterSink, RedisResultSink
from inspectd.streams.redis_source import RedisStreamSource
from inspectd.streams.schema import DeadLetter, Frame, Result

pytestmark = pytest.mark.redis

IMG = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
PNG = encode_png(IMG)


@pytest.fixture
def keys(key_prefix: str) -> StreamKeys:
    return StreamKeys(key_prefix)


async def _add(client: Any, stream: str, n: int, start: int = 0) -> list[str]:
    ids = []
    for i in range(start, start + n):
        fields = frame_fields("bottle", "l1", f"f{i}", PNG, captured_at=1000.0 + i, meta={"i": i})
        ids.append((await client.xadd(stream, fields)).decode())
    return ids


def _source(client: Any, stream: str, consumer: str, **kw: Any) -> RedisStreamSource:
    kw.setdefault("block_ms", 20)
    return RedisStreamSource(client, [stream], group="g", consumer=consumer, **kw)


def _result(frame: Frame, **kw: Any) -> Result:
    base = dict(product=frame.product, line=frame.line, frame_id=frame.frame_id,
                captured_at=frame.captured_at, score=0.25, verdict="OK", threshold=0.5, detector="tiny",
                state_version="v1", entry_id=frame.entry_id, source=frame.source)
    base.update(kw)
    return Result(**base)


async def test_group_created_and_frames_parsed_then_acked(redis_client: Any, keys: StreamKeys) -> None:
    stream = keys.frames("l1")
    src = _source(redis_client, stream, "c1")
    await src.start()
    groups = await redis_client.xinfo_groups(stream)
    assert [g["name"] for g in groups] == [b"g"]
    await src.start()  # BUSYGROUP is fine
    ids = await _add(redis_client, stream, 3)
    items = await src.read(10)
    assert [f.entry_id for f in items] == ids
    f0 = items[0]
    assert isinstance(f0, Frame)
    assert (f0.product, f0.line, f0.frame_id, f0.captured_at, f0.meta) == ("bottle", "l1", "f0", 1000.0, {"i": 0})
    assert f0.source == f"redis:{stream}"
    np.testing.assert_array_equal(decode_frame_image(f0), IMG)
    assert await src.pending_count() == 3
    await f0.ack()
    assert await src.pending_count() == 2
    assert await src.ack_many(items[1:]) == 2
    assert await src.pending_count() == 0
    assert await src.read(10) == []  # nothing new: returns after block_ms


async def test_read_respects_max_count_over_two_streams(redis_client: Any, keys: StreamKeys) -> None:
    s1, s2 = keys.frames("l1"), keys.frames("l2")
    src = RedisStreamSource(redis_client, [s1, s2], group="g", consumer="c", block_ms=20)
    await src.start()
    await _add(redis_client, s1, 5)
    await _add(redis_client, s2, 5)
    seen = []
    for _ in range(6):
        batch = await src.read(3)
        assert len(batch) <= 3
        seen += batch
    assert len(seen) == 10 and len({f.entry_id + f.source for f in seen}) == 10
    # the line rule: a frame belongs to its stream's line; the messages on l2's stream claim line l1
    frames = [f for f in seen if isinstance(f, Frame)]
    refused = [f for f in seen if isinstance(f, DeadLetter)]
    assert len(frames) == 5 and {f.line for f in frames} == {"l1"} and {f.source for f in frames} == {f"redis:{s1}"}
    assert len(refused) == 5 and {d.reason for d in refused} == {"bad_line"} and {d.line for d in refused} == {"l2"}


async def test_nothing_is_delivered_beyond_what_was_read(redis_client: Any, keys: StreamKeys) -> None:
    """Pending entries == entries handed out, after every read: none can be stranded at shutdown."""
    streams = [keys.frames(f"l{i}") for i in range(3)]
    src = RedisStreamSource(redis_client, streams, group="g", consumer="c", block_ms=20)
    await src.start()
    for stream in streams:
        await _add(redis_client, stream, 4)
    handed_out = 0
    for count in (1, 2, 5, 1, 3):
        batch = await src.read(count)
        assert len(batch) <= count
        handed_out += len(batch)
        pending = sum([(await redis_client.xpending(s, "g"))["pending"] for s in streams])
        assert pending == handed_out


async def test_two_consumers_share_entries(redis_client: Any, keys: StreamKeys) -> None:
    stream = keys.frames("l1")
    a, b = _source(redis_client, stream, "a"), _source(redis_client, stream, "b")
    await a.start()
    await b.start()
    ids = await _add(redis_client, stream, 8)
    got_a = await a.read(4)
    got_b = await b.read(10)
    ids_a = {f.entry_id for f in got_a}
    ids_b = {f.entry_id for f in got_b}
    assert len(ids_a) == 4 and len(ids_b) == 4
    assert ids_a.isdisjoint(ids_b) and ids_a | ids_b == set(ids)


async def test_autoclaim_takes_over_dead_consumer(redis_client: Any, keys: StreamKeys) -> None:
    stream = keys.frames("l1")
    dead = _source(redis_client, stream, "dead")
    await _add(redis_client, stream, 3)
    taken = await dead.read(3)  # delivered, never acked: the consumer "crashes"
    assert len(taken) == 3
    alive = _source(redis_client, stream, "alive", claim_idle_ms=300, claim_interval_s=0.0)
    await alive.start()
    assert await alive.read(10) == []  # not idle long enough yet
    await asyncio.sleep(0.35)
    claimed = await alive.read(10)
    assert sorted(f.entry_id for f in claimed) == sorted(f.entry_id for f in taken)
    assert alive.claimed_total == 3
    info = await redis_client.xpending(stream, "g")
    assert info["consumers"] == [{"name": b"alive", "pending": 3}]
    await alive.ack_many(claimed)
    assert await alive.pending_count() == 0


async def test_a_slow_consumer_does_not_claim_back_the_frames_it_is_still_scoring(redis_client: Any,
                                                                                   keys: StreamKeys) -> None:
    """XAUTOCLAIM returns this consumer's own entries once they are idle past claim_idle_ms (a keep-alive starved
    under load): handing them out again scored them twice (a duplicate result for a frame nobody else held)."""
    stream = keys.frames("l1")
    source = _source(redis_client, stream, "slow", claim_idle_ms=100, claim_interval_s=0.0)
    ids = await _add(redis_client, stream, 3)
    held = await source.read(10)
    assert sorted(f.entry_id for f in held) == sorted(ids)
    await asyncio.sleep(0.15)  # idle past claim_idle_ms, still being scored here
    assert await source.read(10) == []  # (it returned the same 3 frames again before)
    assert source.claimed_total == 0
    await source.ack_many(held[:1])  # done with one; the other two ...
    for frame in held[1:]:  # ... were published but their XACK "failed": left pending, done here
        source._held.discard((stream, frame.entry_id))
    await asyncio.sleep(0.15)
    again = await source.read(10)  # claimed again (at least once), not lost
    assert sorted(f.entry_id for f in again) == sorted(f.entry_id for f in held[1:])
    await source.ack_many(again)
    assert await source.pending_count() == 0 and not source._held


async def test_an_ack_that_fails_still_releases_the_entries_for_a_later_claim(redis_client: Any,
                                                                               keys: StreamKeys) -> None:
    stream = keys.frames("l1")
    source = _source(redis_client, stream, "flaky", claim_idle_ms=100, claim_interval_s=0.0)
    await _add(redis_client, stream, 2)
    held = await source.read(10)
    await redis_client.delete(stream)
    await redis_client.set(stream, "not a stream")  # the XACKs below fail (WRONGTYPE)
    with pytest.raises(Exception, match="WRONGTYPE"):
        await held[0].ack()
    with pytest.raises(Exception, match="WRONGTYPE"):
        await source.ack_many(held[1:])
    assert not source._held  # no longer in flight here: a claim may redeliver them


async def test_restart_rereads_own_pending_first(redis_client: Any, keys: StreamKeys) -> None:
    stream = keys.frames("l1")
    first = _source(redis_client, stream, "c1")
    ids = await _add(redis_client, stream, 4)
    assert len(await first.read(2)) == 2  # crash before acking
    again = _source(redis_client, stream, "c1")
    batch1 = await again.read(1)
    batch2 = await again.read(5)
    assert [f.entry_id for f in batch1 + batch2] == ids  # pending ones first, each once, then new
    assert await again.read(5) == []


async def test_trimmed_pending_entry_becomes_a_dead_letter_not_a_silent_ack(redis_client: Any,
                                                                             keys: StreamKeys) -> None:
    stream = keys.frames("l1")
    first = _source(redis_client, stream, "c1")
    ids = await _add(redis_client, stream, 2)
    await first.read(2)
    await redis_client.xdel(stream, ids[0])
    again = _source(redis_client, stream, "c1")
    got = await again.read(5)
    assert [(type(f).__name__, f.entry_id) for f in got] == [("DeadLetter", ids[0]), ("Frame", ids[1])]
    assert got[0].reason == "deleted_before_scoring"
    await got[0].ack()  # acked like any dead letter, once it is published
    assert (await redis_client.xpending(stream, "g"))["pending"] == 1


async def test_malformed_entries_become_dead_letters(redis_client: Any, keys: StreamKeys) -> None:
    stream = keys.frames("l1")
    src = _source(redis_client, stream, "c1")
    await src.start()
    await redis_client.xadd(stream, {"line": "l1", "frame_id": "nop", "image": PNG})  # no product
    await redis_client.xadd(stream, {"product": "p", "frame_id": "badshape", "image": b"x", "shape": "4,x"})
    await redis_client.xadd(stream, {"product": "p", "frame_id": "badmeta", "image": PNG, "meta": "{"})
    raw = np.zeros((2, 3), np.uint8)
    await redis_client.xadd(stream, frame_fields("p", "l1", "raw", raw.tobytes(), shape=(2, 3)))
    items = await src.read(10)
    assert [type(i).__name__ for i in items] == ["DeadLetter", "DeadLetter", "DeadLetter", "Frame"]
    nop, bad_shape, bad_meta, frame = items
    assert (nop.reason, nop.stage, nop.frame_id, nop.line) == ("missing_field", "parse", "nop", "l1")
    assert "product" in nop.detail and nop.fields["image_bytes"] == str(len(PNG))
    assert "image" not in nop.fields
    assert bad_shape.reason == "bad_shape" and bad_shape.line == "l1"  # line from the key's hash tag
    assert bad_meta.reason == "bad_meta"
    assert frame.raw_shape == (2, 3) and frame.raw_dtype == "uint8"

    sink = RedisResultSink(redis_client, keys)
    await sink.publish_batch([], [nop, bad_shape, bad_meta])
    for d in (nop, bad_shape, bad_meta):
        await d.ack()
    dead = await redis_client.xrange(keys.dead("l1"))
    assert [e[1][b"reason"] for e in dead] == [b"missing_field", b"bad_shape", b"bad_meta"]
    assert all(b"image" not in e[1] for e in dead)
    assert json.loads(dead[0][1][b"fields"])["frame_id"] == "nop"
    assert await src.pending_count() == 1


async def test_ack_only_after_publish_succeeds(redis_client: Any, keys: StreamKeys) -> None:
    stream = keys.frames("l1")
    src = _source(redis_client, stream, "c1")
    await _add(redis_client, stream, 3)
    frames = await src.read(10)
    sink = RedisResultSink(redis_client, keys)
    await redis_client.set(keys.results("l1"), "not a stream")  # every XADD to it will be refused

    async def process(batch: list[Frame]) -> None:
        await sink.publish_batch([_result(f) for f in batch])
        await src.ack_many(batch)  # reached only once Redis confirmed

    with pytest.raises(Exception, match="WRONGTYPE"):
        await process(frames)
    assert await src.pending_count() == 3  # still pending: a restart or a claim redelivers them
    await redis_client.delete(keys.results("l1"))
    await process(frames)
    assert await src.pending_count() == 0
    out = await redis_client.xrange(keys.results("l1"))
    assert [e[1][b"entry_id"].decode() for e in out] == [f.entry_id for f in frames]


async def test_result_fields_and_mask_policies(redis_client: Any, keys: StreamKeys) -> None:
    frame = Frame(product="a", line="l1", frame_id="f1", captured_at=12.5, entry_id="1-0")
    mask = np.zeros((512, 384), np.float32)
    mask[:256] = 1.0
    sink = RedisResultSink(redis_client, keys, mask_policy={"a": MaskPolicy.parse("full"),
                                                            "c": MaskPolicy.parse("none")},
                           default_mask_policy=MaskPolicy.parse("downscaled:64"))
    results = [
        _result(frame, mask=mask, timings={"score": 0.01}, meta={"k": 1}, demo_weights=True),
        _result(frame, product="b", mask=mask),
        _result(frame, product="c", mask=mask),
        _result(frame, product="d", mask=None, mask_note="detector has no mask"),
    ]
    ids = await sink.publish_batch(results)
    entries = await redis_client.xrange(keys.results("l1"))
    assert [e[0].decode() for e in entries] == ids
    full, down, none, nomask = (e[1] for e in entries)
    assert full[b"product"] == b"a" and float(full[b"score"]) == 0.25 and full[b"verdict"] == b"OK"
    assert float(full[b"ts"]) == 12.5 and full[b"state_version"] == b"v1" and full[b"detector"] == b"tiny"
    assert json.loads(full[b"timings"]) == {"score": 0.01} and json.loads(full[b"meta"]) == {"k": 1}
    assert full[b"demo_weights"] == b"1" and down[b"demo_weights"] == b"0"
    assert Image.open(io.BytesIO(full[b"mask"])).size == (384, 512)
    small = Image.open(io.BytesIO(down[b"mask"]))
    assert small.size == (48, 64) and b"downscaled" in down[b"mask_note"]
    assert b"mask" not in none and b"policy" in none[b"mask_note"]
    assert b"mask" not in nomask and nomask[b"mask_note"] == b"detector has no mask"


async def test_maxlen_trims_results_approximately(redis_client: Any, keys: StreamKeys) -> None:
    sink = RedisResultSink(redis_client, keys, maxlen=10)
    frame = Frame(product="a", line="l1", frame_id="f", captured_at=0.0)
    for _ in range(5):
        await sink.publish_batch([_result(frame) for _ in range(100)])
    length = await redis_client.xlen(keys.results("l1"))
    assert 10 <= length < 500


async def test_publish_batch_is_one_pipelined_round_trip(redis_client: Any, keys: StreamKeys) -> None:
    class Spy:
        def __init__(self, inner: Any) -> None:
            self.inner, self.pipelines, self.executed = inner, 0, 0

        def pipeline(self, transaction: bool = True) -> Any:
            self.pipelines += 1
            pipe = self.inner.pipeline(transaction=transaction)
            spy, real_execute = self, pipe.execute

            async def execute(*a: Any, **kw: Any) -> Any:
                spy.executed += 1
                return await real_execute(*a, **kw)

            pipe.execute = execute
            return pipe

        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"direct client call {name} outside the pipeline")

    spy = Spy(redis_client)
    sink = RedisResultSink(spy, keys, dead_letters=DeadLetterSink(spy, keys))
    frame = Frame(product="a", line="l1", frame_id="f", captured_at=0.0)
    dead = [DeadLetter(reason="corrupt_image", stage="decode", product="a", line="l2", frame_id="x")]
    ids = await sink.publish_batch([_result(frame) for _ in range(20)], dead)
    assert len(ids) == 21 and (spy.pipelines, spy.executed) == (1, 1)
    assert await redis_client.xlen(keys.results("l1")) == 20
    assert await redis_client.xlen(keys.dead("l2")) == 1


async def test_frame_redelivered_too_often_becomes_a_dead_letter(redis_client: Any, keys: StreamKeys) -> None:
    """A frame that keeps killing its consumer is not retried forever."""
    stream = keys.frames("l1")
    await _add(redis_client, stream, 1)
    for attempt in range(4):  # four consumers take it and "crash" (never ack)
        src = RedisStreamSource(redis_client, [stream], group="g", consumer=f"c{attempt}", block_ms=20,
                                claim_idle_ms=1, claim_interval_s=0, max_deliveries=3)
        await src.start()
        await asyncio.sleep(0.01)
        items = await src.read(5)
        assert len(items) == 1
        if attempt < 3:
            assert isinstance(items[0], Frame), attempt
        else:
            dead = items[0]
            assert isinstance(dead, DeadLetter) and dead.reason == "too_many_deliveries"
            await dead.ack()
    assert (await redis_client.xpending(stream, "g"))["pending"] == 0


async def test_an_entry_the_parser_chokes_on_is_a_dead_letter_and_the_rest_of_its_read_is_scored(
        redis_client: Any, keys: StreamKeys) -> None:
    """A `shape` of "[1e999,3]" raised OverflowError and a deeply nested `meta` RecursionError out of read():
    the whole XREADGROUP reply was dropped, its good entries stayed pending un-handed-out and came back only by
    XAUTOCLAIM, where the same entry failed again, for ever (max_deliveries is checked after parsing)."""
    stream = keys.frames("l1")
    src = _source(redis_client, stream, "c1")
    await src.start()
    good = await _add(redis_client, stream, 2)
    await redis_client.xadd(stream, {"product": "p", "frame_id": "inf", "image": b"x", "shape": "[1e999,3]"})
    await redis_client.xadd(stream, {"product": "p", "frame_id": "deep", "image": PNG, "meta": "[" * 50_000})
    good += await _add(redis_client, stream, 2, start=2)
    items = await src.read(10)
    frames = [i for i in items if isinstance(i, Frame)]
    dead = {i.frame_id: i for i in items if isinstance(i, DeadLetter)}
    assert sorted(f.entry_id for f in frames) == sorted(good)
    assert (dead["inf"].reason, dead["deep"].reason) == ("bad_shape", "bad_meta")
    assert "nested too deeply" in dead["deep"].detail
    await src.ack_many(items)
    assert await src.pending_count() == 0


async def test_a_parser_bug_dead_letters_its_entry_only(redis_client: Any, keys: StreamKeys,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the parser raises for one entry, the entries read with it are handed out."""
    import inspectd.streams.redis_source as redis_source

    real = redis_source.parse_frame_fields

    def parse(fields: Any, **kw: Any) -> Any:
        if fields.get(b"frame_id") == b"f1":
            raise KeyError("a bug")
        return real(fields, **kw)

    monkeypatch.setattr(redis_source, "parse_frame_fields", parse)
    stream = keys.frames("l1")
    ids = await _add(redis_client, stream, 3)
    items = await _source(redis_client, stream, "c1").read(10)
    assert [(type(i).__name__, i.entry_id) for i in items] == [("Frame", ids[0]), ("DeadLetter", ids[1]),
                                                                ("Frame", ids[2])]
    assert items[1].reason == "unreadable" and "KeyError" in items[1].detail and items[1].ack is not None


async def test_a_failed_claim_does_not_drop_the_backlog_read_before_it(redis_client: Any, keys: StreamKeys,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """read() = own backlog, then XAUTOCLAIM, then new entries: an error in a later step threw away the
    entries an earlier one had already taken from Redis (pending here, handed out to nobody)."""
    stream = keys.frames("l1")
    ids = await _add(redis_client, stream, 3)
    assert len(await _source(redis_client, stream, "c1").read(3)) == 3  # crash before acking
    again = _source(redis_client, stream, "c1", claim_interval_s=0.0)
    await again.start()
    again._last_claim = float("-inf")

    async def broken_claim(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("connection reset")

    monkeypatch.setattr(redis_client, "xautoclaim", broken_claim)
    got = await again.read(10)
    assert [f.entry_id for f in got] == ids
    with pytest.raises(ConnectionError):  # the next read raises the error (the daemon backs off)
        await again.read(10)


async def test_a_crashed_peers_frames_come_back_at_the_read_rate(redis_client: Any, keys: StreamKeys) -> None:
    """XAUTOCLAIM asked for only the read's count and then waited claim_interval_s: a loaded instance reading 8 at
    a time took a crashed peer's 64 frames back 8 per interval (4 minutes at the defaults) while scoring newer
    frames first. A scan that has not reached the end goes on at the next read."""
    stream = keys.frames("l1")
    crashed = _source(redis_client, stream, "crashed")
    old = await _add(redis_client, stream, 64)
    assert len(await crashed.read(64)) == 64
    alive = _source(redis_client, stream, "alive", claim_idle_ms=100, claim_interval_s=60.0)
    await alive.start()
    await asyncio.sleep(0.15)
    alive._last_claim = float("-inf")  # the first interval has passed
    taken: list[str] = []
    newer = 0
    for n in range(8):  # live traffic keeps arriving, 8 frames a read
        await _add(redis_client, stream, 8, start=1000 + 8 * n)
        items = await alive.read(8)
        taken += [i.entry_id for i in items if i.entry_id in set(old)]
        newer += len(items) - sum(i.entry_id in set(old) for i in items)
        await alive.ack_many(items)
    assert sorted(taken) == sorted(old) and newer == 0  # (before: 8 taken back, 56 newer frames first)
    assert alive.claimed_total == 64


async def test_a_vanished_group_on_one_stream_does_not_hand_out_the_others_in_flight_entries(
        redis_client: Any, keys: StreamKeys) -> None:
    """NOGROUP (one line's stream deleted) restarted the whole source: every stream's backlog was re-read from
    "0", handing out again the entries of the other lines still being scored here."""
    s1, s2 = keys.frames("l1"), keys.frames("l2")
    src = RedisStreamSource(redis_client, [s1, s2], group="g", consumer="c", block_ms=20)
    await src.start()
    first = await _add(redis_client, s1, 2)
    for i in range(2):
        await redis_client.xadd(s2, frame_fields("bottle", "l2", f"x{i}", PNG))
    held = await src.read(4)
    assert len(held) == 4
    await redis_client.delete(s2)
    await redis_client.xadd(s2, frame_fields("bottle", "l2", "new", PNG))
    later: list[Any] = []
    for _ in range(3):
        later += await src.read(4)
    assert [f.frame_id for f in later] == ["new"]
    assert not {f.entry_id for f in later} & set(first)
    await src.ack_many(held[:2])
    assert await src.pending_count() == 1  # the new entry of l2, read here and not acked yet


async def test_a_read_blocking_longer_than_five_seconds_waits_for_its_frame(redis_url: str, redis_client: Any,
                                                                           keys: StreamKeys, tiny_backbone: Any
                                                                           ) -> None:
    """`redis.block_ms` above redis-py's 5 s socket timeout: the daemon's client must wait out the whole block
    (before, the read failed at 5 s, and a frame arriving after that was delivered to a dropped connection, pending
    and unseen until claim_idle_ms)."""
    from inspectd.daemon.app import InspectDaemon
    from inspectd.daemon.config import DaemonConfig

    config = DaemonConfig()
    config.redis.url, config.redis.block_ms = redis_url, 5800
    client = InspectDaemon(config, backbone=tiny_backbone)._redis_client()
    stream = keys.frames("l1")
    source = _source(client, stream, "c1", block_ms=config.redis.block_ms)
    try:
        await source.start()
        reading = asyncio.create_task(source.read(4))
        await asyncio.sleep(5.3)
        await _add(redis_client, stream, 1)
        items = await asyncio.wait_for(reading, 5)
        assert [type(i).__name__ for i in items] == ["Frame"] and items[0].frame_id == "f0"
    finally:
        await client.aclose()
